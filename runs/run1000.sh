#!/usr/bin/env bash
# The ~$1000 tier: a d32 model (2048 wide, ~1.9B parameters) on one 8xH100 node, about 40 hours.
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC="${NPROC:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

bash runs/setup.sh
source .venv/bin/activate
# Re-running after a crash continues the run, as in speedrun.sh
skip_or_resume() { python -m nanochat.pipeline "$@"; }
RERUN=0; [ -d "$NANOCHAT_BASE_DIR/base_checkpoints/d32" ] && RERUN=1
[ $RERUN = 1 ] || python -m nanochat.report reset

# Shards: d32 scaling params = 32 x 12 x 2048^2 + 32768 x 2048 = 1.68B; x 12 tokens/param (the default
# ratio) = 20.2B tokens ~ 97B chars ~ 390 shards of text, ~600 read with the ~35% best-fit crop; 650 for headroom.
python -m nanochat.dataset -n 8 --source climbmix
python -m nanochat.dataset -n 650 --source climbmix &
DATASET_DOWNLOAD_PID=$!
[ $RERUN = 1 ] || python -m scripts.tok_train --max-chars=4000000000 --vocab-size=32768
[ $RERUN = 1 ] || python -m scripts.tok_eval
wait $DATASET_DOWNLOAD_PID

# d32 activations at 32 rows x 2048 do not fit next to the optimizer state on 80 GB: 16 rows, and the
# automatic 2^21 tokens per step through gradient accumulation (8 steps). --fp8 as in the speedrun.
skip_or_resume base d32 torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=32 --device-batch-size=16 --fp8 \
    --save-every=2000 --device-type=cuda --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss -- --device-batch-size=16 --device-type=cuda
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --device-type=cuda

python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"
skip_or_resume sft d32 torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --save-every=200 --device-type=cuda \
    --run=$WANDB_RUN  # 16 rows, as the base run
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft --device-type=cuda
python -m nanochat.report generate
