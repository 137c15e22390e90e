#!/usr/bin/env bash
# The whole GPU verification in one call, < 9 minutes on one H200, ending with a JSON summary (dev/gpu_check.py
# says what it checks). It runs on the machine's own python3 and CUDA torch, with no network: what that image
# lacks comes as wheels, and the sample data as a slice, in the git-ignored .whl/ folder that
# dev/gpu_check_prepare.sh fills beforehand on a machine with network access.
#   bash dev/gpu_check_prepare.sh                 # here, once
#   bash dev/gpu_check.sh [--json PATH]           # on the GPU machine, with .whl/ carried along
#   bash dev/gpu_check.sh --cpu-dry-run           # the same Python parts on a CPU at tiny sizes (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu-dry-run" ]; then
    PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
else
    PY=python3
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m dev.gpu_check "$@"
