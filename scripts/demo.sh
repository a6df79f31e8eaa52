#!/usr/bin/env bash
# Set everything up, then run the CPU demo: phantom -> training runs -> Dice table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEDCL_VENV:-.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$VENV/bin/python" scripts/demo.py "$@"
