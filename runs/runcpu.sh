#!/usr/bin/env bash
# The whole pipeline on a CPU (a laptop, or a machine with no network): tokenizer -> pretraining ->
# bpb + CORE -> SFT -> chat eval -> report, then one answer from the chat model.
#
#   bash runs/runcpu.sh            # ~15 minutes on 2 cores with native bf16: a d4 model (it babbles, but end to end)
#   bash runs/runcpu.sh --smoke    # every stage shrunk to a few steps (CI, ~5-10 minutes)
#
# Data: the embedded sample in data/ (NANOCHAT_DATA=embedded, set below: a few MB shipped in the repo,
# read offline; see data/SOURCES.md), unless $NANOCHAT_DATA_DIR names a data tree (pretrain/ shards,
# eval_bundle/, chat/, words/) or the base dir already holds the data. Nothing is downloaded; to
# download ClimbMix shards and the rest instead: NANOCHAT_DATA= bash runs/runcpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE="${NANOCHAT_SMOKE:-0}"
[ "${1:-}" = "--smoke" ] && SMOKE=1

bash runs/setup.sh
source .venv/bin/activate
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA="${NANOCHAT_DATA-embedded}"
echo "runcpu: base dir $NANOCHAT_BASE_DIR, NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-(unset)}, NANOCHAT_DATA=$NANOCHAT_DATA, smoke=$SMOKE"
start=$(date +%s)

if [ "$SMOKE" = 1 ]; then
    TOK="--max-chars=2000000 --vocab-size=2048"
    BASE="--depth=2 --head-dim=64 --max-seq-len=256 --device-batch-size=4 --total-batch-size=2048 --num-iterations=20 --eval-every=10 --eval-tokens=16384 --sample-every=20"
    BASE_LOSS="--device-batch-size=4 --split-tokens=16384"
    CORE="--max-per-task=8"
    SFT="--num-iterations=10 --eval-every=5 --eval-tokens=8192 --chatcore-every=10 --chatcore-max-cat=4 --chatcore-max-gen=1"
    EVAL="--max-problems=4 --max-new-tokens=32"
else
    # d4, vocab 8192, seq 512, 4096 tokens/step, 300 steps: ~15 minutes of pretraining on 2 cores
    TOK="--max-chars=20000000 --vocab-size=8192"
    BASE="--depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 --device-batch-size=8 --total-batch-size=4096 --num-iterations=300 --eval-every=100 --eval-tokens=131072 --sample-every=300"
    BASE_LOSS="--device-batch-size=8 --split-tokens=131072"
    CORE="--max-per-task=50"
    # SFT continues the base run (4096 tokens/step, its LRs and optimizer state): 500 steps cost about
    # what the former mid-training + SFT did (dev/LOG.md)
    SFT="--num-iterations=500 --eval-every=100 --eval-tokens=65536 --chatcore-every=200 --chatcore-max-cat=50 --chatcore-max-gen=8"
    EVAL="--max-problems=50 --max-new-tokens=128"
fi
COMMON="--device-type=cpu"
TAG=$([ "$SMOKE" = 1 ] && echo d2 || echo d4)  # the depth in $BASE

# Re-running after a crash continues where it stopped: each step goes through the pipeline runner
# (python -m nanochat.pipeline), which skips a stage that finished, resumes one that was interrupted from its
# last checkpoint, and skips an evaluation of a result it evaluated before. Checkpoints: the last 2 per stage.
skip_or_resume() { python -m nanochat.pipeline "$@"; }
[ -e "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ] || python -m nanochat.report reset  # a new run: a new report
python -m nanochat.dataprep -n 8        # nothing to download when the embedded sample or NANOCHAT_DATA_DIR has shards
skip_or_resume tok - python -m scripts.tok_train $TOK
skip_or_resume --evaluates tok - python -m scripts.tok_eval
skip_or_resume base $TAG python -m scripts.base_train $COMMON $BASE --core-metric-every=-1 --save-every=100 --keep-last=2
skip_or_resume --evaluates base $TAG python -m scripts.base_loss $COMMON -g $TAG $BASE_LOSS
skip_or_resume --evaluates base $TAG python -m scripts.base_eval $COMMON -g $TAG $CORE
skip_or_resume sft $TAG python -m scripts.chat_sft $COMMON -g $TAG $SFT --save-every=100 --keep-last=2
skip_or_resume --evaluates sft $TAG python -m scripts.chat_eval $COMMON -i sft -g $TAG $EVAL
python -m nanochat.report generate

echo "runcpu: pipeline finished in $(( $(date +%s) - start ))s; report: $NANOCHAT_BASE_DIR/report/report.md"
python -m scripts.chat_cli $COMMON -i sft -g $TAG -p "Why is the sky blue?"
cat <<TXT

Talk to your model:
  source .venv/bin/activate
  python -m scripts.chat_cli -i sft          # in the terminal
  python -m scripts.chat_web -i sft          # in the browser, http://localhost:8000 (also OpenAI-compatible /v1)
TXT
