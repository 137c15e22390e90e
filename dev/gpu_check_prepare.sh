#!/usr/bin/env bash
# Fill the git-ignored .whl/ folder that dev/gpu_check.sh needs on a GPU machine without network access (a lent
# H100/H200: its own Python and CUDA torch, most packages preinstalled). Here, with network access:
#   - rustbpe (which nanochat/tokenizer.py imports) for CPython 3.10-3.13 on x86-64 Linux: whichever Python
#     that machine has, gpu_check unpacks the matching wheel (no pip needed there);
#   - a 32768-token tokenizer trained here on the repo's embedded sample (data/), so the GPU's time goes to
#     the checks. The carried folder stays a few MB (the `run` tool's limit: 64 MiB with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
rm -rf .whl && mkdir -p .whl
for version in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "rustbpe==0.1.0"
done
NANOCHAT_BASE_DIR="$PWD/.whl" NANOCHAT_DATA_DIR="$PWD/data" "$PY" -m scripts.tok_train --max-chars=20000000 --vocab-size=32768
rm -rf .whl/report
ls .whl && du -sh .whl
