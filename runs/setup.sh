#!/usr/bin/env bash
# Create/refresh the project's virtualenv (.venv) and install nanochat into it, with the torch build this
# machine can run (a bare `pip install torch` gives a CUDA 13 build, which a GPU node with an older driver
# cannot use and a CPU-only machine does not need):
#   no NVIDIA GPU         -> the CPU build
#   driver >= 580         -> PyPI's build of torch $TORCH_VERSION (CUDA 13.0, which needs a 580+ driver)
#   driver 525 .. 579     -> the CUDA 12.8 build of the same version from PyTorch's own index: CUDA 12.x runs
#                            on any 525+ driver through CUDA's minor-version compatibility
#   older driver          -> stop: upgrade the driver
# On a GPU node it replaces a CPU build it finds in .venv, fails loudly if torch still cannot see the GPU,
# and on Hopper fetches the FA3 kernels once (later runs load them from the local cache).
#   bash runs/setup.sh --dry-run     # print the decision, install nothing
# Safe to re-run: it does nothing when nothing changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${NANOCHAT_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${NANOCHAT_EXTRAS:-dev,hf}"  # hf: the export to transformers, which the tests check
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1

# The first GPU's driver version and compute capability, e.g. "580.95.05, 9.0"; empty without a working GPU.
gpu_info="$(nvidia-smi --query-gpu=driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" || gpu_info=""
driver="$(echo "${gpu_info%%,*}" | tr -d ' ')"
compute_cap="$(echo "${gpu_info#*,}" | tr -d ' ')"
driver_major="${driver%%.*}"
TORCH_INDEX=""  # empty: pip's configured sources (PyPI)
if [[ "$driver_major" =~ ^[0-9]+$ ]]; then
    EXTRAS="$EXTRAS,gpu"  # FA3 kernels on Hopper
    if [ "$driver_major" -ge 580 ]; then
        TORCH_CUDA="13.0"
    elif [ "$driver_major" -ge 525 ]; then
        TORCH_CUDA="12.8"
        TORCH_INDEX="https://download.pytorch.org/whl/cu128"
    else
        echo "setup: NVIDIA driver $driver is too old for any current torch CUDA build (they need 525+):" \
             "upgrade the driver (580+ runs PyPI's default CUDA 13 build)" >&2
        exit 1
    fi
    echo "setup: NVIDIA GPU (driver $driver, compute capability $compute_cap) -> torch $TORCH_VERSION for CUDA $TORCH_CUDA" \
         "from ${TORCH_INDEX:-PyPI}"
else
    TORCH_CUDA="cpu"
    echo "setup: no NVIDIA GPU -> CPU build of torch $TORCH_VERSION"
fi
[ "$DRY_RUN" = 1 ] && exit 0

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp=".venv/.nanochat-installed"
want="$(sha1sum < pyproject.toml | cut -c1-16) torch=$TORCH_VERSION cuda=$TORCH_CUDA extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

# "2.13.0 12.8" for a CUDA 12.8 build, "2.13.0 cpu" for a CPU build
installed="$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda or 'cpu')" 2>/dev/null || true)"
if [ "$installed" != "$TORCH_VERSION $TORCH_CUDA" ]; then
    # pip counts 2.13.0+cpu as satisfying torch==2.13.0: remove the wrong build first, or it would stay
    [ -n "$installed" ] && $PIP uninstall -y torch
    if [ "$TORCH_CUDA" != "cpu" ]; then
        $PIP install "torch==$TORCH_VERSION" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
    elif .venv/bin/python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
        $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else
        # No route to the PyTorch index (e.g. a mirror of PyPI only): take what pip finds (a local
        # CPU wheel on machines that provide one through pip's find-links).
        echo "setup: the PyTorch CPU index is unreachable -> torch==$TORCH_VERSION via pip's configured sources"
        $PIP install "torch==$TORCH_VERSION"
    fi
fi

$PIP install -e ".[$EXTRAS]"
if [ "$TORCH_CUDA" != "cpu" ]; then
    if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "setup: FAILED: torch $TORCH_VERSION (CUDA $TORCH_CUDA) is installed but cannot use the GPU (driver $driver)." \
             "Check that nvidia-smi works and the driver matches; see the table at the top of runs/setup.sh" >&2
        exit 1
    fi
    if [ "${compute_cap%%.*}" = 9 ]; then  # Hopper: fetch FA3 now (its one printed line says whether it loaded)
        .venv/bin/python -c "import nanochat.flash_attention as fa; fa.HAS_FA3"
    fi
fi
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
