#!/usr/bin/env bash
# One-call GPU check of every bundle (at most 8 minutes on one GPU): short AMP runs at the paper sizes on the
# phantom, CUDA-event step times, peak GPU memory, a GradScaler round trip through --resume true, a 2-process NCCL
# torchrun step when 2 GPUs exist. Writes <out>/gpu_check.json and <out>/gpu_check.log (default gpu_check_out/).
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget_s 480] [--epoch_length 10] [--only a,b] [--help]
#
# Set-up needs no internet: the Python is $MEDCL_PYTHON, else .venv/bin/python when this tree has one (made by
# scripts/setup.sh), else python3; torch (a CUDA build) must be installed in it, and medcl is installed from this
# tree (pip install --no-deps -e .) when missing. Without a CUDA device it stops at once with one message (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MEDCL_PYTHON:-}" ]; then
    PY="$MEDCL_PYTHON"
elif [ -x "${MEDCL_VENV:-.venv}/bin/python" ]; then
    PY="${MEDCL_VENV:-.venv}/bin/python"
else
    PY="$(command -v python3 || true)"
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no Python found (set MEDCL_PYTHON, or run bash scripts/setup.sh)." >&2
    exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
