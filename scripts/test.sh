#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: everything that does not need a GPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec .venv/bin/python -m pytest -m "not gpu" -q "$@"
