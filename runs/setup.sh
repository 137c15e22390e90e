#!/usr/bin/env bash
# Create/refresh the project's virtualenv (.venv) and install nanochat into it.
# Picks the torch build for this machine: CUDA wheels when an NVIDIA GPU is present, else the CPU
# wheel (a bare `pip install torch` on Linux pulls a multi-GB CUDA build even on machines without one).
# Safe to re-run: it does nothing when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${NANOCHAT_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${NANOCHAT_EXTRAS:-dev}"
HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    HAS_GPU=1
    EXTRAS="$EXTRAS,gpu"  # FA3 kernels on Hopper
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp=".venv/.nanochat-installed"
want="$(cat pyproject.toml | sha1sum | cut -c1-16) torch=$TORCH_VERSION extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    if [ "$HAS_GPU" = 1 ]; then
        echo "setup: NVIDIA GPU found -> CUDA build of torch $TORCH_VERSION"
        $PIP install "torch==$TORCH_VERSION"
    elif .venv/bin/python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
        echo "setup: no NVIDIA GPU -> CPU build of torch $TORCH_VERSION from the PyTorch CPU index"
        $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else
        # No route to the PyTorch index (e.g. a mirror of PyPI only): take what pip finds (a local
        # CPU wheel on machines that provide one through pip's find-links).
        echo "setup: no NVIDIA GPU and the PyTorch CPU index is unreachable -> torch==$TORCH_VERSION via pip's configured sources"
        $PIP install "torch==$TORCH_VERSION"
    fi
fi

$PIP install -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
