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
python -m nanochat.report reset

# How many shards: d20 is 1280 wide with a 32768 vocab, so its scaling parameters are
# 20 layers x 12 x 1280^2 (transformer matrices, 393M) + 32768 x 1280 (lm_head, 42M) = 435M.
# At the default 10.5 tokens per parameter it trains on 4.57B tokens. The tokenizer gives ~4.8 chars
# per token on FineWeb-Edu, i.e. ~22B chars, and each shard holds ~250M chars: 88 shards of text fed
# to the model. Best-fit packing crops ~35% of the tokens it reads, so ~135 shards are read; 160 leaves
# headroom (each shard is ~100 MB). The first 8 are fetched now for the tokenizer, the rest in the
# background while the tokenizer trains.
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 160 &
DATASET_DOWNLOAD_PID=$!

python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
python -m scripts.tok_eval

echo "Waiting for the shard download to finish..."
wait $DATASET_DOWNLOAD_PID

torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=20 --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval

# identity conversations teach the model who it is (SFT reads them)
curl -fsSL -o "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl

torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft

# optional: reinforcement learning on GSM8K (uncomment; ~+1.5 h)
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_rl -- --run=$WANDB_RUN
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i rl -a GSM8K

python -m nanochat.report generate
