"""
One front door for attention, with Flash Attention 3's API and its (B, T, H, D) tensor layout.

Backends, settled on first use (GPT.init_weights makes that happen eagerly) with one printed line:
  fa3   FlashAttention-3 (Shah et al. 2024) on Hopper GPUs for bf16/fp16 inputs, loaded through the
        `kernels` package from the Hugging Face hub: runs/setup.sh fetches them once, and every later load
        reads the local cache without asking the hub (8 ranks x every launch of a run would otherwise each
        depend on a network call).
  flex  PyTorch's FlexAttention inside compiled CUDA code: block-sparse, so sliding-window layers skip the
        masked blocks and `window_pattern=SSSL` stays faster than `L` (SDPA would compute them all).
  sdpa  torch's scaled_dot_product_attention: CPU, MPS, eager CUDA calls (sampling, evaluation), fp32,
        and the KV-cache path wherever FA3 does not serve it.

Window semantics (FA3's): with window_size=(left, right) a query at absolute position i attends keys at
positions j with i - left <= j <= i + right; -1 means unlimited; causal=True forces right = 0.
Tests force a backend by setting `_override_impl`.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanochat.common import print0

_override_impl = None  # None (automatic) | 'fa3' | 'flex' | 'sdpa'
_BACKENDS = ("fa3", "flex", "sdpa")
_UNLIMITED = 1 << 30  # wider than any sequence: stands in for FA3's -1 in mask arithmetic
# FA3 from the kernels-community organisation, which the Hub marks a trusted kernel publisher: `kernels`
# loads it without trust_remote_code (an individual's build would need us to trust their code). `kernels`
# >= 0.15 refuses to load a kernel without a version; 1 is the one its hub card names.
FA3_REPO, FA3_VERSION = "kernels-community/flash-attn3", 1
FA3_DTYPES = (torch.bfloat16, torch.float16)  # its kernels take nothing else (fp32 inputs crash them)

_fa3_kernels = None  # the FA3 interface module once loaded
_fa3_status = None  # None until the first attention call tried to load FA3, then a short reason
_block_masks = {}  # FlexAttention block masks per (Tq, Tk, causal, window, device), built eagerly


def _load_fa3():
    """
    Try FA3 once. Any failure (no GPU, not Hopper, no `kernels`, no network) leaves it None; either way one
    printed line says which backend serves attention, and a Hopper GPU without FA3 says so loudly.
    """
    global _fa3_kernels, _fa3_status
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if not torch.cuda.is_available():
        _fa3_status = "no CUDA device"
    elif not hopper:
        _fa3_status = "not a Hopper (sm90) GPU; the FA3 kernels are built for Hopper only"
    else:
        try:
            kernel = _get_fa3_kernel()
            _fa3_kernels = getattr(kernel, "flash_attn_interface", kernel)
            _fa3_status = "loaded"
        except Exception as e:  # noqa: BLE001 - any failure means "use a fallback", said loudly below
            _fa3_status = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    if _fa3_kernels is not None:
        print0(f"Attention backend: fa3 ({FA3_REPO} v{FA3_VERSION}) for bf16/fp16, sdpa for fp32")
    elif hopper:
        print0(f"WARNING: FA3 is unavailable on this Hopper GPU ({_fa3_status}); attention falls back to "
               f"flex (compiled) and sdpa (eager), which is slower. Fix: `bash runs/setup.sh` on a node with "
               f"network access installs `kernels` and caches {FA3_REPO}.")
    elif torch.cuda.is_available():
        print0(f"Attention backend: flex in compiled code, sdpa elsewhere (FA3: {_fa3_status})")
    else:
        print0(f"Attention backend: sdpa (FA3: {_fa3_status})")


def _get_fa3_kernel():
    """
    FA3 from the local Hugging Face cache if it is there, else from the hub. `kernels` reads the hub's offline
    switch at each call, so flipping it for one call makes that call cache-only (HF_HUB_OFFLINE=1 in the
    environment would do the same for the whole process, and would stop the chat stages' dataset downloads).
    """
    from huggingface_hub import constants
    from kernels import get_kernel
    if not constants.HF_HUB_OFFLINE:
        constants.HF_HUB_OFFLINE = True
        try:
            return get_kernel(FA3_REPO, version=FA3_VERSION)
        except Exception:  # noqa: BLE001 - not cached (first run, or another torch): ask the hub below
            pass
        finally:
            constants.HF_HUB_OFFLINE = False
    return get_kernel(FA3_REPO, version=FA3_VERSION)


def fa3_status():
    """Why FA3 does or does not serve attention here: 'loaded', or the reason (tries to load it first)."""
    _fa3()
    return _fa3_status


def _fa3():
    """The FA3 interface, or None. Loaded on first use: importing this module must not touch the network."""
    if _fa3_status is None:
        _load_fa3()
    return _fa3_kernels


def __getattr__(name):
    # HAS_FA3 answers on first access (module-level __getattr__), so that merely importing this module stays cheap.
    if name == "HAS_FA3":
        return _fa3() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_fa3():
    """True when FA3 serves (CUDA, bf16/fp16) calls under the current override."""
    if _override_impl not in (None, *_BACKENDS):
        raise ValueError(f"flash_attention._override_impl must be None or one of {_BACKENDS}, got {_override_impl!r}")
    if _override_impl == "fa3" and _fa3() is None:
        raise RuntimeError(f"_override_impl='fa3' but FA3 is unavailable ({_fa3_status}); "
                           "it needs a Hopper GPU and `pip install kernels` with access to the Hugging Face hub. "
                           "Use None, 'flex' or 'sdpa' instead.")
    return _override_impl in (None, "fa3") and _fa3() is not None


def backend_name(device_type):
    """
    The backend that serves this process's attention on device_type, as _pick_backend decides it: 'fa3' (FA3 for
    bf16/fp16, sdpa for fp32), 'flex' (compiled CUDA code; sdpa eager), 'sdpa', or the one _override_impl forces.
    Every rank of a run must get the same one (common.compute_init checks).
    """
    if _use_fa3() and (device_type == "cuda" or _override_impl == "fa3"):
        return "fa3"
    if _override_impl in ("flex", "sdpa"):
        return _override_impl
    return "flex" if device_type == "cuda" else "sdpa"


def _pick_backend(q):
    if _use_fa3() and (q.is_cuda or _override_impl == "fa3"):
        if q.dtype in FA3_DTYPES:
            return "fa3"
        if _override_impl == "fa3":
            raise ValueError(f"FA3 takes bf16/fp16 inputs, got {q.dtype}; use another backend for fp32")
    if _override_impl in ("flex", "sdpa"):
        return _override_impl
    # Eager flex would compile (or, unfused, materialize every score) per sequence length: eager callers
    # with varying lengths (sampling, evaluation) take SDPA instead.
    return "flex" if q.is_cuda and torch.compiler.is_compiling() else "sdpa"


def prepare(device, seq_len, window_sizes):
    """
    Settle the backend (printing its line) and build FlexAttention's block masks for causal self-attention over
    seq_len tokens with each of window_sizes, eagerly. A compiled model then finds its masks ready; a mask built
    inside a compiled graph is rebuilt every step, and caching one from there compiles each new shape twice.
    """
    _use_fa3()
    device = torch.device(device)
    if device.type == "cuda":  # flex serves compiled CUDA code (FA3 too, for fp32 runs)
        for window_size in set(map(tuple, window_sizes)):
            _block_mask(seq_len, seq_len, True, window_size, device)


def _first(out):
    # Some FA3 builds return (out, softmax_lse), others just out.
    return out[0] if isinstance(out, tuple) else out


def _allowed(diff, causal, window_size):
    """diff = query position - key position (tensors). True where FA3's window rules let the query see the key."""
    left, right = (w if w >= 0 else _UNLIMITED for w in window_size)
    if causal:
        right = 0
    return (diff <= left) & (diff >= -right)


def _sdpa(q, k, v, attn_mask=None, is_causal=False):
    """SDPA on (B, T, H, D) tensors; attn_mask is boolean, True = attend."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                       enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


def _block_mask(Tq, Tk, causal, window_size, device):
    """The cached block mask; built here when missing (and cached only outside compiled code, see prepare)."""
    key = (Tq, Tk, causal, tuple(window_size), device)
    if key in _block_masks:
        return _block_masks[key]
    from torch.nn.attention.flex_attention import create_block_mask
    offset = Tk - Tq  # queries are the last Tq positions (bottom-right aligned, as in FA3)

    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(q_idx + offset - kv_idx, causal, window_size)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=device)
    if not torch.compiler.is_compiling():
        _block_masks[key] = block_mask
    return block_mask


def _flex(q, k, v, causal, window_size):
    from torch.nn.attention.flex_attention import flex_attention
    block_mask = _block_mask(q.size(1), k.size(1), causal, window_size, q.device)
    # Inside a compiled model the enclosing torch.compile fuses it; eager (tests, on CPU) it is the unfused reference.
    y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention over (B, T, H, D) q and (B, T, H_kv, D) k, v; returns (B, T, H, D)."""
    backend = _pick_backend(q)
    if backend == "fa3":
        return _first(_fa3().flash_attn_func(q, k, v, causal=causal, window_size=window_size))
    if backend == "flex":
        return _flex(q, k, v, causal, window_size)
    Tq, Tk = q.size(1), k.size(1)
    if causal and Tq == Tk and (window_size[0] < 0 or window_size[0] >= Tk - 1):
        return _sdpa(q, k, v, is_causal=True)  # the window excludes nothing: plain causal, fastest kernel
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    mask = _allowed(q_pos.unsqueeze(1) - torch.arange(Tk, device=q.device), causal, window_size)
    return _sdpa(q, k, v, attn_mask=mask)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1)):
    """
    Attention for inference. k/v (B, T_new, H_kv, D), when given, are written into the (B, T_max, H_kv, D)
    caches in place at each row's cache_seqlens; the queries then attend over that row's prefix plus the
    new tokens. cache_seqlens itself is NOT advanced here (the KV cache object does that).
    """
    if _pick_backend(q) == "fa3" and not torch.compiler.is_compiling():  # (the hub kernel is not known to trace)
        return _first(_fa3().flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                     causal=causal, window_size=window_size))
    # SDPA (FlexAttention would rebuild its block mask at every decode step). The lengths never travel back to
    # the host: keys span the cache as given (callers that know the filled length pass just that prefix), and a
    # mask on absolute positions hides whatever a row has not written yet.
    B, Tq = q.shape[:2]
    device = q.device
    if cache_seqlens is None:
        cache_seqlens = torch.zeros(B, dtype=torch.int32, device=device)
    num_new = 0
    if k is not None:
        num_new = k.size(1)
        rows = torch.arange(B, device=device).unsqueeze(1)
        cols = cache_seqlens.unsqueeze(1) + torch.arange(num_new, device=device)
        k_cache[rows, cols] = k.to(k_cache.dtype)
        v_cache[rows, cols] = v.to(v_cache.dtype)
    seqlens = cache_seqlens + num_new  # keys each row holds now
    q_pos = seqlens.unsqueeze(1) - Tq + torch.arange(Tq, device=device)  # (B, Tq)
    k_pos = torch.arange(k_cache.size(1), device=device)
    mask = _allowed(q_pos.unsqueeze(2) - k_pos, causal, window_size) & (k_pos < seqlens.view(B, 1, 1))
    keys, values = k_cache.to(q.dtype), v_cache.to(q.dtype)  # (no-ops unless the dtypes differ)
    return _sdpa(q, keys, values, attn_mask=mask.unsqueeze(1))


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
