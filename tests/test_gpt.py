"""
The model against SPEC §2: a naive re-implementation from the state dict (written here), init
statistics, state-dict keys, FLOP/parameter accounting, windows, KV-cache decoding, training behaviour
and the optimizer's param groups.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, Linear, build_gpt
from nanochat.optim import MuonAdamW

from conftest import REPO_ROOT, CountHostReads


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: on a shared 2-core machine one thread beats two that wait on each other (~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def tiny_config(**overrides):
    # vocab 100 pads to 128 (cropping matters); n_kv_head < n_head (GQA); seq 32 -> S windows of 16
    fields = dict(sequence_len=32, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL")
    fields.update(overrides)
    return GPTConfig(**fields)


def build_model(config, seed=0):
    """The way every script builds a model (build_gpt: on meta, then real storage, then init_weights())."""
    torch.manual_seed(seed)
    return build_gpt(config, "cpu")


@torch.no_grad()
def randomize_(model, seed=1):
    """Fresh init zeroes the output projections (every block is the identity): make all weights matter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def reference_forward(config, sd, idx):
    """SPEC §2 written out naively (explicit masks, full softmax), reading weights from the state dict."""
    B, T = idx.shape
    H, H_kv, C = config.n_head, config.n_kv_head, config.n_embd
    hd = C // H
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(T).float()[:, None] * inv_freq[None, :]
    cos, sin = (t.bfloat16().float()[None, :, None, :] for t in (angles.cos(), angles.sin()))  # tables kept in bf16

    def rotate(t):
        x1, x2 = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    x = x0 = rms(sd["transformer.wte.weight"][idx])
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, H_kv, hd)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, H_kv, hd)
        if f"value_embeds.{i}.weight" in sd:
            gate = 2 * torch.sigmoid(h[..., :32] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + gate[..., None] * sd[f"value_embeds.{i}.weight"][idx].view(B, T, H_kv, hd)
        q, k = rms(rotate(q)), rms(rotate(k))
        k, v = k.repeat_interleave(H // H_kv, dim=2), v.repeat_interleave(H // H_kv, dim=2)
        long_layer = config.window_pattern[i % len(config.window_pattern)] == "L" or i == config.n_layer - 1
        window = config.sequence_len if long_layer else config.sequence_len // 2
        query_pos, key_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = (key_pos <= query_pos) & (key_pos >= query_pos - window)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + F.relu(h @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
    logits = (rms(x) @ sd["lm_head.weight"].T)[..., :config.vocab_size]
    return 15 * torch.tanh(logits / 15)


def random_tokens(config, B, T, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(window_pattern="L", n_kv_head=4), dict(n_layer=3, window_pattern="SL")])
def test_forward_matches_reference(overrides):
    config = tiny_config(**overrides)
    model = randomize_(build_model(config))
    idx = random_tokens(config, 2, config.sequence_len)
    logits = model(idx)
    assert logits.shape == (2, config.sequence_len, config.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_forward(config, model.state_dict(), idx), atol=1e-4, rtol=1e-4)


def test_loss_matches_cross_entropy_of_cropped_logits():
    config = tiny_config()
    model = randomize_(build_model(config))
    assert model.transformer.wte.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    idx, targets = random_tokens(config, 2, 16, seed=1), random_tokens(config, 2, 16, seed=2)
    targets[0, :5] = -1  # ignored positions
    logits = model(idx)
    assert logits.shape[-1] == config.vocab_size
    per_token = F.cross_entropy(logits.view(-1, config.vocab_size), targets.view(-1), ignore_index=-1, reduction="none")
    losses = model(idx, targets, loss_reduction="none")
    assert losses.shape == (2, 16)
    torch.testing.assert_close(losses.view(-1), per_token)
    assert torch.all(losses[0, :5] == 0)
    torch.testing.assert_close(model(idx, targets), per_token[targets.view(-1) >= 0].mean())


def test_logits_bounded_by_softcap():
    model = build_model(tiny_config())
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)  # raw logits in the hundreds
    logits = model(random_tokens(model.config, 2, 16))
    assert logits.abs().max() <= 15.0  # (tanh rounds to exactly 1.0 in fp32 for raw logits this large)
    assert (logits.abs() > 14.9).float().mean() > 0.5  # squashed towards the cap, not clipped below it


def test_init_statistics():
    config = tiny_config(n_embd=256, n_head=4, n_kv_head=4, vocab_size=4000, n_layer=2)
    model = build_model(config)
    bound = math.sqrt(3) / math.sqrt(config.n_embd)
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    assert abs(model.transformer.wte.weight.mean().item()) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.00002
    uniform_tables = [t.weight for t in model.value_embeds.values()]
    for block in model.transformer.h:
        uniform_tables += [block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight]
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        assert block.attn.ve_gate is None or torch.all(block.attn.ve_gate.weight == 0)
    for w in uniform_tables:
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound  # std of U(-b, b) is b/sqrt(3)
    assert torch.all(model.resid_lambdas == 1.0) and torch.all(model.x0_lambdas == 0.1)
    # rotary tables: bf16, 10x sequence_len, angle = position * base^(-2i/head_dim)
    head_dim = config.n_embd // config.n_head
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 10 * config.sequence_len, 1, head_dim // 2)
    angle = 100 * 10000 ** (-2 * 3 / head_dim)
    assert model.cos[0, 100, 0, 3].item() == torch.tensor(math.cos(angle)).bfloat16().item()
    assert model.sin[0, 100, 0, 3].item() == torch.tensor(math.sin(angle)).bfloat16().item()


def test_init_is_reproducible_and_meta_construction_is_free():
    a, b = build_model(tiny_config(), seed=3), build_model(tiny_config(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.device("meta"):
        meta_model = GPT(tiny_config())
    assert all(p.is_meta for p in meta_model.parameters())


def test_state_dict_keys():
    config = tiny_config(n_layer=4)
    keys = set(build_model(config).state_dict())
    expected = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas"}
    for i in range(4):
        expected |= {f"transformer.h.{i}.attn.{name}.weight" for name in ("c_q", "c_k", "c_v", "c_proj")}
        expected |= {f"transformer.h.{i}.mlp.{name}.weight" for name in ("c_fc", "c_proj")}
    for i in (1, 3):  # i % 2 == (n_layer - 1) % 2: alternating, the last layer included
        expected |= {f"transformer.h.{i}.attn.ve_gate.weight", f"value_embeds.{i}.weight"}
    assert keys == expected  # rotary tables are buffers but not persistent


def test_flops_and_param_counts():
    config = tiny_config()  # vocab 100 -> 128 padded, C=64, 4 heads of 16, 2 kv heads, 4 layers, VE on 1 and 3
    model = build_model(config)
    C, V, kv = 64, 128, 2 * 16
    per_layer = C * C + 2 * C * kv + C * C + 2 * 4 * C * C  # c_q, c_k+c_v, c_proj, c_fc+c_proj
    ve_gates = 2 * 32 * 2
    counts = model.num_scaling_params()
    assert counts == dict(wte=V * C, value_embeds=2 * V * kv, lm_head=V * C, transformer_matrices=4 * per_layer + ve_gates,
                          scalars=8, total=V * C + 2 * V * kv + V * C + 4 * per_layer + ve_gates + 8)
    # windows for SSSL over 4 layers: S S S L(last) -> 16, 16, 16, 32 keys at T = 32
    attention = sum(12 * 4 * 16 * w for w in (16, 16, 16, 32))
    assert model.estimate_flops() == 6 * (4 * per_layer + ve_gates + V * C) + attention


@pytest.mark.parametrize("pattern, n_layer, expected", [
    ("L", 3, "LLL"),
    ("SL", 5, "SLSLL"),
    ("SSSL", 6, "SSSLSL"),
    ("SSSL", 4, "SSSL"),
    ("S", 2, "SL"),  # the last layer is always full
])
def test_window_sizes(pattern, n_layer, expected):
    model = build_model(tiny_config(window_pattern=pattern, n_layer=n_layer))
    assert model.window_sizes == [(32, 0) if c == "L" else (16, 0) for c in expected]


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="window_pattern"):
        GPT(tiny_config(window_pattern="SXL"))
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(tiny_config(n_kv_head=3))


class MinimalKVCache:
    """The KV-cache contract the model relies on (nanochat.engine.KVCache honours it too)."""

    def __init__(self, config, batch_size, max_len):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32)

    def get_pos(self):
        return int(self.cache_seqlens[0])

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens


def test_kv_cache_prefill_and_decode_match_full_forward():
    config = tiny_config()
    model = randomize_(build_model(config))
    T = 40  # beyond sequence_len: sliding windows cut in during decoding too
    idx = random_tokens(config, 2, T, seed=3)
    full = model(idx)
    cache = MinimalKVCache(config, batch_size=2, max_len=T)
    pieces = [model(idx[:, :12], kv_cache=cache)]
    assert cache.get_pos() == 12
    for t in range(12, T):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generate_is_greedy_at_temperature_zero_and_seeded_otherwise():
    model = randomize_(build_model(tiny_config()))
    prompt = [5, 17, 42]
    ids = list(prompt)
    for _ in range(6):  # the reference: argmax of a full forward, one token at a time
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(model.generate(prompt, max_tokens=6, temperature=0.0)) == ids[3:]
    assert list(model.generate(prompt, max_tokens=6, top_k=1)) == ids[3:]
    sampled = list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert sampled == list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert all(0 <= t < 100 for t in sampled)


def train_losses(steps, seed=0):
    config = tiny_config()
    model = build_model(config, seed=seed)
    optimizer = model.setup_optimizer()
    idx = random_tokens(config, 4, 32, seed=seed)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(steps):
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_overfits_one_batch():
    losses = train_losses(30)
    assert losses[0] == pytest.approx(math.log(100), abs=0.1)  # lm_head ~0 at init: uniform over the vocab
    assert losses[-1] < 0.5 * losses[0]


def test_training_is_deterministic():
    assert train_losses(20, seed=4) == train_losses(20, seed=4)


def test_setup_optimizer_groups():
    config = tiny_config(n_embd=128, n_head=4, n_kv_head=2)
    model = build_model(config)
    optimizer = model.setup_optimizer(unembedding_lr=0.01, embedding_lr=0.3, matrix_lr=0.05, weight_decay=0.2,
                                      scalar_lr=0.4)
    assert isinstance(optimizer, MuonAdamW)
    scale = (128 / 768) ** -0.5
    groups = optimizer.param_groups
    adamw = [(g["params"], g["lr"], g["betas"], g["weight_decay"]) for g in groups if g["kind"] == "adamw"]
    assert adamw == [
        ([model.lm_head.weight], pytest.approx(0.01 * scale), (0.8, 0.96), 0.01),
        ([model.transformer.wte.weight], pytest.approx(0.3 * scale), (0.8, 0.995), 0.001),
        (list(model.value_embeds.parameters()), pytest.approx(0.5 * 0.3 * scale), (0.8, 0.995), 0.01),
        ([model.resid_lambdas], pytest.approx(0.4 * 0.01), (0.8, 0.95), 0.05),
        ([model.x0_lambdas], pytest.approx(0.4), (0.96, 0.95), 0.0),
    ]
    assert all(g["eps"] == 1e-10 for g in groups if g["kind"] == "adamw")
    muon = [g for g in groups if g["kind"] == "muon"]
    matrices = list(model.transformer.h.parameters())
    assert len(muon) == len({p.shape for p in matrices})  # one group per distinct shape
    for g in muon:
        assert len({p.shape for p in g["params"]}) == 1
        assert (g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.05, 0.95, 5, 0.9, 0.2)
    assert all(g["initial_lr"] == g["lr"] for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


DIST_SCRIPT = """
import torch, torch.distributed as dist
from nanochat.common import compute_init, compute_cleanup
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import DistMuonAdamW
ddp, rank, _, world_size, device = compute_init("cpu")
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
model.init_weights()
optimizer = model.setup_optimizer()
assert isinstance(optimizer, DistMuonAdamW), type(optimizer)
idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))  # different data per rank
for _ in range(2):
    model(idx[:, :-1], idx[:, 1:]).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world_size)]
dist.all_gather(gathered, flat)
assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged"
print(f"rank {rank} ok")
compute_cleanup()
"""


@pytest.mark.slow
def test_setup_optimizer_is_distributed_under_torchrun(tmp_path):
    script = tmp_path / "dist_gpt_check.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


# ------------------------------------------------------------------ compute dtype (no autocast)


def test_linear_casts_its_fp32_weight_to_the_input_dtype():
    linear = Linear(16, 8)
    x = torch.randn(4, 16).bfloat16().requires_grad_()
    y = linear(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, x @ linear.weight.bfloat16().T)
    y.float().sum().backward()
    assert linear.weight.dtype == linear.weight.grad.dtype == torch.float32  # the master weight and its gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_matches_the_fp32_reference(monkeypatch, dtype):
    monkeypatch.setenv("NANOCHAT_DTYPE", str(dtype).removeprefix("torch."))
    config = tiny_config()
    model = randomize_(build_model(config))
    assert model.transformer.wte.weight.dtype == dtype and all(t.weight.dtype == dtype for t in model.value_embeds.values())
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "wte" not in name and "value_embeds" not in name)
    idx = random_tokens(config, 2, config.sequence_len)
    logits = model(idx)
    assert logits.dtype == torch.float32
    sd = {k: v.float() for k, v in model.state_dict().items()}
    expected = reference_forward(config, sd, idx)
    relative_error = (logits - expected).norm() / expected.norm()
    assert relative_error < 0.02  # 8 (bf16) or 11 (fp16) mantissa bits through 4 layers; fp32 agrees to 1e-6


def test_kv_cache_decoding_never_reads_tensors_back_to_the_host():
    """Positions come from the cache's Python counter: no GPU sync in any layer of any decode step."""
    from nanochat.engine import KVCache
    config = tiny_config()
    model = randomize_(build_model(config))
    cache = KVCache(batch_size=2, num_heads=config.n_kv_head, seq_len=20, head_dim=config.n_embd // config.n_head,
                    num_layers=config.n_layer, device="cpu", dtype=torch.float32)
    idx = random_tokens(config, 2, 20, seed=5)
    with torch.no_grad(), CountHostReads() as reads:
        pieces = [model(idx[:, :12], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    assert reads.count == 0
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), atol=1e-4, rtol=1e-4)


def test_training_and_decoding_keep_every_tensor_on_the_model_device():
    """
    A training step and a decode step on the meta device: any tensor the code makes without device=... lands on
    the CPU and fails to mix with meta tensors, the bug that would break the same code on CUDA. (A FakeTensor
    "cuda" trace is not possible without CUDA: the CPU build aborts the process on .to() of a fake CUDA tensor.)
    """
    from nanochat.engine import KVCache
    config = tiny_config()
    model = build_gpt(config, "meta")
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, config.vocab_size, (2, 16), device="meta")
    model(idx, idx).backward()
    optimizer.step()
    cache = KVCache(2, config.n_kv_head, 16, config.n_embd // config.n_head, config.n_layer, "meta", torch.float32)
    with torch.no_grad():
        model(idx[:, :8], kv_cache=cache)
        logits = model(idx[:, 8:9], kv_cache=cache)
    assert logits.device.type == "meta" and logits.shape == (2, 1, config.vocab_size) and cache.get_pos() == 9


@pytest.mark.slow
def test_compiled_training_step_compiles_once_and_never_again():
    """
    The model and optimizer compiled as base_train compiles them: one graph for the model at its input shape,
    and nothing recompiles over further steps that change the learning rate, momentum and weight decay (they
    reach the compiled optimizer as tensors), nor when validation reuses the graph in eval mode.
    """
    from torch._dynamo.utils import counters
    from nanochat.optim import MuonAdamW, apply_schedules
    config = tiny_config(n_layer=2, window_pattern="L")
    model = build_model(config)
    optimizer = MuonAdamW(model.setup_optimizer().param_groups, compile=True)
    train_model = torch.compile(model, dynamic=False)
    idx = random_tokens(config, 2, config.sequence_len + 1)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for step in range(4):
        train_model(idx[:, :-1], idx[:, 1:]).backward()
        if step == 0:
            assert counters["stats"]["unique_graphs"] == 1  # the whole model, no graph breaks
        apply_schedules(optimizer, lrm=1.0 - 0.2 * step, muon_momentum=0.85 + 0.03 * step, muon_weight_decay=0.1 * step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 3, graphs
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            train_model(idx[:, :-1], idx[:, 1:], loss_reduction="none")
    assert counters["stats"]["unique_graphs"] == graphs[-1] + 1  # one inference graph for validation
