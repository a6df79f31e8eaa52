#!/usr/bin/env bash
# Set everything up, then run the CPU demo: phantom -> training runs -> Dice table.
#
# The demo's numbers depend on which CPU kernels do the arithmetic, not only on package versions: float sums done
# in a different order round differently, and over 400 training iterations such differences grow into a different
# Dice. Measured on an AVX-512 Xeon (README.md, "What the demo measured"): oneDNN's instruction set, MKL's code
# path and the thread count each change the result; a repeated run with the same settings is bit-identical. So the
# kernels are pinned below to what every x86-64 machine of the last decade has (AVX2), and the threads to 2. Each
# setting can be overridden from the environment (e.g. ONEDNN_MAX_CPU_ISA=ALL bash scripts/demo.sh). The demo
# prints what is in use at its start.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEDCL_VENV:-.venv}"
# torch's own vectorised kernels (reductions, activations): AVX2 (no effect measured on the demo's model; pinned
# for the operations whose AVX-512 and AVX2 kernels do differ).
export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}"
# MKL's conditional numerical reproducibility: the same code path (AVX2) whatever the CPU (changes gradients).
export MKL_CBWR="${MKL_CBWR:-AVX2}"
# oneDNN (torch's CPU convolutions): AVX2 code at most, also on AVX-512 CPUs. This one changes the loss itself:
# without it, a machine with AVX-512 and one without compute different numbers.
export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"
# numpy's OpenBLAS: one kernel family whatever the CPU (some machines set this variable; the phantom was measured
# identical under Haswell and Prescott, so this is a precaution).
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
# Threads: a parallel reduction splits its sum by thread, so the thread count is part of the result. (The number of
# data-loader workers is too: it is a demo.py setting, 2 by default; a repeated run is bit-identical.)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
exec "$VENV/bin/python" scripts/demo.py "$@"
