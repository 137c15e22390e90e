#!/usr/bin/env bash
# The speedrun's pipeline on one CUDA GPU with >= 16 GB: tokenizer, pretraining, bpb + CORE, SFT, chat eval,
# report. d12 (286M parameters; 12 tokens per scaling parameter = 1.32B tokens, 1.0e18 FLOPs) is sized for
# about an hour of pretraining on one H100 (an estimate: see README "Expected results"). The card's memory
# sets how many rows go through each forward/backward; gradient accumulation keeps the batch, and so the
# result, the same on every card: a smaller card only takes longer.
#   bash runs/single_gpu.sh            # or: WANDB_RUN=name, DEPTH=16 (~4.5e18 FLOPs: ~3.5 h on an H100, >= 40 GB)
# Talk to the result afterwards: python -m scripts.chat_web  (open http://<machine>:8000)
set -euo pipefail
cd "$(dirname "$0")/.."

DEPTH="${DEPTH:-12}"
WANDB_RUN="${WANDB_RUN:-dummy}"   # any other name logs to wandb
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

# Rows of 2048 tokens per forward/backward, by the GPU's memory. d12 holds ~3.9 GiB of fp32 weights, gradients
# and optimizer state, and saves ~1.3 GiB of activations per row (bf16, counted on the CPU: dev/LOG.md); the
# tiers leave a third spare for the logits' backward and compiled kernels' workspace. Deeper models take half
# the rows (d16: 7.3 GiB of state, ~1.8 GiB per row). DEVICE_BATCH_SIZE=N overrides. Not yet measured on a GPU.
mem_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ')" || mem_mib=""
if ! [[ "$mem_mib" =~ ^[0-9]+$ ]]; then
    echo "single_gpu: no NVIDIA GPU answers nvidia-smi; on a CPU use runs/runcpu.sh" >&2; exit 1
elif [ "$mem_mib" -ge 70000 ]; then ROWS=32
elif [ "$mem_mib" -ge 38000 ]; then ROWS=16
elif [ "$mem_mib" -ge 22000 ]; then ROWS=8
elif [ "$mem_mib" -ge 15000 ]; then ROWS=4
else
    echo "single_gpu: this GPU has $mem_mib MiB; the pipeline needs one with >= 16 GB" >&2; exit 1
fi
[ "$DEPTH" -gt 12 ] && ROWS=$((ROWS / 2))
ROWS="${DEVICE_BATCH_SIZE:-$ROWS}"
echo "single_gpu: d$DEPTH, $ROWS rows of 2048 tokens per forward/backward on a GPU with $mem_mib MiB"

bash runs/setup.sh
source .venv/bin/activate
# Re-running after a crash continues the run, as in speedrun.sh
skip_or_resume() { python -m nanochat.pipeline "$@"; }
[ -e "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ] || python -m nanochat.report reset

# Shards: d12 trains on 1.32B tokens ~ 6.3B chars ~ 25 shards of text, ~34 read with the best-fit crop: 40.
# (DEPTH=16: 2.8B tokens, ~75 shards read: NUM_SHARDS=80.)
python -m nanochat.dataset -n 8 --source climbmix
python -m nanochat.dataset -n "${NUM_SHARDS:-40}" --source climbmix &
DATASET_DOWNLOAD_PID=$!
skip_or_resume tok - python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
skip_or_resume --evaluates tok - python -m scripts.tok_eval
wait $DATASET_DOWNLOAD_PID

# One process, no torchrun (SFT inherits the rows and the batch). bf16 (no --fp8: at d12's width it gains little, and cards before Ada have no fp8).
# A checkpoint every 500 steps (~3 GB, seconds to write): at most ~10 minutes lost on an H100, ~45 on a 4090.
skip_or_resume base d$DEPTH python -m scripts.base_train --depth=$DEPTH --device-batch-size=$ROWS --save-every=500 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
skip_or_resume --evaluates base d$DEPTH python -m scripts.base_loss -g d$DEPTH --device-batch-size=$ROWS --device-type=cuda
skip_or_resume --evaluates base d$DEPTH python -m scripts.base_eval -g d$DEPTH --device-type=cuda

python -c "from tasks.customjson import IDENTITY_URL, default_identity_path
from nanochat.datasource import download_once; download_once(IDENTITY_URL, default_identity_path())"
skip_or_resume sft d$DEPTH python -m scripts.chat_sft --save-every=200 --keep-last=2 \
    --device-type=cuda --run=$WANDB_RUN
skip_or_resume --evaluates sft d$DEPTH python -m scripts.chat_eval -i sft -g d$DEPTH --device-type=cuda
python -m nanochat.report generate
