#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with MONAI Label 0.8.5 and medcl, keeping the CPU torch.
#
# Why a separate environment: monailabel 0.8.5 (the newest on PyPI) asks for monai[...torchvision, itk, openslide...]
# and sam2, and a plain install pulls a CUDA torch of several GB. Here torch==2.13.0 goes in first, every later
# install is constrained to it (and to pydicom<3 / pynetdicom<3, which monailabel 0.8.5 predates). PyPI's
# torchvision is a CUDA build whose C++ ops cannot load beside the CPU torch, and 0.28 then fails at import
# ("operator torchvision::nms does not exist", pytorch/vision#9337). MONAI Label imports torchvision.utils at
# start-up, so it stays installed (without its dependencies, which would replace the CPU torch), and
# scripts/start_monailabel.sh puts scripts/monailabel_site/sitecustomize.py on PYTHONPATH, which lets the import
# finish without the C++ ops (SAM2, which needs them, is switched off with --conf sam2 false).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDCL_MONAILABEL_VENV:-.venv-monailabel}"
source scripts/venv_with_cpu_torch.sh
venv_with_cpu_torch "$VENV"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\npydicom<3\npynetdicom<3\n' > "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import monailabel" >/dev/null 2>&1; then
    echo "[setup-monailabel] installing monailabel==0.8.5 into $VENV"
    "${PIP[@]}" -c "$CONSTRAINTS" "monailabel==0.8.5"
fi
if ! "$VENV/bin/python" -m pip show --quiet torchvision >/dev/null 2>&1; then
    echo "[setup-monailabel] installing torchvision (no dependencies: the CPU torch stays)"
    "${PIP[@]}" --no-deps -c "$CONSTRAINTS" "torchvision==0.28.0"
fi
echo "[setup-monailabel] installing medcl (editable) into $VENV"
"${PIP[@]}" -c "$CONSTRAINTS" -e .
"$VENV/bin/python" -c "import torch, monai, monailabel, medcl; print(f'[setup-monailabel] ready: torch {torch.__version__}, monai {monai.__version__}, monailabel {monailabel.__version__}, medcl {medcl.__version__}')"
