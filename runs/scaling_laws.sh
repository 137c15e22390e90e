#!/usr/bin/env bash
# isoFLOP sweep: for each compute budget, train several depths with exactly that many FLOPs
# (base_train --target-flops picks the number of steps), then write one CSV row per run:
# flops budget, depth, parameter counts, tokens, val bpb, CORE. The optimum per budget gives the
# compute-optimal tokens:params ratio.
#   FLOPS="1e18 3e18 1e19" DEPTHS="8 10 12 14 16" bash runs/scaling_laws.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/torchrun.sh  # $TORCHRUN: NPROC GPUs here, and NNODES/NODE_RANK/MASTER_ADDR for several nodes
FLOPS="${FLOPS:-1e18 3e18 1e19}"
DEPTHS="${DEPTHS:-8 10 12 14 16}"
export OMP_NUM_THREADS=1
bash runs/setup.sh
source .venv/bin/activate
TAGS=""; BUDGETS=""
for f in $FLOPS; do
    for d in $DEPTHS; do
        tag="iso_${f}_d$d"
        $TORCHRUN -m scripts.base_train -- --depth=$d --target-flops=$f \
            --model-tag=$tag --eval-every=0 --core-metric-every=-1 --sample-every=-1  # val bpb only at the end
        $TORCHRUN -m scripts.base_eval -- -g $tag --max-per-task=500
        TAGS="$TAGS $tag"; BUDGETS="$BUDGETS $f"
    done
done
python -m dev.collect_runs --tags $TAGS --flops $BUDGETS --out scaling_laws.csv
