#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install medcl into it.
# torch==2.13.0 goes in first when torch is missing: on these machines it is a CPU build,
# and installing it first keeps `pip install -e .` from pulling several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDCL_VENV:-.venv}"
source scripts/venv_with_cpu_torch.sh
venv_with_cpu_torch "$VENV"
echo "[setup] installing medcl (editable) with its dependencies into $VENV"
"${PIP[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import torch, monai, medcl; print(f'[setup] ready: torch {torch.__version__}, monai {monai.__version__}, medcl {medcl.__version__}')"
