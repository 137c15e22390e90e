"""The KV cache: what attention layers write and read when the model runs new tokens on top of earlier ones."""
import copy

import torch


class KVCache:
    """
    Keys and values of every layer for B rows: k_cache/v_cache are (num_layers, B, T, H, D), the
    (B, T, H, D) layout flash_attn_with_kvcache expects, and cache_seqlens (B,) the tokens each row holds.
    prev_embed (B, embed_dim): each row's last token embedding, which the model's smear mixes into the next
    token (meaningless in a row that holds no tokens). The first seven arguments are the established
    signature; without embed_dim, prev_embed is None until the model's first forward creates it.
    Rows may hold different numbers of tokens (a server's rows are unrelated conversations); `pos`, the
    longest row's length, is also kept as a Python int, so reading it never syncs with the GPU.
    """

    # Every per-row tensor and the dim that indexes its rows: rows() and copy_row() carry all of them, so
    # new per-row state only needs an entry here.
    ROW_DIMS = {"k_cache": 1, "v_cache": 1, "cache_seqlens": 0, "prev_embed": 0}

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype, embed_dim=None):
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embed = None if embed_dim is None else torch.zeros(batch_size, embed_dim, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self):
        return self.k_cache.size(1)

    @property
    def seq_len(self):
        return self.k_cache.size(2)

    def reset(self):
        self.cache_seqlens.zero_()
        self.pos = 0

    def get_pos(self):
        """Tokens cached in the longest row (in every row, unless rows were filled separately)."""
        return self.pos

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        """Called by the model after its last layer wrote num_tokens new keys/values into every row."""
        if self.pos + num_tokens > self.seq_len:
            raise RuntimeError(f"KV cache overflow: {self.pos} + {num_tokens} tokens > capacity {self.seq_len}")
        self.cache_seqlens += num_tokens
        self.pos += num_tokens

    def prefill(self, other):
        """Copy a batch-1 cache (a prefilled prompt) into every row of this larger cache."""
        assert other.batch_size == 1, "prefill copies from a batch-1 cache"
        assert self.k_cache.shape[0] == other.k_cache.shape[0] and self.k_cache.shape[3:] == other.k_cache.shape[3:]
        assert other.pos <= self.seq_len, f"prompt of {other.pos} tokens does not fit a cache of {self.seq_len}"
        n = other.pos
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]  # broadcast over the batch dim
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        if other.prev_embed is not None:
            if self.prev_embed is None:
                self.prev_embed = other.prev_embed.new_zeros(self.batch_size, other.prev_embed.size(1))
            self.prev_embed.copy_(other.prev_embed.expand_as(self.prev_embed))
        self.cache_seqlens.fill_(n)
        self.pos = n

    def rows(self, start, stop, pos):
        """
        Rows [start, stop) as a cache of their own that shares this one's memory: what the model writes
        through it lands here. pos: the longest of those rows (the caller tracks its rows' lengths).
        """
        view = copy.copy(self)
        for name, dim in self.ROW_DIMS.items():
            if getattr(self, name) is not None:
                setattr(view, name, getattr(self, name).narrow(dim, start, stop - start))
        view.pos = pos
        return view

    def copy_row(self, src, dst):
        """Copy row src's whole state over row dst."""
        for name, dim in self.ROW_DIMS.items():
            tensor = getattr(self, name)
            if tensor is not None:
                tensor.select(dim, dst).copy_(tensor.select(dim, src))

    @classmethod
    def for_model(cls, config, batch_size, seq_len, device, dtype):
        """A cache shaped for a model of this config (n_layer, n_head, n_kv_head, n_embd)."""
        return cls(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                   head_dim=config.n_embd // config.n_head, num_layers=config.n_layer, device=device, dtype=dtype,
                   embed_dim=config.n_embd)
