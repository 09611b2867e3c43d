#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a GPU check: puts into .whl/ the Python packages the lent GPU machine's
# image lacks and the check needs (deepspeed, mamba-ssm, pydantic and their own missing needs; KINDS.md lists the
# image's packages: torch 2.11 + CUDA 13, triton, transformers, einops, ... are there and are used as they are), as
# wheels for its Python 3.12 on x86-64, then checks them (tags, one version each, size with the tree under 64 MiB).
# .whl/ is git-ignored and travels with the call (carry: [".whl"]); scripts/gpu_check.sh installs there only what the
# image lacks (--no-index --no-deps --target).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
PY=.venv/bin/python
mkdir -p .whl
rm -f .whl/*.whl  # exactly this set: a stale second version stops the whole install there
# pure-Python builds made here (mamba-ssm without its CUDA extension: rad-ds uses its Triton kernels only)
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip wheel -q --no-deps --no-build-isolation \
  -w .whl mamba-ssm==2.3.2.post1
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# binary / universal wheels for the device's Python 3.12 (deepspeed needs pydantic and hjson; pydantic the rest;
# typing-extensions is installed there only if the image's is older than pydantic accepts)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
du -sh .whl
exec $PY scripts/gpu_check/run.py --check-wheels .whl
