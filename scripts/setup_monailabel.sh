#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with MONAI Label 0.8.5 and medcl, keeping the CPU torch.
#
# Why a separate environment: monailabel 0.8.5 (the newest on PyPI) asks for monai[...torchvision, itk, openslide...]
# and sam2, and a plain install pulls a CUDA torch of several GB. Here torch==2.13.0 goes in first, every later
# install is constrained to it (and to pydicom<3 / pynetdicom<3, which monailabel 0.8.5 predates), and PyPI's
# torchvision — a CUDA build that fails to import beside the CPU torch ("operator torchvision::nms does not
# exist") — is removed again: MONAI imports it optionally, and the bundle app only needs it for SAM2, which the
# server start-up switches off (--conf sam2 false).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDCL_MONAILABEL_VENV:-.venv-monailabel}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup-monailabel] installing torch==2.13.0 into $VENV"
    "${PIP[@]}" "torch==2.13.0"
fi
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\npydicom<3\npynetdicom<3\n' > "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import monailabel" >/dev/null 2>&1; then
    echo "[setup-monailabel] installing monailabel==0.8.5 into $VENV"
    "${PIP[@]}" -c "$CONSTRAINTS" "monailabel==0.8.5"
fi
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "[setup-monailabel] removing torchvision (a CUDA build that cannot load beside the CPU torch)"
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision
fi
echo "[setup-monailabel] installing medcl (editable) into $VENV"
"${PIP[@]}" -c "$CONSTRAINTS" -e .
"$VENV/bin/python" -c "import torch, monai, monailabel, medcl; print(f'[setup-monailabel] ready: torch {torch.__version__}, monai {monai.__version__}, monailabel {monailabel.__version__}, medcl {medcl.__version__}')"
