#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: everything that does not need a GPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM=false
# the imported embedded model is cached here between runs (created on first use)
export RAD_DS_CACHE="${RAD_DS_CACHE:-$ROOT/.cache/rad_ds}"
exec .venv/bin/python -m pytest -m "not gpu" -q "$@"
