#!/usr/bin/env bash
# Set everything up, then run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_monailabel.sh   # its own venv, for the MONAI Label integration test (tests/test_monailabel.py)
VENV="${MEDCL_VENV:-.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# Lint and format first (ruff, pinned in the dev extra; rules in pyproject.toml): either failing stops the run.
echo "== ruff check (lint)"
"$VENV/bin/ruff" check .
echo "== ruff format --check (formatting; run 'ruff format .' to fix)"
"$VENV/bin/ruff" format --check .
echo "== pytest"
exec "$VENV/bin/python" -m pytest -q "$@"
