#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a GPU check: puts into .whl/ the Python packages that the
# lent GPU machine lacks (it has torch, triton, transformers 5.17, einops, ... but no deepspeed,
# mamba-ssm or pydantic, and no network). Python 3.12 / x86_64 wheels; .whl/ is git-ignored and is
# carried to the device with the run (carry: [".whl"]).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
PY=.venv/bin/python
mkdir -p .whl
# pure-Python builds made here
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip wheel -q --no-deps --no-build-isolation \
  -w .whl mamba-ssm==2.3.2.post1
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# binary / universal wheels for the device's Python 3.12
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 -d .whl \
  transformers==5.24.0 huggingface-hub==1.33.0 hjson pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types typing-inspection gguf
du -sh .whl && ls .whl
