#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with MONAI Label 0.8.5 and medcl, keeping the torch 2.13.0 build
# chosen by MEDCL_TORCH (scripts/venv_with_torch.sh; default auto: CUDA when nvidia-smi works, else CPU).
#
#   MEDCL_MONAILABEL_VENV=DIR   the environment (default .venv-monailabel)
#   MEDCL_PINNED=1|0            1 (default): every package at the version in constraints-monailabel.txt;
#                               0: the newest versions allowed (torch==2.13.0, pydicom<3, pynetdicom<3 still hold)
#
# Why a separate environment: monailabel 0.8.5 (the newest on PyPI) asks for monai[...torchvision, itk, openslide...],
# sam2 and pydicom-seg, and a plain install pulls a CUDA torch of several GB. Here torch
# goes in first and every later install is constrained to it (and to pydicom<3 / pynetdicom<3, which monailabel
# 0.8.5 predates). PyPI's torchvision is a CUDA build whose C++ ops cannot load beside the CPU torch, and 0.28 then
# fails at import ("operator torchvision::nms does not exist", pytorch/vision#9337). MONAI Label imports
# torchvision.utils at start-up, so it stays installed (without its dependencies, which would replace the CPU torch),
# and scripts/start_monailabel.sh puts scripts/monailabel_site/sitecustomize.py on PYTHONPATH, which lets the import
# finish without the C++ ops (SAM2, which needs them, is switched off with --conf sam2 false).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDCL_MONAILABEL_VENV:-.venv-monailabel}"
if [ "${MEDCL_PINNED:-1}" = 0 ]; then
    echo "[setup-monailabel] MEDCL_PINNED=0: newest allowed versions (constraints-monailabel.txt not used)"
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    printf 'torch==2.13.0\npydicom<3\npynetdicom<3\n' > "$CONSTRAINTS"
else
    echo "[setup-monailabel] installing the versions pinned in constraints-monailabel.txt (MEDCL_PINNED=0 lifts the pins)"
    CONSTRAINTS=constraints-monailabel.txt
fi
source scripts/venv_with_torch.sh
venv_with_torch "$VENV" -c "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import monailabel" >/dev/null 2>&1; then
    echo "[setup-monailabel] installing monailabel==0.8.5 into $VENV"
    "${PIP[@]}" "monailabel==0.8.5"
fi
if ! "$VENV/bin/python" -m pip show --quiet torchvision >/dev/null 2>&1; then
    echo "[setup-monailabel] installing torchvision (no dependencies: the CPU torch stays)"
    "${PIP[@]}" --no-deps "torchvision==0.28.0"
fi
# medcl goes in without its jsonschema>=4 requirement: monailabel needs pydicom-seg 0.4.1, which needs jsonschema<4,
# and MONAI Label does not use what medcl needs jsonschema for (checking a bundle's metadata against medcl's schema,
# medcl.bundle.verify_metadata_offline and the bundle export, which jsonschema 3.2 cannot run: it mis-resolves the
# schema's relative $id). So medcl's other requirements from setup.cfg are installed, then medcl with --no-deps;
# `pip check` in this venv reports that one unmet requirement. Export and check bundles from .venv instead.
mapfile -t MEDCL_REQS < <("$VENV/bin/python" - <<'PY'
import configparser, re
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
for line in cfg["options"]["install_requires"].splitlines():
    if line.strip() and re.match(r"[A-Za-z0-9_.-]+", line.strip()).group(0).lower() != "jsonschema":
        print(line.strip())
PY
)
echo "[setup-monailabel] installing medcl's requirements except jsonschema (pydicom-seg keeps jsonschema<4), then medcl (editable, --no-deps), into $VENV"
"${PIP[@]}" "${MEDCL_REQS[@]}"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, monai, monailabel, medcl; print(f'[setup-monailabel] ready: torch {torch.__version__}, monai {monai.__version__}, monailabel {monailabel.__version__}, medcl {medcl.__version__}')"
