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
# Re-running this script after a crash continues the run: every step goes through the pipeline runner
# (python -m nanochat.pipeline), which skips a stage that finished, resumes one that was interrupted from its
# last checkpoint, and skips an evaluation of a result it evaluated before. The report is kept.
skip_or_resume() { python -m nanochat.pipeline "$@"; }
if main_node && [ ! -e "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then python -m nanochat.report reset; fi

# How many shards: d24 is 1536 wide with a 32768 vocab, so its scaling parameters are
# 24 layers x 12 x 1536^2 (transformer matrices, 679M) + 32768 x 1536 (lm_head, 50M) = 730M.
# At 8 tokens per parameter it trains on 5.8B tokens. At ~4.8 chars per token that is ~28B chars, and
# each shard holds ~250M chars: ~112 shards of text fed to the model. Best-fit packing crops up to ~35%
# of the tokens it reads, so ~170 shards are read; 180 leaves a little headroom (past the last one the
# loader would start a second epoch). The first 8 are fetched now for the tokenizer, the rest in the
# background while the tokenizer trains.
if main_node; then
    python -m nanochat.dataset -n 8 --source climbmix
    python -m nanochat.dataset -n 180 --source climbmix &
    DATASET_DOWNLOAD_PID=$!
    skip_or_resume tok - python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
    skip_or_resume --evaluates tok - python -m scripts.tok_eval
    echo "Waiting for the shard download to finish..."
    wait $DATASET_DOWNLOAD_PID
    # identity conversations teach the model who it is (SFT reads them), fetched by the one downloader
    python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"
fi

# --device-type=cuda everywhere: a node whose torch cannot see its GPUs stops with one line instead of
# quietly training on 8 CPU processes. The batch size is automatic (2^20 tokens at d24: 16 rows x 2048 x
# 8 GPUs x 4 accumulation steps); --fp8 runs the large matmuls on the fp8 tensor cores. A checkpoint every
# 2000 of the ~5,600 steps: rank 0 writes 6.6 GB per save, ~8 s on local NVMe, ~1 min on a slow disk, and two
# saves are the compromise between those two cases (dev/LOG.md, "checkpoint cadence").
skip_or_resume base d24 $TORCHRUN -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 \
    --device-batch-size=16 --fp8 --save-every=2000 --keep-last=2 --device-type=cuda --run=$WANDB_RUN
skip_or_resume --evaluates base d24 $TORCHRUN -m scripts.base_loss -- -g d24 --device-type=cuda
skip_or_resume --evaluates base d24 $TORCHRUN -m scripts.base_eval -- -g d24 --device-type=cuda

skip_or_resume sft d24 $TORCHRUN -m scripts.chat_sft -- --save-every=200 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
skip_or_resume --evaluates sft d24 $TORCHRUN -m scripts.chat_eval -- -i sft -g d24 --device-type=cuda

# optional: reinforcement learning on GSM8K (uncomment; ~+1.5 h)
# skip_or_resume rl d24 $TORCHRUN -m scripts.chat_rl -- --save-every=60 --keep-last=2 \
#     --device-type=cuda --run=$WANDB_RUN
# skip_or_resume --evaluates rl d24 $TORCHRUN -m scripts.chat_eval -- -i rl -g d24 -a GSM8K --device-type=cuda

if main_node; then python -m nanochat.report generate; fi
