#!/usr/bin/env bash
# The flagship: train a d24 ChatGPT from scratch on one 8xH100 node. Pretraining with this recipe reaches
# GPT-2's CORE (0.2565) in about 1.65 hours (upstream nanochat's measurement, mean of 5 runs: CORE 0.2626);
# SFT and the evaluations follow.
#   bash runs/speedrun.sh                      # or: WANDB_RUN=speedrun bash runs/speedrun.sh
# Several nodes: the same command on each, with NNODES, NODE_RANK and MASTER_ADDR (runs/torchrun.sh).
# On an H100 without FA3, setup stops; NANOCHAT_ALLOW_NO_FA3=1 goes on with FlexAttention (slower).
# Talk to the result afterwards: python -m scripts.chat_web  (open http://<node>:8000)
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/torchrun.sh  # $TORCHRUN: NPROC GPUs here, and NNODES/NODE_RANK/MASTER_ADDR for several nodes

WANDB_RUN="${WANDB_RUN:-dummy}"   # any other name logs to wandb (setup installs it and checks the login)
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

bash runs/setup.sh
source .venv/bin/activate
# Re-running this script after a crash continues the run: the report so far and the tokenizer the model
# trained with are kept, and each training stage is skipped when it finished or resumed from its last
# checkpoint (`stage`: python -m nanochat.checkpoint_manager STAGE MODEL_TAG COMMAND...).
stage() { python -m nanochat.checkpoint_manager "$@"; }
RERUN=0; [ -d "$NANOCHAT_BASE_DIR/base_checkpoints/d24" ] && RERUN=1
[ $RERUN = 1 ] || python -m nanochat.report reset

# How many shards: d24 is 1536 wide with a 32768 vocab, so its scaling parameters are
# 24 layers x 12 x 1536^2 (transformer matrices, 679M) + 32768 x 1536 (lm_head, 50M) = 730M.
# At 8 tokens per parameter it trains on 5.8B tokens. At ~4.8 chars per token that is ~28B chars, and
# each shard holds ~250M chars: ~112 shards of text fed to the model. Best-fit packing crops up to ~35%
# of the tokens it reads, so ~170 shards are read; 180 leaves a little headroom (past the last one the
# loader would start a second epoch). The first 8 are fetched now for the tokenizer, the rest in the
# background while the tokenizer trains.
python -m nanochat.dataset -n 8 --source climbmix
python -m nanochat.dataset -n 180 --source climbmix &
DATASET_DOWNLOAD_PID=$!

[ $RERUN = 1 ] || python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
[ $RERUN = 1 ] || python -m scripts.tok_eval

echo "Waiting for the shard download to finish..."
wait $DATASET_DOWNLOAD_PID

# --device-type=cuda everywhere: a node whose torch cannot see its GPUs stops with one line instead of
# quietly training on 8 CPU processes. The batch size is automatic (2^20 tokens at d24: 16 rows x 2048 x
# 8 GPUs x 4 accumulation steps); --fp8 runs the large matmuls on the fp8 tensor cores. A checkpoint every
# 2000 of the ~5,600 steps: rank 0 writes 6.6 GB per save, ~8 s on local NVMe, ~1 min on a slow disk, and two
# saves are the compromise between those two cases (dev/LOG.md, "checkpoint cadence").
stage base d24 $TORCHRUN -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 \
    --device-batch-size=16 --fp8 --save-every=2000 --keep-last=2 --device-type=cuda --run=$WANDB_RUN
$TORCHRUN -m scripts.base_loss -- --device-type=cuda
$TORCHRUN -m scripts.base_eval -- --device-type=cuda

# identity conversations teach the model who it is (SFT reads them), fetched by the one downloader
python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"

stage sft d24 $TORCHRUN -m scripts.chat_sft -- --save-every=200 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
$TORCHRUN -m scripts.chat_eval -- -i sft --device-type=cuda

# optional: reinforcement learning on GSM8K (uncomment; ~+1.5 h)
# stage rl d24 $TORCHRUN -m scripts.chat_rl -- --save-every=60 --keep-last=2 \
#     --device-type=cuda --run=$WANDB_RUN
# $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K --device-type=cuda

python -m nanochat.report generate
