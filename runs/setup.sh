#!/usr/bin/env bash
# Create/refresh the project's virtualenv (.venv) and install nanochat into it, with the torch build this
# machine can run (a bare `pip install torch` gives a CUDA 13 build, which a GPU node with an older driver
# cannot use and a CPU-only machine does not need):
#   no NVIDIA GPU         -> the CPU build
#   driver >= 580         -> PyPI's build of torch $TORCH_VERSION (CUDA 13.0, which needs a 580+ driver)
#   driver 525 .. 579     -> the CUDA 12.8 build of the same version from PyTorch's own index: CUDA 12.x runs
#                            on any 525+ driver through CUDA's minor-version compatibility
#   older driver          -> stop: upgrade the driver
# Before installing torch it asks the index whether that build exists for this Python and machine, and stops
# with one line naming the versions there when it does not. On a GPU node it replaces a CPU build it finds in
# .venv and stops if torch still cannot see the GPU. On Hopper (H100/H200) it fetches FlashAttention-3 into
# the local cache, where training loads it from, and stops when FA3 does not load (NANOCHAT_ALLOW_NO_FA3=1:
# go on with the slower FlexAttention). WANDB_RUN=<name> (anything but dummy) adds wandb and checks that
# this machine can log to it, rather than failing in the first training stage 15-20 minutes in.
#   bash runs/setup.sh --dry-run     # print the torch decision, install nothing
# Environment: PYTHON (makes the venv; default python3), NANOCHAT_TORCH_VERSION, NANOCHAT_TORCH_INDEX (a
# mirror to take torch from), NANOCHAT_EXTRAS. Safe to re-run: it installs nothing when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${NANOCHAT_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${NANOCHAT_EXTRAS:-dev,hf}"  # hf: the export to transformers, which the tests check
WANDB="${WANDB_RUN:-dummy}"
[ "$WANDB" != dummy ] && EXTRAS="$EXTRAS,wandb"
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
fail() { echo "setup: FAILED: $*" >&2; exit 1; }

# The first GPU's driver version and compute capability, e.g. "580.95.05, 9.0"; empty without a working GPU.
gpu_info="$(nvidia-smi --query-gpu=driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" || gpu_info=""
driver="$(echo "${gpu_info%%,*}" | tr -d ' ')"
compute_cap="$(echo "${gpu_info#*,}" | tr -d ' ')"
driver_major="${driver%%.*}"
# TORCH_WHEEL: the exact version the index lists for that build; TORCH_INDEX empty: pip's configured sources (PyPI)
if [[ "$driver_major" =~ ^[0-9]+$ ]]; then
    EXTRAS="$EXTRAS,gpu"  # FA3 kernels on Hopper
    if [ "$driver_major" -ge 580 ]; then
        TORCH_CUDA="13.0"; TORCH_INDEX=""; TORCH_WHEEL="$TORCH_VERSION"
    elif [ "$driver_major" -ge 525 ]; then
        TORCH_CUDA="12.8"; TORCH_INDEX="https://download.pytorch.org/whl/cu128"; TORCH_WHEEL="$TORCH_VERSION+cu128"
    else
        echo "setup: NVIDIA driver $driver is too old for any current torch CUDA build (they need 525+):" \
             "upgrade the driver (580+ runs PyPI's default CUDA 13 build)" >&2
        exit 1
    fi
    TORCH_INDEX="${NANOCHAT_TORCH_INDEX:-$TORCH_INDEX}"
    echo "setup: NVIDIA GPU (driver $driver, compute capability $compute_cap) -> torch $TORCH_VERSION for CUDA $TORCH_CUDA" \
         "from ${TORCH_INDEX:-PyPI}"
else
    TORCH_CUDA="cpu"; TORCH_INDEX="${NANOCHAT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"; TORCH_WHEEL="$TORCH_VERSION+cpu"
    echo "setup: no NVIDIA GPU -> CPU build of torch $TORCH_VERSION"
fi
[ "$DRY_RUN" = 1 ] && exit 0

# The venv. Debian and Ubuntu ship python3 without ensurepip unless python3-venv is installed; there
# `python3 -m venv` stops halfway and leaves a .venv without pip. Then uv makes it (when it is on PATH), or
# a venv made without pip fetches pip's own wheel from the package index and lets it install itself.
venv_has_pip() { .venv/bin/python -m pip --version >/dev/null 2>&1; }
make_venv() {
    command -v "$PYTHON" >/dev/null || fail "no $PYTHON here: install Python >= 3.10, or name one: PYTHON=python3.12 bash $0"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || fail "nanochat needs Python >= 3.10, and $PYTHON is $("$PYTHON" -V 2>&1): name another, e.g. PYTHON=python3.12 bash $0"
    "$PYTHON" -m venv .venv >/dev/null 2>&1 && venv_has_pip && return
    rm -rf .venv
    if command -v uv >/dev/null 2>&1; then
        echo "setup: $PYTHON -m venv failed (no python3-venv?) -> uv venv --seed"
        uv venv --seed --python "$(command -v "$PYTHON")" .venv && venv_has_pip && return
        rm -rf .venv
    fi
    local index="${PIP_INDEX_URL:-https://pypi.org/simple}"
    echo "setup: $PYTHON -m venv failed (no python3-venv?) -> a venv without pip, and pip's wheel from $index"
    if "$PYTHON" -m venv --without-pip .venv && .venv/bin/python - "$index" <<'PY' && venv_has_pip; then return; fi
import os, re, subprocess, sys, tempfile, urllib.parse, urllib.request
page_url = sys.argv[1].rstrip("/") + "/pip/"
try:
    page = urllib.request.urlopen(page_url, timeout=30).read().decode()
    # <a href="...pip-24.2-py3-none-any.whl#sha256=...">: the newest final release
    wheels = re.findall(r'href="([^"#]*?(pip-([0-9]+(?:\.[0-9]+)*)-py3-none-any\.whl))', page)
    href, name, _ = max(wheels, key=lambda w: tuple(map(int, w[2].split("."))))
    wheel = os.path.join(tempfile.mkdtemp(), name)
    urllib.request.urlretrieve(urllib.parse.urljoin(page_url, href), wheel)
except Exception as e:  # noqa: BLE001 - any failure: one line, and the caller names the fix
    sys.exit(f"setup: could not fetch pip from {page_url}: {type(e).__name__}: {e}")
subprocess.check_call([sys.executable, os.path.join(wheel, "pip"), "install", "--quiet", "--no-index", wheel])
PY
    rm -rf .venv
    fail "cannot make a virtualenv with $PYTHON (no ensurepip, no uv, no pip from $index). On Debian/Ubuntu:" \
         "sudo apt-get install -y $("$PYTHON" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])'), then re-run"
}
if [ -e .venv ] && ! venv_has_pip; then
    echo "setup: .venv has no working pip (an interrupted setup?): making it again"
    rm -rf .venv
fi
[ -e .venv ] || make_venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The torch wheel must exist for this Python and machine before anything is installed (an index lists only
# the builds this pip can install). The CPU build falls back to pip's own sources when PyTorch's index is
# out of reach (a machine with a mirror of PyPI only).
check_torch_wheel() {
    local listing versions python
    listing="$($PIP index versions torch ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} 2>&1)" || true
    versions="$(sed -n 's/^Available versions: //p' <<<"$listing")"
    [[ ", $versions," == *", $TORCH_WHEEL,"* ]] && return
    python="$(.venv/bin/python -c 'import platform, sys; print("Python %d.%d on %s" % (*sys.version_info[:2], platform.machine()))')"
    [ -n "$versions" ] && versions="it has $(cut -d, -f1-6 <<<"$versions")" \
        || versions="$(grep -m 1 -E 'ERROR|Error' <<<"$listing" || echo 'no answer')"
    fail "${TORCH_INDEX:-PyPI} has no torch $TORCH_WHEEL for $python ($versions)." \
         "Pick a version it has: NANOCHAT_TORCH_VERSION=<version> bash $0 (or another Python: PYTHON=...)"
}

stamp=".venv/.nanochat-installed"
want="$(sha1sum < pyproject.toml | cut -c1-16) torch=$TORCH_VERSION cuda=$TORCH_CUDA extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
else
    # "2.13.0 12.8" for a CUDA 12.8 build, "2.13.0 cpu" for a CPU build
    installed="$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda or 'cpu')" 2>/dev/null || true)"
    if [ "$installed" != "$TORCH_VERSION $TORCH_CUDA" ]; then
        if [ "$TORCH_CUDA" = cpu ] && [ -z "${NANOCHAT_TORCH_INDEX:-}" ] \
           && ! .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$TORCH_INDEX/', timeout=5)" 2>/dev/null; then
            echo "setup: the PyTorch CPU index is unreachable -> torch==$TORCH_VERSION via pip's configured sources"
            TORCH_INDEX=""; TORCH_WHEEL="$TORCH_VERSION"
        fi
        check_torch_wheel
        # pip counts 2.13.0+cpu as satisfying torch==2.13.0: remove the wrong build first, or it would stay
        [ -n "$installed" ] && $PIP uninstall -y torch
        $PIP install "torch==$TORCH_WHEEL" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
    fi
    $PIP install -e ".[$EXTRAS]"
    if [ "$TORCH_CUDA" != "cpu" ] && ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        fail "torch $TORCH_VERSION (CUDA $TORCH_CUDA) is installed but cannot use the GPU (driver $driver)." \
             "Check that nvidia-smi works and the driver matches; see the table at the top of runs/setup.sh"
    fi
    echo "$want" > "$stamp"
fi

# Hopper: FA3 from the Hugging Face hub into the local cache (later loads read only the cache), checked on
# every run, since a training run without it is silently slower.
if [ "$TORCH_CUDA" != "cpu" ] && [ "${compute_cap%%.*}" = 9 ]; then
    fa3="$(.venv/bin/python -c 'import sys, nanochat.flash_attention as fa; print(fa.fa3_status(), file=sys.stderr)' 2>&1 >/dev/null | tail -n 1)" || true
    if [ "$fa3" = loaded ]; then
        echo "setup: FA3 loaded (in the local Hugging Face cache from now on)"
    elif [ "${NANOCHAT_ALLOW_NO_FA3:-0}" = 1 ]; then
        echo "setup: FA3 did not load ($fa3); going on without it (NANOCHAT_ALLOW_NO_FA3=1): attention runs on FlexAttention, slower"
    else
        fail "FA3 did not load on this Hopper GPU ($fa3), and training would run on the slower FlexAttention." \
             "Fix that, or go on without FA3: NANOCHAT_ALLOW_NO_FA3=1 bash <the same script>"
    fi
fi

# wandb: a logged-in machine (an API key), unless wandb runs offline
if [ "$WANDB" != dummy ] && [ "${WANDB_MODE:-online}" != offline ] && [ "${WANDB_MODE:-online}" != disabled ]; then
    .venv/bin/python -c '
import sys, wandb
try:
    ok = wandb.login(prompt=False, verify=False)  # True when an API key is configured; never prompts
except TypeError:  # a wandb from before login(prompt=...)
    ok = bool(wandb.api.api_key)
sys.exit(0 if ok else 1)' >/dev/null 2>&1 \
    || fail "WANDB_RUN=$WANDB logs to wandb, but this machine has no wandb API key: run .venv/bin/wandb login" \
            "(or export WANDB_API_KEY=..., or WANDB_MODE=offline), or leave WANDB_RUN unset"
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
