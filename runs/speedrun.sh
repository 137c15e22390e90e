#!/usr/bin/env bash
# The flagship: train a d24 ChatGPT from scratch on one 8xH100 node. Pretraining with this recipe reaches
# GPT-2's CORE (0.2565) in about 1.65 hours (upstream nanochat's measurement, mean of 5 runs: CORE 0.2626);
# SFT and the evaluations follow.
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
# checkpoint (`skip_or_resume`: python -m nanochat.pipeline STAGE MODEL_TAG COMMAND...).
skip_or_resume() { python -m nanochat.pipeline "$@"; }
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
# 8 GPUs x 4 accumulation steps); --fp8 runs the large matmuls on the fp8 tensor cores.
skip_or_resume base d24 torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 \
    --device-batch-size=16 --fp8 --save-every=2000 --keep-last=2 --device-type=cuda --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss -- --device-type=cuda
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --device-type=cuda

# identity conversations teach the model who it is (SFT reads them), fetched by the one downloader
python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"

skip_or_resume sft d24 torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --save-every=200 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft --device-type=cuda

# optional: reinforcement learning on GSM8K (uncomment; ~+1.5 h)
# skip_or_resume rl d24 torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_rl -- --save-every=60 --keep-last=2 \
#     --device-type=cuda --run=$WANDB_RUN
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i rl -a GSM8K --device-type=cuda

python -m nanochat.report generate
