#!/usr/bin/env bash
# The GPU verification (dev/gpu_check.py says what each part checks, and its time budget on one H100). It runs
# on the machine's own python (3.10-3.13) and CUDA torch, with no network: what that machine lacks (the rustbpe
# wheel for each of those Pythons, a trained tokenizer) comes in the git-ignored .whl/ folder that
# dev/gpu_check_prepare.sh fills beforehand on a machine with network access.
#   bash dev/gpu_check_prepare.sh                                     # here, once
#   bash dev/gpu_check.sh --json out.jsonl --log out.log --time-limit 450    # on the GPU machine, .whl/ carried along
#   bash dev/gpu_check.sh --only train_L,train_d12,tests,optimizer    # the parts outside the default set
#   bash dev/gpu_check.sh --cpu-dry-run                               # every part on a CPU at tiny sizes (the tests run it)
# PYTHON=... names the interpreter (default: python3 on the GPU machine, .venv/bin/python for a dry run here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu-dry-run "* ]] && [ -x .venv/bin/python ]; then
    PY="${PYTHON:-.venv/bin/python}"
else
    PY="${PYTHON:-python3}"
fi
exec "$PY" -m dev.gpu_check "$@"
