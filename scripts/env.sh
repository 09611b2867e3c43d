# Sourced by scripts/test.sh and scripts/demo.sh: set up .venv (idempotent), then the environment every
# rad-ds run uses here: no hub access, wandb offline unless WANDB_MODE says otherwise, and the cache of
# the imported embedded model (created on first use).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM=false
export RAD_DS_CACHE="${RAD_DS_CACHE:-$ROOT/.cache/rad_ds}"
