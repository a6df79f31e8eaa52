#!/usr/bin/env bash
# A virtual environment with what a downloaded medcl bundle needs to run — and without medcl itself: the bundle
# ships its own copy of the library (scripts/export_bundle.py). Used by tests/test_bundle_export.py; also what a
# user without this repository installs. torch==2.13.0 first (a CPU build here), so the rest keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-runtime}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" "monai[fire]==1.6.1" nibabel scipy "pytorch-ignite>=0.4.11" pyyaml einops
"$VENV/bin/python" -c "import torch, monai; print(f'[runtime venv] {torch.__version__}, monai {monai.__version__}')"
