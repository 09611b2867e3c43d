#!/usr/bin/env bash
# Run THERE (a CUDA machine): installs the carried wheels (.whl/) if packages are missing, runs the
# gpu-marked tests (mamba-ssm kernels, packed documents, ZeRO-3 construction + one-copy teacher, CUDA-graph
# decoding), the scan, distill-step, one-copy and inference benchmarks in fp32/bf16, and writes results to $OUT (or
# benchmarks/results/gpu/). Prepare the wheels here first with scripts/gpu_wheels.sh.
# It fails (exit 1), never passes by skipping, where the mamba-ssm kernels do not import: RAD_DS_REQUIRE_KERNELS=1
# makes every gpu test that would skip (no CUDA, no kernels) a failure (tests/conftest.py, tests/helpers.py).
#   device run: bash scripts/gpu_check.sh      (carry: [".whl"])
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RES="${OUT:-benchmarks/results/gpu}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
if ! $PY -c "import deepspeed, mamba_ssm.ops.triton.ssd_combined" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=offline RAD_DS_REQUIRE_KERNELS=1
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi -L 2>&1
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "from rad_ds.models import ssm_ops; k = ssm_ops._kernels(); print('mamba-ssm kernels:', sorted(k) if k else None)"
} 2>&1 | tee "$RES/env.txt"
rc=0
if ! $PY -c "import sys; from rad_ds.models import ssm_ops; sys.exit(0 if ssm_ops._kernels() else 1)" 2>/dev/null; then
  echo "gpu_check: FAIL: the mamba-ssm kernels are not importable (see $RES/env.txt); the gpu tests will fail" \
    | tee -a "$RES/env.txt"
  rc=1
fi
timeout 900 $PY -m pytest -m gpu -q -rs tests/ --junitxml="$RES/gpu_tests.xml" 2>&1 | tee "$RES/gpu_tests.txt" || rc=1
for dt in float32 bfloat16; do
  timeout 600 $PY benchmarks/ssm_scan.py --device cuda --dtype "$dt" --lengths 512 2048 \
    --out "$RES/ssm_scan_cuda_${dt}.json" 2>&1 | tee -a "$RES/bench.txt" || rc=1
done
# distillation step in bf16 (trainer vs plain loop, 1 rank): tokens/s and model FLOPs utilisation
timeout 900 $PY benchmarks/distill_step.py --device cuda --dtype bfloat16 --ranks 1 --threads 4 \
  --hidden 1024 --num-layers 12 --layers 3,7 --vocab 32768 --seq-len 1024 --micro-batch 8 --steps 10 \
  --peak-tflops "${PEAK_TFLOPS:-989}" --out "$RES/distill_cuda_bf16.json" 2>&1 | tee -a "$RES/bench.txt" || rc=1
# one-copy self-distillation vs two engines (ZeRO-3 construction, kernel path), bf16
timeout 600 $PY benchmarks/one_copy.py --dtype bfloat16 --seq-len 1024 --micro-batch 4 \
  --out "$RES/one_copy_cuda_bf16.json" 2>&1 | tee -a "$RES/bench.txt" || rc=1
# inference: prefill/decode by context, transformers' Llama vs rad-ds (dynamic cache and CUDA-graph StaticDecoder)
timeout 600 $PY benchmarks/inference.py --device cuda --dtype bfloat16 --threads 4 \
  --contexts 1024,4096,16384,32768 --batch8-contexts 1024,4096,16384,32768 --batch8-prefill-max 262144 \
  --decode-tokens 64 --out "$RES/inference_cuda_bf16.json" 2>&1 | tee -a "$RES/bench.txt" || rc=1
echo "gpu_check rc=$rc; results in $RES"
exit $rc
