#!/usr/bin/env bash
# A miniseries: the same recipe at several depths, each at the default tokens:params ratio, on one
# 8xH100 node. Plots of val bpb / CORE against compute come from the CSV it writes.
#   DEPTHS="10 12 14 16 18 20" bash runs/miniseries.sh
# Needs shards and a tokenizer (the first half of runs/speedrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/torchrun.sh  # $TORCHRUN: NPROC GPUs here, and NNODES/NODE_RANK/MASTER_ADDR for several nodes
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
export OMP_NUM_THREADS=1
bash runs/setup.sh
source .venv/bin/activate
TAGS=""
for d in $DEPTHS; do
    tag="mini_d$d"
    $TORCHRUN -m scripts.base_train -- --depth=$d --model-tag=$tag --core-metric-every=-1 --sample-every=-1
    $TORCHRUN -m scripts.base_eval -- -g $tag --max-per-task=500
    TAGS="$TAGS $tag"
done
python -m dev.collect_runs --tags $TAGS --out miniseries.csv
