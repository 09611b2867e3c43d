#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: everything that does not need a GPU.
# RAD_DS_REQUIRE_MAMBA_REF=1: a test that compares against mamba-ssm's own pure-PyTorch references fails, not
# skips, where they do not import (scripts/setup.sh installs mamba-ssm without its CUDA build for them).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export RAD_DS_REQUIRE_MAMBA_REF="${RAD_DS_REQUIRE_MAMBA_REF:-1}"
exec .venv/bin/python -m pytest -m "not gpu" -q "$@"
