"""
Train the BPE tokenizer on the pretraining shards (train split) and save it, with the byte length of
every token, under base_dir/tokenizer.

python -m scripts.tok_train                      # 2B chars, vocab 32768 (the speedrun)
python -m scripts.tok_train --max-chars=20000000 --vocab-size=8192   # a CPU-sized tokenizer
"""

import argparse
import os
import time

from nanochat.common import get_base_dir, positive, report_user_errors
from nanochat.dataset import parquets_iter_batched, split_files
from nanochat.datasource import remember_embedded_setting
from nanochat.report import get_report
from nanochat.tokenizer import CONTROL_TOKENS, RustBPETokenizer


parser = argparse.ArgumentParser(description="Train the BPE tokenizer")
parser.add_argument("--max-chars", type=positive(int), default=2_000_000_000, help="train on at most this many characters")
parser.add_argument("--doc-cap", type=positive(int), default=10_000, help="use at most this many characters of each document")
parser.add_argument("--vocab-size", type=positive(int), default=32768, help="vocabulary size, special tokens included")
args = parser.parse_args()
report_user_errors()  # a damaged shard is one line naming it
min_vocab_size = 256 + len(CONTROL_TOKENS)
if args.vocab_size < min_vocab_size:
    parser.error(f"--vocab-size must be at least {min_vocab_size} (256 bytes + {len(CONTROL_TOKENS)} special tokens)")
print(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")
try:
    split_files("train")  # says where the shards come from, or how to get some
except FileNotFoundError as e:
    raise SystemExit(str(e))

# Capping documents keeps a few huge ones (code dumps, tables) from dominating the pair statistics.
consumed = {"docs": 0, "chars": 0}


def training_texts():
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            text = doc[:args.doc_cap]
            consumed["docs"] += 1
            consumed["chars"] += len(text)
            yield text
            if consumed["chars"] >= args.max_chars:
                return


t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(training_texts(), args.vocab_size)
train_time = time.time() - t0
if consumed["docs"] == 0:
    raise SystemExit("No training text: the train shards hold no documents")
print(f"Trained on {consumed['docs']:,} docs, {consumed['chars']:,} chars in {train_time:.2f}s")
if consumed["chars"] < args.max_chars:
    print(f"Note: that is all the train split holds ({args.max_chars:,} chars were allowed)")
if tokenizer.get_vocab_size() < args.vocab_size:
    print(f"WARNING: the text only supported {tokenizer.get_vocab_size():,} tokens, fewer than the "
          f"{args.vocab_size:,} asked for; train on more text (--max-chars) for the full vocabulary")

sample = "Hello world! 12345 ünïcödé 你好 🙂\r\n\tdef f(x): return x**2"
assert tokenizer.decode(tokenizer.encode(sample)) == sample, "encode/decode round-trip failed"

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(tokenizer_dir)
print(f"Saved tokenizer and token bytes to {tokenizer_dir}")
remember_embedded_setting()  # a tokenizer of the embedded sample: every later stage on this base dir reads it too

token_bytes = tokenizer.token_bytes()
ordinary = token_bytes[token_bytes > 0].float()
get_report().log(section="Tokenizer training", data=[
    vars(args),
    {
        "train_time_s": round(train_time, 2),
        "train_docs": consumed["docs"],
        "train_chars": consumed["chars"],
        "trained_vocab_size": tokenizer.get_vocab_size(),
        "num_special_tokens": len(CONTROL_TOKENS),
        "token_bytes_min": int(ordinary.min()),
        "token_bytes_max": int(ordinary.max()),
        "token_bytes_mean": round(ordinary.mean().item(), 3),
        "token_bytes_std": round(ordinary.std().item(), 3),
    },
])
