"""
Benchmark of the BOS best-fit loader (nanochat/dataloader.py):
1. loader throughput (tokens/s, tokenization included) and crop fraction at B=32, T=2048;
2. BestFitPacker's bisect picking vs the reference's "scan the whole buffer per pick", fed the same
   pre-tokenized documents with the same refill policy: identical rows (hence the same crop fraction)
   and the speedup.

    NANOCHAT_DATA_DIR=../shared/data python -m dev.bench_dataloader
    python -m dev.bench_dataloader --tokenizer cl100k_base --device cuda

--tokenizer: "train" (default: a 32768-token BPE, nanochat's vocab size, trained here on the first 2000
documents (~4M chars) of the train split), "base" (the tokenizer in base_dir), or a tiktoken name such as cl100k_base.
"""

import argparse
import itertools
import time

import torch

from nanochat.dataloader import BestFitPacker, tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.dataset import get_data_dir, parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer


class ScanPacker:
    """The reference's picking: every pick scans the whole buffer (kept in insertion order)."""

    def __init__(self, row_len):
        self.row_len = row_len
        self.docs = []
        self.tokens_consumed = 0
        self.tokens_cropped = 0

    def __len__(self):
        return len(self.docs)

    @property
    def buffered_tokens(self):
        return sum(map(len, self.docs))

    @property
    def crop_fraction(self):
        return self.tokens_cropped / max(1, self.tokens_consumed)

    def add(self, tokens):
        self.docs.append(tokens)

    def take_row(self):
        row = []
        while len(row) < self.row_len:
            remaining = self.row_len - len(row)
            best, best_len = -1, 0
            for i, doc in enumerate(self.docs):
                if best_len < len(doc) <= remaining:
                    best, best_len = i, len(doc)
            if best >= 0:
                doc = self.docs.pop(best)
                row.extend(doc)
            else:
                shortest = min(range(len(self.docs)), key=lambda i: len(self.docs[i]))
                doc = self.docs.pop(shortest)
                row.extend(doc[:remaining])
                self.tokens_cropped += len(doc) - remaining
            self.tokens_consumed += len(doc)
        return row


def load_tokenizer(name):
    if name == "train":
        texts = itertools.islice(itertools.chain.from_iterable(parquets_iter_batched("train")), 2000)
        return RustBPETokenizer.train_from_iterator(texts, vocab_size=32768)
    if name == "base":
        return get_tokenizer()
    return RustBPETokenizer.from_pretrained(name)


def pack_all(packer, docs, buffer_size):
    """Rows until the documents run out, refilling to buffer_size docs before each row (as the loader does)."""
    rows, next_doc = [], 0
    t0 = time.perf_counter()
    while True:
        while len(packer) < buffer_size and next_doc < len(docs):
            packer.add(docs[next_doc])
            next_doc += 1
        if len(packer) < buffer_size:
            return rows, time.perf_counter() - t0
        rows.append(packer.take_row())


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokenizer", default="train")
parser.add_argument("--device", default="cpu")
parser.add_argument("-B", type=int, default=32)
parser.add_argument("-T", type=int, default=2048)
parser.add_argument("--batches", type=int, default=20, help="timed loader batches (after one warmup batch)")
parser.add_argument("--buffer-size", type=int, default=1000)
parser.add_argument("--pack-docs", type=int, default=12000, help="documents for the packing comparison")
args = parser.parse_args()

print(f"Shards: {get_data_dir()}")
t0 = time.time()
tokenizer = load_tokenizer(args.tokenizer)
print(f"Tokenizer: {args.tokenizer}, vocab {tokenizer.get_vocab_size()} ({time.time() - t0:.1f}s to load/train)")

# 1. loader throughput
packer = BestFitPacker(args.T + 1)
loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, args.B, args.T, "train", device=args.device,
                                                                   buffer_size=args.buffer_size, packer=packer)
next(loader)  # warmup: fills the buffer, starts the tokenizer thread
t0 = time.perf_counter()
for _ in range(args.batches):
    inputs, targets, state = next(loader)
if args.device.startswith("cuda"):
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(f"Loader B={args.B} T={args.T}: {args.batches * args.B * args.T / dt:,.0f} tokens/s "
      f"({dt / args.batches * 1000:.1f} ms/batch), crop fraction {packer.crop_fraction:.2%}, state {state}")

# 2. fast picking vs the reference scan, on the same documents
docs = []
for texts in parquets_iter_batched("train"):
    docs.extend(tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id()))
    if len(docs) >= args.pack_docs:
        break
docs = docs[:args.pack_docs]
fast, scan = BestFitPacker(args.T + 1), ScanPacker(args.T + 1)
fast_rows, fast_time = pack_all(fast, docs, args.buffer_size)
scan_rows, scan_time = pack_all(scan, docs, args.buffer_size)
assert fast_rows == scan_rows, "bisect picking must give exactly the rows of the reference scan"
print(f"Packing {len(docs):,} docs into {len(fast_rows):,} rows of {args.T + 1}: bisect {fast_time * 1000:.0f} ms "
      f"({len(fast_rows) * (args.T + 1) / fast_time:,.0f} tokens/s), scan {scan_time * 1000:.0f} ms, "
      f"speedup {scan_time / fast_time:.1f}x, identical rows, crop fraction {fast.crop_fraction:.2%} "
      f"(scan {scan.crop_fraction:.2%})")
