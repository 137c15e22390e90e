"""
Distributed tokenizing data loaders for pretraining: they yield (inputs, targets) int64 (B, T) tensors
on the device, forever (the epoch counter increments; the val split loops too, so callers take a
fixed number of batches from it).

Documents come from the shards (nanochat.dataset): rank r of W reads row groups r, r+W, ... (a global
index across the split's files), tokenizes them in batches with BOS prepended on a background thread
(the tokenizer itself encodes a batch on several threads), so tokenization overlaps the training step.

- BOS best-fit (default): every row of T+1 tokens starts at a document start and is filled by
  BestFitPacker (largest doc that fits, repeatedly; crop the shortest when none fits). No padding.
  Whole documents in a row, so the model rarely sees text cut from its start: the idea of best-fit
  packing (Ding et al. 2024, "Fewer Truncations Improve Language Modeling"), here online over a buffer
  (upstream nanochat's loader). It crops 1.15% of the tokens of Wikipedia text (dev/LOG.md, "First
  measurements"; greedy in-order cropping: ~28%).
- Streaming (legacy): documents concatenated into one token stream; rows may start mid-document.

The _with_state variants also yield {"pq_idx", "rg_idx", "epoch"}: the row group last taken into the
buffer. Passing it back as resume_state_dict restarts at this rank's next row group after it
(approximate resume: documents still in the buffer are skipped, none is repeated).
"""

import atexit
import bisect
import queue
import threading

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import iter_row_groups


class BestFitPacker:
    """
    Packs documents (each starting with BOS) into rows of row_len tokens. take_docs() repeatedly
    moves the LARGEST buffered doc that fits entirely into the space left, and stops when none fits:
    the docs of one padded row (chat fine-tuning packs rendered conversations this way; a doc is then
    anything whose len() is its token count). take_row() (pretraining) concatenates them and fills the
    rest of the row with the head of the SHORTEST doc (its tail is dropped): exactly row_len tokens,
    no padding. Docs are kept sorted by length, so each pick is a bisect instead of a scan of the
    buffer; among docs of equal length the one added first wins, which gives exactly the rows of a
    plain scan over the buffer in insertion order.
    """

    def __init__(self, row_len):
        self.row_len = row_len
        self._lengths = []  # ascending; equal lengths in insertion order
        self._docs = []  # parallel to _lengths
        self.buffered_tokens = 0
        self.tokens_consumed = 0  # tokens of the docs that left the buffer, whole or cropped
        self.tokens_cropped = 0  # of those, the ones cut off and never trained on

    def __len__(self):
        return len(self._docs)

    @property
    def crop_fraction(self):
        """Fraction of the tokens of consumed documents that were cropped away."""
        return self.tokens_cropped / max(1, self.tokens_consumed)

    def add(self, doc):
        if len(doc) == 0:
            raise ValueError("BestFitPacker.add got an empty document; every document starts with BOS")
        i = bisect.bisect_right(self._lengths, len(doc))
        self._lengths.insert(i, len(doc))
        self._docs.insert(i, doc)
        self.buffered_tokens += len(doc)

    def _pop(self, i):
        self._lengths.pop(i)
        doc = self._docs.pop(i)
        self.buffered_tokens -= len(doc)
        self.tokens_consumed += len(doc)
        return doc

    def take_docs(self):
        """Whole docs for one row, largest fitting first; their total length is at most row_len."""
        docs, space = [], self.row_len
        while self._lengths and self._lengths[0] <= space:
            largest_fit = bisect.bisect_right(self._lengths, space) - 1
            docs.append(self._pop(bisect.bisect_left(self._lengths, self._lengths[largest_fit])))
            space -= len(docs[-1])
        return docs

    def take_row(self, out=None):
        """
        One row of exactly row_len tokens, starting with the first token of a document, written into out
        (a preallocated int64 numpy row, reused batch after batch; a new one when None) and returned.
        """
        if self.buffered_tokens < self.row_len:
            raise ValueError(f"BestFitPacker holds {self.buffered_tokens} tokens, fewer than a row "
                             f"({self.row_len}): add() more documents first")
        out = np.empty(self.row_len, dtype=np.int64) if out is None else out
        filled = 0
        for doc in self.take_docs():
            out[filled:filled + len(doc)] = doc
            filled += len(doc)
        if filled < self.row_len:
            doc, remaining = self._pop(0), self.row_len - filled
            out[filled:] = doc[:remaining]
            self.tokens_cropped += len(doc) - remaining
        return out


class BatchStager:
    """
    Turns B rows of T+1 tokens into contiguous (inputs, targets) (B, T) on the device with ONE
    host-to-device copy: both are written into one staging buffer (pinned on CUDA) and viewed after
    the copy. Every batch gets fresh device memory, so a batch the caller still holds is never
    overwritten; the pinned buffer is reused only once its previous copy has finished.
    """

    def __init__(self, B, T, device="cpu"):
        self.B, self.T = B, T
        self.device = torch.device(device)
        self.staging = torch.empty(2 * B * T, dtype=torch.long, pin_memory=True) if self.device.type == "cuda" else None
        self.copy_done = None  # CUDA event recorded after the last copy out of self.staging

    def stage(self, rows):
        B, T = self.B, self.T
        if not torch.is_tensor(rows):
            rows = torch.from_numpy(np.array(rows, dtype=np.int64))  # ~3x faster than torch.tensor on lists
        assert rows.shape == (B, T + 1), f"expected rows of shape {(B, T + 1)}, got {tuple(rows.shape)}"
        if self.staging is None:
            buffer = torch.empty(2 * B * T, dtype=torch.long)
        else:
            if self.copy_done is not None:
                self.copy_done.synchronize()
            buffer = self.staging
        buffer[:B * T].view(B, T).copy_(rows[:, :-1])
        buffer[B * T:].view(B, T).copy_(rows[:, 1:])
        if self.device.type != "cpu":
            buffer = buffer.to(self.device, non_blocking=self.staging is not None)
            if self.staging is not None:
                self.copy_done = torch.cuda.Event()
                self.copy_done.record()
        return buffer[:B * T].view(B, T), buffer[B * T:].view(B, T)


def _document_batches(tokenizer, split, resume_state_dict, tokenizer_threads, tokenizer_batch_size):
    """Yield (token_lists, state) forever: this rank's row groups, tokenized with BOS, epoch after epoch."""
    _, rank, _, world_size = get_dist_info()
    bos = tokenizer.get_bos_token_id()
    epoch, after = 1, None
    if resume_state_dict is not None:
        epoch = resume_state_dict["epoch"]
        after = (resume_state_dict["pq_idx"], resume_state_dict["rg_idx"])
    while True:
        found = False
        for pq_idx, rg_idx, texts in iter_row_groups(split, start=rank, step=world_size, after=after):
            found = True
            state = {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch}
            for i in range(0, len(texts), tokenizer_batch_size):
                yield tokenizer.encode(texts[i:i + tokenizer_batch_size], prepend=bos, num_threads=tokenizer_threads), state
        if not found and after is None:
            raise ValueError(f"Rank {rank} of {world_size} gets no row group of the {split} split: it has fewer row "
                             f"groups than ranks. Use fewer processes, or rebuild the shards with a smaller "
                             f"--docs-per-row-group (python -m nanochat.dataset --build-from ...)")
        epoch, after = epoch + 1, None


def _prefetched(make_iterator, depth):
    """
    Run make_iterator() on a daemon thread, up to depth items ahead; its errors surface here. The thread
    is stopped and joined when the generator is closed, and at the latest when the interpreter starts to
    exit: a thread still inside pyarrow or the tokenizer when the interpreter finalizes is killed there,
    and the C++ runtime aborts the process (SIGABRT, "terminate called without an active exception").
    """
    items = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in make_iterator():
                if not put((item, None)):
                    return
        except Exception as e:  # handed to the consumer, which raises it
            put((None, e))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()

    def stop_producer():
        stop.set()
        producer.join()  # at most the item in progress

    atexit.register(stop_producer)  # runs before finalization, while the thread can still finish its item
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            yield item
    finally:  # the generator was closed or collected
        stop_producer()
        atexit.unregister(stop_producer)


def _token_batches(tokenizer, split, resume_state_dict, tokenizer_threads, tokenizer_batch_size):
    return _prefetched(lambda: _document_batches(tokenizer, split, resume_state_dict, tokenizer_threads,
                                                 tokenizer_batch_size), depth=8)


def tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, split, device="cpu",
                                                              resume_state_dict=None, tokenizer_threads=4,
                                                              tokenizer_batch_size=128, buffer_size=1000,
                                                              packer=None):
    """
    Yield (inputs, targets, state_dict) forever; every row starts with BOS at a document start.
    buffer_size: documents kept to choose from (more: less cropping, more memory). Pass your own
    packer=BestFitPacker(T + 1) to read its crop_fraction while training.
    """
    packer = packer if packer is not None else BestFitPacker(T + 1)
    if packer.row_len != T + 1:
        raise ValueError(f"packer.row_len must be T + 1 = {T + 1}, got {packer.row_len}")
    stager = BatchStager(B, T, device)
    batches = _token_batches(tokenizer, split, resume_state_dict, tokenizer_threads, tokenizer_batch_size)
    rows = np.empty((B, T + 1), dtype=np.int64)  # filled in place for every batch; stage() copies it out
    while True:
        for row in rows:
            while len(packer) < buffer_size or packer.buffered_tokens < packer.row_len:
                token_lists, state = next(batches)
                for tokens in token_lists:
                    packer.add(tokens)
            packer.take_row(out=row)
        inputs, targets = stager.stage(torch.from_numpy(rows))
        yield inputs, targets, dict(state)


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """The best-fit loader without the resume state: yields (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets


def tokenizing_distributed_data_loader_with_state(tokenizer, B, T, split, device="cpu", resume_state_dict=None,
                                                  tokenizer_threads=4, tokenizer_batch_size=128):
    """Streaming: yield (inputs, targets, state_dict) cut from one stream of BOS-separated documents."""
    stager = BatchStager(B, T, device)
    batches = _token_batches(tokenizer, split, resume_state_dict, tokenizer_threads, tokenizer_batch_size)
    stream = []
    rows = np.empty((B, T + 1), dtype=np.int64)  # filled in place for every batch; stage() copies it out
    while True:
        while len(stream) < B * T + 1:
            token_lists, state = next(batches)
            for tokens in token_lists:
                stream.extend(tokens)
        # row b is stream[b*T : b*T + T + 1]: targets continue the stream, and the last token of this
        # batch is the first input of the next one, so no token is skipped
        for b in range(B):
            rows[b] = stream[b * T:b * T + T + 1]
        del stream[:B * T]
        inputs, targets = stager.stage(torch.from_numpy(rows))
        yield inputs, targets, dict(state)


def tokenizing_distributed_data_loader(*args, **kwargs):
    """The streaming loader without the resume state: yields (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state(*args, **kwargs):
        yield inputs, targets
