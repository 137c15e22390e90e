#!/usr/bin/env bash
# Fill the git-ignored .whl/ folder that dev/gpu_check.sh needs on a GPU machine without network access (the
# lent H200: Python 3.12, its own CUDA torch, most packages preinstalled): wheels of what its image lacks, and
# a slice of the sample data (4 training shards + the validation shard) to train a tokenizer and base_train on.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${NANOCHAT_DATA_DIR:-../shared/data}"
mkdir -p .whl/data/pretrain
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "rustbpe==0.1.0"  # tokenizer training (everything else nanochat imports is in that image)
shards=("$DATA"/pretrain/shard_*.parquet)
cp -f "${shards[@]:0:4}" "${shards[-1]}" .whl/data/pretrain/  # the last shard is the validation split
du -sh .whl
