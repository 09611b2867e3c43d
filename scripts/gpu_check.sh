#!/usr/bin/env bash
# The GPU check, sized to a lent GPU machine's lease (step budgets sum to 300 s, so a rerun still fits) and
# rehearsed on the CPU before one is lent. The steps, budgets, outputs and rules: scripts/gpu_check/run.py and
# docs/gpu_check.md.
#   there (device `run` tool): command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 420
#   here, first:               bash scripts/gpu_check.sh --check-wheels      (the wheels of scripts/gpu_wheels.sh)
#                              bash scripts/gpu_check.sh --rehearse          (CPU, toy sizes, <= 120 s; CI runs it)
#   a subset or a longer budget on a rerun: --steps tests,decode --budget tests=160; the table: --list
# On the device the image's own python3 (torch, triton, transformers) runs it; only the carried wheels it lacks are
# installed (into a --target folder on PYTHONPATH). Here .venv's python runs it. PYTHON=... overrides both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check/run.py "$@"
