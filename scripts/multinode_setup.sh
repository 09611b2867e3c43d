#!/usr/bin/env bash
# Two loopback "nodes" for a real multi-node DeepSpeed launch on one machine (idempotent):
#   - installs openssh-server and pdsh (apt) when missing;
#   - runs an sshd of its own on 127.0.0.1 and 127.0.0.2 (port $RAD_DS_SSH_PORT or a free one), with its
#     own host key and its own client key; nothing under ~/.ssh or /etc/ssh is changed;
#   - writes, in the state directory ($RAD_DS_MULTINODE_DIR, default .cache/multinode):
#       hostfile   "127.0.0.1 slots=1" and "127.0.0.2 slots=1"
#       env.sh     RAD_DS_SSH_PORT and PDSH_SSH_ARGS_APPEND (key, known_hosts, batch mode) to source
#   - checks that `ssh 127.0.0.2` with that key works.
# Then, e.g.:
#   source .cache/multinode/env.sh
#   deepspeed --hostfile .cache/multinode/hostfile --master_addr 127.0.0.1 --ssh_port $RAD_DS_SSH_PORT \
#       --no_ssh_check launchers/distill.py ...
# Usage: bash scripts/multinode_setup.sh [--stop]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${RAD_DS_MULTINODE_DIR:-$ROOT/.cache/multinode}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/sshd.pid"

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if [[ "${1:-}" == "--stop" ]]; then
  if running; then kill "$(cat "$PIDFILE")" && echo "[multinode] sshd stopped"; fi
  rm -f "$PIDFILE"
  exit 0
fi

SUDO=""
if [[ $(id -u) != 0 ]]; then SUDO="sudo -n"; fi
SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
if [[ ! -x "$SSHD" ]] || ! command -v pdsh >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; then
  echo "[multinode] installing openssh-server, openssh-client, pdsh"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null
  SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
fi

[[ -f "$STATE/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C rad-ds-multinode -f "$STATE/id_ed25519"
[[ -f "$STATE/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C rad-ds-host -f "$STATE/host_ed25519"
cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
chmod 600 "$STATE/id_ed25519" "$STATE/host_ed25519" "$STATE/authorized_keys"

if ! running; then
  PORT="${RAD_DS_SSH_PORT:-}"
  if [[ -z "$PORT" ]]; then
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  cat > "$STATE/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $STATE/host_ed25519
PidFile $PIDFILE
AuthorizedKeysFile $STATE/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
X11Forwarding no
PrintMotd no
MaxStartups 64
MaxSessions 64
EOF
  [[ $(id -u) == 0 ]] && mkdir -p /run/sshd  # privilege-separation directory sshd wants as root
  "$SSHD" -f "$STATE/sshd_config" -E "$STATE/sshd.log"
  for _ in $(seq 50); do running && break; sleep 0.1; done
  running || { echo "[multinode] sshd did not start; see $STATE/sshd.log" >&2; tail -5 "$STATE/sshd.log" >&2; exit 1; }
  echo "$PORT" > "$STATE/port"
fi
PORT="$(cat "$STATE/port")"

SSH_ARGS="-i $STATE/id_ed25519 -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=$STATE/known_hosts -o BatchMode=yes -o LogLevel=ERROR"
cat > "$STATE/env.sh" <<EOF
export RAD_DS_SSH_PORT=$PORT
export PDSH_SSH_ARGS_APPEND="$SSH_ARGS"
EOF
printf '127.0.0.1 slots=1\n127.0.0.2 slots=1\n' > "$STATE/hostfile"

for host in 127.0.0.1 127.0.0.2; do
  # shellcheck disable=SC2086
  if ! ssh $SSH_ARGS -p "$PORT" "$host" true 2>"$STATE/ssh_check.err"; then
    echo "[multinode] ssh to $host:$PORT failed: $(tail -1 "$STATE/ssh_check.err")" >&2
    exit 1
  fi
done
echo "[multinode] ready: sshd pid $(cat "$PIDFILE") on 127.0.0.1/127.0.0.2:$PORT; source $STATE/env.sh; hostfile $STATE/hostfile"
