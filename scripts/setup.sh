#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install medcl (editable, with the dev extra) into it.
#
#   MEDCL_VENV=DIR       the environment (default .venv)
#   MEDCL_PINNED=1|0     1 (default): every package at the version in constraints.txt (`pip install -c`), the
#                        versions the README's figures were made with; 0: the newest versions setup.cfg allows
#   MEDCL_TORCH=auto|cpu|cuda   which torch build goes in first (default auto: cuda when nvidia-smi works, else
#                        cpu); see scripts/venv_with_torch.sh and docs/setup.md
#
# torch goes in first, so that `pip install -e .` keeps it instead of choosing a torch build itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDCL_VENV:-.venv}"
PINS=()
if [ "${MEDCL_PINNED:-1}" = 0 ]; then
    echo "[setup] MEDCL_PINNED=0: installing the newest versions setup.cfg allows (constraints.txt not used)"
else
    echo "[setup] installing the versions pinned in constraints.txt (MEDCL_PINNED=0 lifts the pins)"
    PINS=(-c constraints.txt)
fi
source scripts/venv_with_torch.sh
venv_with_torch "$VENV" "${PINS[@]}"
echo "[setup] installing medcl (editable) with its dependencies into $VENV"
"${PIP[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import torch, monai, medcl; print(f'[setup] ready: torch {torch.__version__}, monai {monai.__version__}, medcl {medcl.__version__}')"
