#!/usr/bin/env bash
# The ~$1000 tier: a d32 model (2048 wide, ~1.9B parameters) on one 8xH100 node, about 40 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/torchrun.sh  # $TORCHRUN: NPROC GPUs here, and NNODES/NODE_RANK/MASTER_ADDR for several nodes

WANDB_RUN="${WANDB_RUN:-dummy}"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

bash runs/setup.sh
source .venv/bin/activate
# Re-running after a crash continues the run, as in speedrun.sh
skip_or_resume() { python -m nanochat.pipeline "$@"; }
if main_node && [ ! -e "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then python -m nanochat.report reset; fi

# Shards: d32 scaling params = 32 x 12 x 2048^2 + 32768 x 2048 = 1.68B; x 12 tokens/param (the default
# ratio) = 20.2B tokens ~ 97B chars ~ 390 shards of text, ~600 read with the ~35% best-fit crop; 650 for headroom.
if main_node; then
    python -m nanochat.dataset -n 8 --source climbmix
    python -m nanochat.dataset -n 650 --source climbmix &
    DATASET_DOWNLOAD_PID=$!
    skip_or_resume tok - python -m scripts.tok_train --max-chars=4000000000 --vocab-size=32768
    skip_or_resume --evaluates tok - python -m scripts.tok_eval
    wait $DATASET_DOWNLOAD_PID
    python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"
fi

# d32 activations at 32 rows x 2048 do not fit next to the optimizer state on 80 GB: 16 rows, and the
# automatic 2^21 tokens per step through gradient accumulation (8 steps). --fp8 as in the speedrun.
skip_or_resume base d32 $TORCHRUN -m scripts.base_train -- --depth=32 --device-batch-size=16 --fp8 \
    --save-every=2000 --device-type=cuda --run=$WANDB_RUN
skip_or_resume --evaluates base d32 $TORCHRUN -m scripts.base_loss -- -g d32 --device-batch-size=16 --device-type=cuda
skip_or_resume --evaluates base d32 $TORCHRUN -m scripts.base_eval -- -g d32 --device-type=cuda
skip_or_resume sft d32 $TORCHRUN -m scripts.chat_sft -- --save-every=200 --device-type=cuda \
    --run=$WANDB_RUN  # 16 rows, as the base run
skip_or_resume --evaluates sft d32 $TORCHRUN -m scripts.chat_eval -- -i sft -g d32 --device-type=cuda
if main_node; then python -m nanochat.report generate; fi
