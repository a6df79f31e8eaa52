#!/usr/bin/env bash
# A virtual environment with what a downloaded medcl bundle needs to run — and without medcl itself: the bundle
# ships its own copy of the library (scripts/export_bundle.py). Used by tests/test_bundle_export.py; also what a
# user without this repository installs. torch==2.13.0 first (a CPU build here), so the rest keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-runtime}"
source scripts/venv_with_cpu_torch.sh
venv_with_cpu_torch "$VENV"
"${PIP[@]}" "monai[fire]==1.6.1" nibabel scipy "pytorch-ignite>=0.4.11" pyyaml einops
"$VENV/bin/python" -c "import torch, monai; print(f'[runtime venv] {torch.__version__}, monai {monai.__version__}')"
