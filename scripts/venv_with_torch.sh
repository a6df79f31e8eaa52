# Sourced by the set-up scripts: venv_with_cpu_torch VENV creates (or reuses) a virtual environment and installs
# torch==2.13.0 first when torch is missing (a CPU build on these machines; installing it first keeps later installs
# from pulling several GB of CUDA packages). Sets PIP to that environment's quiet `pip install`.
venv_with_cpu_torch() {
    local venv="$1"
    if [ ! -x "$venv/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    PIP=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing torch==2.13.0 into $venv"
        "${PIP[@]}" "torch==2.13.0"
    fi
}
