"""Shared fixtures: the real data beside the repo, a small trained tokenizer, an isolated base dir."""
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch.overrides import TorchFunctionMode

# Numerical tests compare against fp32 references, and should not depend on whether this CPU runs bf16
# natively: fp32 unless the caller says otherwise. Tests of the bf16/fp16 paths ask for them explicitly.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The data tree the tests read (layout of ../shared/data); $NANOCHAT_TEST_DATA overrides it.
TEST_DATA = Path(os.environ.get("NANOCHAT_TEST_DATA") or SHARED_DATA)


def pretrain_texts(max_chars=2_000_000, shard=0):
    """Documents from one of the shared pretraining shards (real Wikipedia text)."""
    table = pq.read_table(SHARED_DATA / "pretrain" / f"shard_{shard:05d}.parquet", columns=["text"])
    total = 0
    for text in table.column("text").to_pylist():
        if total >= max_chars:
            break
        total += len(text)
        yield text


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 1024-token BPE tokenizer trained on ~2M chars of the shared shards (a few seconds)."""
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(pretrain_texts(), vocab_size=1024)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An empty NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


class CountHostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (.item(), .tolist(), int(t), ...): on CUDA each one is a GPU sync."""
    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"}

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))
