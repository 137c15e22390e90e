"""
Every available attention backend against a naive masked-softmax reference written here: full causal,
sliding windows, GQA, KV-cache prefill/decode/chunked prefill, gradients, and the override switch.
"""
import importlib
import math
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import nanochat.flash_attention as fa
from nanochat.flash_attention import flash_attn

from conftest import CountHostReads

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32  # FA3 runs bf16 only
ATOL = 2e-2 if ON_CUDA else 1e-5
# flex runs everywhere (an unfused eager version on CPU); fa3 only where it actually loaded
BACKENDS = ["sdpa", "flex"] + (["fa3"] if fa.HAS_FA3 else [])


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: on a shared 2-core machine one thread beats two that wait on each other (~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def reference_attention(q, k, v, q_pos, k_len, causal, window_size):
    """
    q (B, Tq, H, D), k/v (B, Tk, H_kv, D); q_pos (B, Tq) absolute query positions; k_len (B,) valid keys.
    Query at position i sees key j iff j < k_len, and i - left <= j <= i + right (causal: right = 0).
    """
    B, Tq, H, D = q.shape
    Tk, H_kv = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(H // H_kv, dim=2), v.double().repeat_interleave(H // H_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    left, right = window_size
    right = 0 if causal else right
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(Tq):
            i = int(q_pos[b, t])
            visible = [j for j in range(Tk) if j < k_len[b] and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)]
            weights = torch.softmax(scores[b, :, t, visible], dim=-1)  # (H, n_visible)
            out[b, t] = torch.einsum("hk,khd->hd", weights, v[b, visible])
    return out


def random_qkv(B, Tq, Tk, H, H_kv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda T, heads: torch.randn(B, T, heads, D, generator=g).to(DEVICE, DTYPE)
    return make(Tq, H), make(Tk, H_kv), make(Tk, H_kv)


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setattr(fa, "_override_impl", request.param)
    return request.param


def run_quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        return fn(*args, **kwargs)


CASES = [  # (H, H_kv, causal, window)
    (4, 4, True, (-1, -1)),   # full causal
    (4, 4, True, (40, 0)),    # window wider than the sequence: same as full
    (4, 4, True, (5, 0)),     # sliding window
    (4, 4, True, (0, 0)),     # only itself
    (4, 2, True, (7, 0)),     # GQA + window
    (4, 1, True, (-1, -1)),   # multi-query
    (4, 4, False, (-1, -1)),  # bidirectional
    (4, 2, False, (3, 2)),    # two-sided window
]
# Eager (unfused) flex on CPU takes seconds per call: there it checks a representative subset.
FLEX_CASES = CASES if ON_CUDA else [CASES[i] for i in (0, 2, 4, 7)]


@pytest.mark.parametrize("backend, H, H_kv, causal, window",
                         [(b, *case) for b in BACKENDS if b != "flex" for case in CASES]
                         + [("flex", *case) for case in FLEX_CASES], indirect=["backend"])
def test_flash_attn_func_matches_reference(backend, H, H_kv, causal, window):
    B, T, D = 2, 24, 16
    q, k, v = random_qkv(B, T, T, H, H_kv, D)
    y = run_quietly(flash_attn.flash_attn_func, q, k, v, causal=causal, window_size=window)
    positions = torch.arange(T).expand(B, T)
    expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), positions, [T] * B, causal, window)
    assert y.shape == (B, T, H, D)
    torch.testing.assert_close(y.cpu().double(), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "flex" or ON_CUDA], indirect=True)
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
def test_gradients_match_reference(backend, window):
    B, T, H, H_kv, D = 2, 20, 4, 2, 16
    inputs = random_qkv(B, T, T, H, H_kv, D, seed=1)
    grad_out = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    ours = [t.clone().requires_grad_() for t in inputs]
    (flash_attn.flash_attn_func(*ours, causal=True, window_size=window) * grad_out).sum().backward()
    ref = [t.cpu().double().requires_grad_() for t in inputs]
    positions = torch.arange(T).expand(B, T)
    (reference_attention(*ref, positions, [T] * B, True, window) * grad_out.cpu().double()).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=5 * ATOL, rtol=5 * ATOL)


def make_cache(B, T_max, H_kv, D, seqlens, seed=3):
    """Caches holding random 'earlier' keys/values up to each row's seqlen (garbage beyond it)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, T_max, H_kv, D, generator=g).to(DEVICE, DTYPE)
    v_cache = torch.randn(B, T_max, H_kv, D, generator=g).to(DEVICE, DTYPE)
    return k_cache, v_cache, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)


# flex serves no KV-cache calls (they go to SDPA), so it is covered by the prefill/decode test below.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "flex"], indirect=True)
@pytest.mark.parametrize("window", [(-1, -1), (4, 0)])
@pytest.mark.parametrize("seqlens, T_new", [
    ([0, 0], 9),     # prefill into an empty cache
    ([11, 11], 1),   # single-token decode
    ([3, 10], 1),    # decode with rows at different positions
    ([6, 6], 5),     # chunked prefill on a filled cache
    ([2, 12], 4),    # chunked prefill, different lengths per row
])
def test_kvcache_matches_reference(backend, window, seqlens, T_new):
    B, T_max, H, H_kv, D = 2, 32, 4, 2, 16
    q, k, v = random_qkv(B, T_new, T_new, H, H_kv, D, seed=4)
    k_cache, v_cache, cache_seqlens = make_cache(B, T_max, H_kv, D, seqlens)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    y = run_quietly(flash_attn.flash_attn_with_kvcache, q, k_cache, v_cache, k=k, v=v,
                    cache_seqlens=cache_seqlens, causal=True, window_size=window)

    # The new keys/values land at each row's offset; everything else in the cache is untouched.
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b, start in enumerate(seqlens):
        expected_k[b, start:start + T_new] = k[b]
        expected_v[b, start:start + T_new] = v[b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert cache_seqlens.tolist() == seqlens  # advancing is the cache object's job, not attention's

    q_pos = torch.tensor([[s + t for t in range(T_new)] for s in seqlens])
    k_len = [s + T_new for s in seqlens]
    expected = reference_attention(q.cpu(), expected_k.cpu(), expected_v.cpu(), q_pos, k_len, True, window)
    torch.testing.assert_close(y.cpu().double(), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kvcache_prefill_then_decode_equals_full_attention(backend):
    """Filling a cache chunk by chunk and token by token reproduces one causal pass over the whole sequence."""
    B, T, H, H_kv, D, window = 2, 16, 4, 2, 16, (5, 0)
    q, k, v = random_qkv(B, T, T, H, H_kv, D, seed=5)
    full = run_quietly(flash_attn.flash_attn_func, q, k, v, causal=True, window_size=window)
    k_cache = torch.zeros(B, T, H_kv, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    cache_seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    pieces = []
    for start, end in [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, T)]:
        pieces.append(flash_attn.flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k=k[:, start:end],
                                                         v=v[:, start:end], cache_seqlens=cache_seqlens,
                                                         causal=True, window_size=window))
        cache_seqlens += end - start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=ATOL)


def test_override_selects_backend(monkeypatch):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 8)
    monkeypatch.setattr(fa, "_override_impl", None)
    automatic = "sdpa" if not ON_CUDA else ("fa3" if fa.HAS_FA3 else "flex")
    assert fa._pick_backend(q) == automatic
    for impl in ["flex", "sdpa"]:
        monkeypatch.setattr(fa, "_override_impl", impl)
        assert fa._pick_backend(q) == impl
        assert fa._use_fa3() is False
    # ... and the calls really go where the switch points
    calls = []
    monkeypatch.setattr(fa, "_flex", lambda q, *args: calls.append("flex") or q)
    monkeypatch.setattr(fa, "_sdpa", lambda q, *args, **kwargs: calls.append("sdpa") or q)
    for impl in ["flex", "sdpa"]:
        monkeypatch.setattr(fa, "_override_impl", impl)
        flash_attn.flash_attn_func(q, k, v, causal=True)
    assert calls == ["flex", "sdpa"]
    monkeypatch.setattr(fa, "_override_impl", "nonsense")
    with pytest.raises(ValueError, match="_override_impl"):
        flash_attn.flash_attn_func(q, k, v, causal=True)


@pytest.mark.skipif(fa.HAS_FA3, reason="FA3 is available here")
def test_forcing_fa3_without_fa3_raises(monkeypatch):
    monkeypatch.setattr(fa, "_override_impl", "fa3")
    with pytest.raises(RuntimeError, match="FA3 is unavailable"):
        fa._use_fa3()
    q, k, v = random_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(RuntimeError, match="FA3 is unavailable"):
        flash_attn.flash_attn_func(q, k, v, causal=True)


def test_backend_announced_once(monkeypatch, capsys):
    monkeypatch.setattr(fa, "_fa3_status", None)  # as if attention had never been used in this process
    monkeypatch.setattr(fa, "_fa3_kernels", None)
    q, k, v = random_qkv(1, 4, 4, 2, 2, 8)
    for _ in range(3):
        flash_attn.flash_attn_func(q, k, v, causal=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Attention backend")]
    assert len(lines) == 1
    if not ON_CUDA:
        assert lines == ["Attention backend: sdpa (FA3: no CUDA device)"]


def test_import_is_lazy():
    """Executing the module must not try to load FA3 (which may go to the network): that waits for first use."""
    importlib.reload(fa)  # re-runs the module body in place; every reference to it stays valid
    assert fa._fa3_status is None and fa._fa3_kernels is None


# ------------------------------------------------------------------ FA3 loading and its dtype rule


def pretend_hopper(monkeypatch, get_kernel):
    """A Hopper GPU with a fake `kernels` package whose get_kernel is given; FA3 not yet tried."""
    monkeypatch.setitem(sys.modules, "kernels", SimpleNamespace(get_kernel=get_kernel))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setattr(fa, "_fa3_status", None)
    monkeypatch.setattr(fa, "_fa3_kernels", None)


def test_fa3_is_loaded_at_a_pinned_version_from_a_trusted_publisher(monkeypatch, capsys):
    calls, kernel = [], SimpleNamespace(flash_attn_func=None, flash_attn_with_kvcache=None)
    pretend_hopper(monkeypatch, lambda repo_id, **kwargs: calls.append((repo_id, kwargs)) or kernel)
    assert fa._fa3() is kernel
    # `kernels` >= 0.15 refuses a load without a version; a trusted publisher needs no trust_remote_code
    assert calls == [("kernels-community/flash-attn3", {"version": 1})]
    assert capsys.readouterr().out.startswith("Attention backend: fa3")


def test_hopper_without_fa3_says_so_loudly(monkeypatch, capsys):
    def get_kernel(repo_id, **kwargs):
        raise OSError("no route to the Hugging Face hub")
    pretend_hopper(monkeypatch, get_kernel)
    assert fa._fa3() is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("WARNING: FA3 is unavailable on this Hopper GPU (OSError: no route")
    assert "falls back to flex (compiled) and sdpa (eager)" in lines[0] and "runs/setup.sh" in lines[0]


def test_fa3_serves_only_bf16_and_fp16(monkeypatch):
    calls = []
    fake = SimpleNamespace(flash_attn_func=lambda q, k, v, **kwargs: calls.append(q.dtype) or q)
    monkeypatch.setattr(fa, "_fa3_status", "loaded")
    monkeypatch.setattr(fa, "_fa3_kernels", fake)
    monkeypatch.setattr(fa, "_override_impl", "fa3")
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.zeros(1, 4, 2, 8, dtype=dtype)
        flash_attn.flash_attn_func(q, q, q, causal=True)
    assert calls == [torch.bfloat16, torch.float16]
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="FA3 takes bf16/fp16 inputs, got torch.float32"):
        flash_attn.flash_attn_func(q, q, q, causal=True)


# ------------------------------------------------------------------ no recompiles, no host syncs


@pytest.mark.slow
def test_compiled_flex_compiles_each_shape_once(monkeypatch):
    """
    Masks built eagerly beforehand (as GPT.init_weights has the front door do): one graph per sequence length,
    and adding masks for new lengths recompiles nothing. A mask missing at trace time is built inside the graph,
    still one graph per length (caching it from inside the trace used to compile each new length twice).
    (Compiled FlexAttention has no backward on CPU: forward only here; the GPU check runs the training step.)
    """
    from torch._dynamo.utils import counters
    window = (8, 0)
    monkeypatch.setattr(fa, "_override_impl", "flex")
    monkeypatch.setattr(fa, "_block_masks", {})
    torch._dynamo.reset()
    counters.clear()
    attend = torch.compile(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window),
                           dynamic=False, fullgraph=True)
    with torch.no_grad():
        for T in (32, 32, 64, 64, 32, 48, 48):
            if T != 48:
                fa._block_mask(T, T, True, window, torch.device("cpu"))  # eager, outside the compiled code
            q, k, v = random_qkv(1, T, T, 4, 2, 16, seed=T)
            y = run_quietly(attend, q, k, v)
            expected = reference_attention(q, k, v, torch.arange(T).expand(1, T), [T], True, window)
            torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3
    assert sorted(key[0] for key in fa._block_masks) == [32, 64]  # nothing cached from inside a trace


def test_kvcache_sdpa_path_never_reads_tensors_back_to_the_host():
    """A read in the attention call would stall every layer of every decode step; the SDPA path makes none."""
    B, T_max, H, H_kv, D = 2, 32, 4, 2, 16
    k_cache, v_cache, cache_seqlens = make_cache(B, T_max, H_kv, D, [3, 10])
    q, k, v = random_qkv(B, 1, 1, H, H_kv, D)
    with CountHostReads() as reads:
        flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=True,
                                           window_size=(4, 0))
        assert reads.count == 0
        cache_seqlens.tolist()  # (what the counter catches)
    assert reads.count == 1
