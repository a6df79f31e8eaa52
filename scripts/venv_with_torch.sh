# Sourced by the set-up scripts (setup.sh, setup_monailabel.sh, setup_runtime_venv.sh).
#
#   venv_with_torch VENV [PIP-ARGS...]
#
# creates (or reuses) the virtual environment VENV, sets PIP to its quiet `pip install` followed by PIP-ARGS (the
# callers pass `-c <constraints file>` there), and, when VENV has no torch yet, installs torch $MEDCL_TORCH_VERSION
# first, so that later installs keep it instead of choosing a torch build themselves. Which build, and why, is
# printed; so is what got installed (torch.__version__ and torch.version.cuda).
#
# The build is chosen with MEDCL_TORCH:
#   auto (default)  cuda when `nvidia-smi` runs successfully (an NVIDIA driver and GPU are present), else cpu.
#   cuda            torch==2.13.0 from the configured indexes (PyPI). PyPI's Linux wheel of torch is the CUDA build:
#                   it brings triton and about 15 nvidia-* packages, several GB in all.
#   cpu             torch==2.13.0+cpu, the CPU-only build (a ~190 MB wheel, no nvidia-* packages). PyPI does not
#                   have it; PyTorch publishes it on its own index. pip is first asked, quietly and without
#                   installing (--dry-run --no-deps), whether the sources it is already configured with have it
#                   (a local mirror, or a find-links folder holding the wheel); if they do, it comes from there and
#                   no other index is contacted. Only otherwise is $MEDCL_TORCH_CPU_INDEX (default
#                   https://download.pytorch.org/whl/cpu) added as an extra index for the torch install (extra, not
#                   instead: torch's own dependencies, pinned in the constraints, still come from PyPI; the +cpu
#                   version exists only on PyTorch's index). Where that index cannot be reached pip retries it 5
#                   times (measured: about 9 s when its host name does not resolve) and then stops with its own
#                   "Could not find a version" error; set MEDCL_TORCH_CPU_INDEX to a mirror you can reach.
# A torch already in VENV is kept whatever MEDCL_TORCH says (remove the venv to change the build).
MEDCL_TORCH_VERSION="${MEDCL_TORCH_VERSION:-2.13.0}"

# medcl_torch_build: prints the build MEDCL_TORCH stands for here (cpu or cuda); a bad value: a message, status 2.
medcl_torch_build() {
    case "${MEDCL_TORCH:-auto}" in
        cpu|cuda) echo "${MEDCL_TORCH}" ;;
        auto)
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then echo cuda; else echo cpu; fi ;;
        *) echo "[setup] MEDCL_TORCH must be auto, cpu or cuda (got '${MEDCL_TORCH}')" >&2; return 2 ;;
    esac
}

venv_with_torch() {
    local venv="$1"; shift
    if [ ! -x "$venv/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    PIP=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@")
    if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] keeping the torch already in $venv: $("$venv/bin/python" -W ignore -c 'import torch; print(torch.__version__ + ",", f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build")')"
        return 0
    fi
    local build why
    build="$(medcl_torch_build)" || return 2
    case "${MEDCL_TORCH:-auto}" in
        auto) if [ "$build" = cuda ]; then why="MEDCL_TORCH=auto and nvidia-smi found a GPU"
              else why="MEDCL_TORCH=auto and no working nvidia-smi (no NVIDIA GPU/driver)"; fi ;;
        *) why="MEDCL_TORCH=$build" ;;
    esac
    if [ "$build" = cuda ]; then
        echo "[setup] installing torch==$MEDCL_TORCH_VERSION, the CUDA build from PyPI (with triton and nvidia-* packages, several GB), into $venv ($why)"
        "${PIP[@]}" "torch==$MEDCL_TORCH_VERSION"
    else
        local spec="torch==$MEDCL_TORCH_VERSION+cpu"
        if "$venv/bin/python" -m pip install --dry-run --no-deps --quiet --disable-pip-version-check "$spec" >/dev/null 2>&1; then
            echo "[setup] installing $spec, the CPU-only build, from the configured package sources into $venv ($why)"
            "${PIP[@]}" "$spec"
        else
            local index="${MEDCL_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
            echo "[setup] installing $spec, the CPU-only build, from $index into $venv ($why; the configured sources do not have it)"
            "${PIP[@]}" --extra-index-url "$index" "$spec" || {
                echo "[setup] $spec could not be installed from $index (pip's messages above). Set MEDCL_TORCH_CPU_INDEX" \
                     "to an index you can reach that has it, or MEDCL_TORCH=cuda for PyPI's build." >&2
                return 1
            }
        fi
    fi
    # -W ignore: numpy is not installed yet, and torch warns about that at import
    echo "[setup] installed torch $("$venv/bin/python" -W ignore -c 'import torch; print(torch.__version__ + ",", f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build", f"(torch.version.cuda = {torch.version.cuda})")')"
    if [ "$build" = cuda ] && ! "$venv/bin/python" -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
        echo "[setup] note: pip chose a CPU-only wheel for torch==$MEDCL_TORCH_VERSION (a +cpu wheel on a configured source outranks PyPI's CUDA wheel of the same version)"
    fi
}
