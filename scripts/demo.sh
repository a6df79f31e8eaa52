#!/usr/bin/env bash
# Set everything up, then run the CPU demo: phantom -> training runs -> Dice table.
#
# The demo's numbers depend on which CPU kernels do the arithmetic, not only on package versions: torch picks its
# vectorised kernels by the CPU's capability (AVX-512 where the CPU has it, else AVX2), and float sums done in a
# different order round differently; over 400 training iterations such differences grow into a different Dice.
# So the kernels and thread counts are pinned below, to what every x86-64 machine of the last decade has. Each
# setting can be overridden from the environment (e.g. ATEN_CPU_CAPABILITY=default bash scripts/demo.sh). The demo
# prints what is in use at its start. See README.md, "What the demo measured".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEDCL_VENV:-.venv}"
# torch's own vectorised CPU kernels (convolutions' im2col, reductions, activations): AVX2, also on AVX-512 CPUs.
export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}"
# MKL's conditional numerical reproducibility: the same code path (AVX2) whatever the CPU.
export MKL_CBWR="${MKL_CBWR:-AVX2}"
# oneDNN (torch's CPU convolutions): generate AVX2 code at most, also on AVX-512 CPUs.
export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"
# numpy's OpenBLAS: one kernel family whatever the CPU (some machines set this variable to something else).
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
# Threads: a parallel reduction splits its sum by thread, so the thread count is part of the result.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
exec "$VENV/bin/python" scripts/demo.py "$@"
