#!/usr/bin/env bash
# Set everything up, then run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_monailabel.sh   # its own venv, for the MONAI Label integration test (tests/test_monailabel.py)
VENV="${MEDCL_VENV:-.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$VENV/bin/python" -m pytest -q "$@"
