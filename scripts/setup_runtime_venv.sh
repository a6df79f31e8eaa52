#!/usr/bin/env bash
# A virtual environment with what a downloaded medcl bundle needs to run — and without medcl itself: the bundle
# ships its own copy of the library (scripts/export_bundle.py). Used by tests/test_bundle_export.py; also what a
# user without this repository installs. torch 2.13.0 first (MEDCL_TORCH chooses the build, see
# scripts/venv_with_torch.sh), so the rest keeps it. Versions as in constraints.txt unless MEDCL_PINNED=0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-runtime}"
PINS=()
[ "${MEDCL_PINNED:-1}" = 0 ] || PINS=(-c constraints.txt)
source scripts/venv_with_torch.sh
venv_with_torch "$VENV" "${PINS[@]}"
"${PIP[@]}" "monai[fire]==1.6.1" nibabel scipy "pytorch-ignite>=0.4.11" pyyaml einops
"$VENV/bin/python" -c "import torch, monai; print(f'[runtime venv] {torch.__version__}, monai {monai.__version__}')"
