#!/usr/bin/env bash
# The flagship: train a d20 ChatGPT from scratch on one 8xH100 node in about 3 hours (~$100 at ~$24/h).
#   bash runs/speedrun.sh                      # or: WANDB_RUN=speedrun bash runs/speedrun.sh
# Talk to the result afterwards: python -m scripts.chat_web  (open http://<node>:8000)
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC="${NPROC:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"   # any other name logs to wandb (run `wandb login` first)
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

bash runs/setup.sh
source .venv/bin/activate
# Re-running this script after a crash continues the run: the report so far and the tokenizer the model
# trained with are kept, and each training stage is skipped when it finished or resumed from its last
# checkpoint (`stage`: python -m nanochat.checkpoint_manager STAGE MODEL_TAG COMMAND...).
stage() { python -m nanochat.checkpoint_manager "$@"; }
RERUN=0; [ -d "$NANOCHAT_BASE_DIR/base_checkpoints/d20" ] && RERUN=1
[ $RERUN = 1 ] || python -m nanochat.report reset

# How many shards: d20 is 1280 wide with a 32768 vocab, so its scaling parameters are
# 20 layers x 12 x 1280^2 (transformer matrices, 393M) + 32768 x 1280 (lm_head, 42M) = 435M.
# At 20 tokens per parameter (Chinchilla) it trains on 8.7B tokens. The tokenizer gives ~4.8 chars per
# token on FineWeb-Edu, i.e. ~42B chars, and each shard holds ~250M chars: 167 shards of text fed to the
# model. Best-fit packing crops up to ~35% of the tokens it reads, so ~260 shards are read; 370 leaves
# headroom for a worse crop or chars/token (each shard is ~100 MB; past the last one the loader would
# start a second epoch). The first 8 are fetched now for the tokenizer, the rest in the background
# while the tokenizer trains.
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 370 &
DATASET_DOWNLOAD_PID=$!

[ $RERUN = 1 ] || python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
[ $RERUN = 1 ] || python -m scripts.tok_eval

echo "Waiting for the shard download to finish..."
wait $DATASET_DOWNLOAD_PID

# --device-type=cuda everywhere: a node whose torch cannot see its GPUs stops with one line instead of
# quietly training on 8 CPU processes.
stage base d20 torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=20 --target-param-data-ratio=20 \
    --save-every=2000 --keep-last=2 --device-type=cuda --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss -- --device-type=cuda
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --device-type=cuda

# identity conversations teach the model who it is (SFT reads them)
curl -fsSL -o "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl

stage sft d20 torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --save-every=200 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft --device-type=cuda

# optional: reinforcement learning on GSM8K (uncomment; ~+1.5 h)
# stage rl d20 torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_rl -- --save-every=60 --keep-last=2 \
#     --device-type=cuda --run=$WANDB_RUN
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i rl -a GSM8K --device-type=cuda

python -m nanochat.report generate
