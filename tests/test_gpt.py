"""
The model against a naive re-implementation from the state dict (written here), in its January and 2026
architectures; init statistics, state-dict keys, FLOP/parameter accounting, windows, KV-cache decoding (smear
across prefill chunks), training behaviour and the optimizer's param groups.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, Linear, build_gpt, config_for_depth
from nanochat.optim import MuonAdamW

import helpers
from conftest import CountHostReads, run_torchrun


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: on a shared 2-core machine one thread beats two that wait on each other (~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def tiny_config(**overrides):
    # vocab 100 pads to 128 (cropping matters); n_kv_head < n_head (GQA); seq 32 -> S windows of 16
    return helpers.tiny_config(**{"vocab_size": 100, "n_layer": 4, "n_head": 4, "window_pattern": "SSSL", **overrides})


# Every architecture field at its 2026 value (config_for_depth's), short_window 8 of the 32-token context.
RECIPE_2026 = dict(rotary_base=100000.0, qk_scale=1.2, short_window=8, ve_gate_channels=12, ve_gate_scale=3.0,
                   smear=True, backout=True)


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
    """The model written out naively (explicit masks, full softmax), reading weights from the state dict."""
    B, T = idx.shape
    H, H_kv, C = config.n_head, config.n_kv_head, config.n_embd
    hd = C // H
    inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(T).float()[:, None] * inv_freq[None, :]
    cos, sin = (t.bfloat16().float()[None, :, None, :] for t in (angles.cos(), angles.sin()))  # tables kept in bf16

    def rotate(t):
        x1, x2 = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    x = rms(sd["transformer.wte.weight"][idx])
    if config.smear:  # each token adds a gated share of the previous token's embedding; the first has none
        gate = torch.sigmoid(x[..., :24] @ sd["smear_gate.weight"].T)
        previous = torch.zeros_like(x)
        previous[:, 1:] = x[:, :-1]
        x = x + sd["smear_lambda"] * gate * previous
    x0 = x
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, H_kv, hd)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, H_kv, hd)
        if f"value_embeds.{i}.weight" in sd:
            gate = config.ve_gate_scale * torch.sigmoid(h[..., :config.ve_gate_channels] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + gate[..., None] * sd[f"value_embeds.{i}.weight"][idx].view(B, T, H_kv, hd)
        q, k = rms(rotate(q)) * config.qk_scale, rms(rotate(k)) * config.qk_scale
        k, v = k.repeat_interleave(H // H_kv, dim=2), v.repeat_interleave(H // H_kv, dim=2)
        long_layer = config.window_pattern[i % len(config.window_pattern)] == "L" or i == config.n_layer - 1
        window = config.sequence_len if long_layer else (config.short_window or config.sequence_len // 2)
        query_pos, key_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = (key_pos <= query_pos) & (key_pos >= query_pos - window)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + F.relu(h @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == config.n_layer // 2:
            x_mid = x
    if config.backout:
        x = x - sd["backout_lambda"] * x_mid
    logits = (rms(x) @ sd["lm_head.weight"].T)[..., :config.vocab_size]
    return 15 * torch.tanh(logits / 15)


def random_tokens(config, B, T, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(window_pattern="L", n_kv_head=4), dict(n_layer=3, window_pattern="SL"),
                                       RECIPE_2026, dict(RECIPE_2026, n_layer=3, window_pattern="SL")])
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


@pytest.mark.parametrize("recipe", ["january", "2026"])
def test_init_statistics(recipe):
    new = recipe == "2026"
    config = tiny_config(n_embd=256, n_head=4, n_kv_head=4, vocab_size=4000, n_layer=3, **(RECIPE_2026 if new else {}))
    torch.manual_seed(0)
    model = build_gpt(config, "cpu", init=recipe)
    bound = math.sqrt(3) / math.sqrt(config.n_embd)
    assert abs(model.transformer.wte.weight.std().item() - (0.8 if new else 1.0)) < 0.02
    assert abs(model.transformer.wte.weight.mean().item()) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.00002
    uniform_tables = [(t.weight, bound) for t in model.value_embeds.values()]
    for block in model.transformer.h:
        uniform_tables += [(block.attn.c_q.weight, bound), (block.attn.c_k.weight, bound), (block.attn.c_v.weight, bound),
                           (block.mlp.c_fc.weight, 0.4 * bound if new else bound)]
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        gate = block.attn.ve_gate
        if gate is not None and new:  # U(0, 0.02): the gate starts just above half open
            assert gate.weight.min() >= 0 and gate.weight.max() <= 0.02 and gate.weight.std() > 0.004
        elif gate is not None:
            assert torch.all(gate.weight == 0)
    for w, b in uniform_tables:
        assert w.abs().max() <= b
        assert abs(w.std().item() - b / math.sqrt(3)) < 0.03 * b  # std of U(-b, b) is b/sqrt(3)
    # per-layer scalars: 2026 falls linearly with depth, January is constant
    expected_resid = [1.15, 1.10, 1.05] if new else [1.0] * 3
    expected_x0 = [0.20, 0.125, 0.05] if new else [0.1] * 3
    torch.testing.assert_close(model.resid_lambdas, torch.tensor(expected_resid))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor(expected_x0))
    if new:
        assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
        assert model.smear_gate.weight.min() >= 0 and model.smear_gate.weight.max() <= 0.02
    # rotary tables: bf16, 10x sequence_len, angle = position * base^(-2i/head_dim)
    head_dim = config.n_embd // config.n_head
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 10 * config.sequence_len, 1, head_dim // 2)
    angle = 100 * config.rotary_base ** (-2 * 3 / head_dim)
    assert model.cos[0, 100, 0, 3].item() == torch.tensor(math.cos(angle)).bfloat16().item()
    assert model.sin[0, 100, 0, 3].item() == torch.tensor(math.sin(angle)).bfloat16().item()


def test_one_layer_model_takes_the_first_layer_scalars():
    model = build_model(tiny_config(n_layer=1, **RECIPE_2026))  # i / (L - 1) would divide by zero
    assert model.resid_lambdas.tolist() == pytest.approx([1.15]) and model.x0_lambdas.tolist() == pytest.approx([0.20])
    assert torch.isfinite(model(random_tokens(model.config, 1, 8))).all()


@pytest.mark.slow
def test_config_for_depth_is_the_2026_architecture():
    config = config_for_depth(20, vocab_size=32768, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (20, 1280, 10, 10)
    assert (config.rotary_base, config.qk_scale, config.ve_gate_channels, config.ve_gate_scale) == (100000, 1.2, 12, 3.0)
    assert config.smear and config.backout and config.short_window == 512
    assert GPT(config).window_sizes[:4] == [(512, 0), (512, 0), (512, 0), (2048, 0)]
    for seq in (64, 256, 512, 1000, 1024, 2049, 4096):  # a quarter of the context, up to a multiple of 128
        assert config_for_depth(4, 100, seq).short_window == math.ceil(math.ceil(seq / 4) / 128) * 128
    assert GPTConfig().short_window == 0 and not GPTConfig().smear  # a config without the fields: January


def test_init_is_reproducible_and_meta_construction_is_free():
    a, b = build_model(tiny_config(), seed=3), build_model(tiny_config(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.device("meta"):
        meta_model = GPT(tiny_config())
    assert all(p.is_meta for p in meta_model.parameters())


@pytest.mark.parametrize("recipe", [{}, RECIPE_2026])
def test_state_dict_keys(recipe):
    config = tiny_config(n_layer=4, **recipe)
    keys = set(build_model(config).state_dict())
    expected = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas"}
    if recipe:
        expected |= {"smear_gate.weight", "smear_lambda", "backout_lambda"}
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
    # 2026: gates over 12 channels, the smear gate (24 weights) and two lambdas; S layers see 8 keys
    new = build_model(tiny_config(**RECIPE_2026))
    ve_gates = 2 * 12 * 2
    counts = new.num_scaling_params()
    assert (counts["transformer_matrices"], counts["scalars"]) == (4 * per_layer + ve_gates, 8 + 24 + 2)
    attention = sum(12 * 4 * 16 * w for w in (8, 8, 8, 32))
    assert new.estimate_flops() == 6 * (4 * per_layer + ve_gates + 24 + V * C) + attention


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
    """The KV-cache contract the model relies on (nanochat.kv_cache.KVCache honours it too)."""

    def __init__(self, config, batch_size, max_len):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32)
        self.prev_embed = torch.zeros(batch_size, config.n_embd)  # the last cached token's embedding (smear)

    def get_pos(self):
        return int(self.cache_seqlens[0])

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens


@pytest.mark.parametrize("recipe", [{}, RECIPE_2026])
def test_kv_cache_chunked_prefill_and_decode_match_full_forward(recipe):
    """Every chunk's first token and every decoded token gets the previous token's smear from the cache."""
    config = tiny_config(**recipe)
    model = randomize_(build_model(config))
    T = 40  # beyond sequence_len: sliding windows cut in during decoding too
    idx = random_tokens(config, 2, T, seed=3)
    full = model(idx)
    cache = MinimalKVCache(config, batch_size=2, max_len=T)
    pieces = [model(idx[:, :1], kv_cache=cache), model(idx[:, 1:5], kv_cache=cache), model(idx[:, 5:12], kv_cache=cache)]
    assert cache.get_pos() == 12
    for t in range(12, T):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", [{}, RECIPE_2026])
def test_logit_positions_select_the_full_forwards_logits(recipe):
    """Only the asked-for (row, position) logits, in the asked-for order (repeats too), with and without a cache."""
    config = tiny_config(**recipe)
    model = randomize_(build_model(config))
    idx = random_tokens(config, 2, 12, seed=4)
    full = model(idx)
    rows, positions = torch.tensor([1, 0, 1, 1]), torch.tensor([11, 3, 0, 11])
    torch.testing.assert_close(model(idx, logit_positions=(rows, positions)), full[rows, positions], atol=1e-5, rtol=1e-5)
    cache = MinimalKVCache(config, batch_size=2, max_len=12)
    model(idx[:, :5], kv_cache=cache)
    cached = model(idx[:, 5:], kv_cache=cache, logit_positions=(rows[:2], torch.tensor([6, 0])))
    torch.testing.assert_close(cached, full[rows[:2], torch.tensor([11, 5])], atol=1e-4, rtol=1e-4)


def test_generate_is_greedy_at_temperature_zero_and_seeded_otherwise():
    model = randomize_(build_model(tiny_config(**RECIPE_2026)))
    assert list(model.generate([5], max_tokens=3, temperature=0.0))  # a single-token prompt works
    prompt = [5, 17, 42]
    ids = list(prompt)
    for _ in range(6):  # the reference: argmax of a full forward, one token at a time
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(model.generate(prompt, max_tokens=6, temperature=0.0)) == ids[3:]
    assert list(model.generate(prompt, max_tokens=6, top_k=1)) == ids[3:]
    assert list(model.generate(prompt, max_tokens=6, temperature=1e-300)) == ids[3:]  # tiny: greedy, not NaN
    sampled = list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert sampled == list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert all(0 <= t < 100 for t in sampled)


def test_fully_masked_batch_has_zero_loss_and_zero_gradients():
    """A micro-batch whose targets are all ignored (an SFT batch of padding) adds nothing, not NaN."""
    model = randomize_(build_model(tiny_config(**RECIPE_2026)))
    idx = random_tokens(model.config, 2, 16)
    targets = torch.full_like(idx, -1)
    for reduction in ("mean", "sum"):
        loss = model(idx, targets, loss_reduction=reduction)
        assert loss.item() == 0
        loss.backward()
        assert all(torch.all(p.grad == 0) for p in model.parameters())
        model.zero_grad(set_to_none=True)
    assert torch.all(model(idx, targets, loss_reduction="none") == 0)


def train_losses(steps, seed=0):
    config = tiny_config(**RECIPE_2026)
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
    # smear and backout: one AdamW group at a fixed LR, whatever the width
    model = build_model(tiny_config(n_embd=128, **RECIPE_2026))
    smear_backout = [g for g in model.setup_optimizer(scalar_lr=0.4).param_groups
                     if any(p is model.backout_lambda for p in g["params"])]
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in smear_backout] == [(0.2, (0.8, 0.95), 0.0)]
    assert {id(p) for p in smear_backout[0]["params"]} == {id(model.smear_gate.weight), id(model.smear_lambda),
                                                          id(model.backout_lambda)}


DIST_SCRIPT = """
import torch, torch.distributed as dist
from nanochat.common import compute_init, compute_cleanup
from nanochat.gpt import GPT
from nanochat.optim import DistMuonAdamW
from helpers import tiny_config
ddp, rank, _, world_size, device = compute_init("cpu")
torch.manual_seed(0)
model = GPT(tiny_config(sequence_len=16, window_pattern="SSSL", smear=True, backout=True))
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
    returncode, output = run_torchrun(script)
    assert returncode == 0, output
    assert "rank 0 ok" in output and "rank 1 ok" in output


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
    config = tiny_config(**RECIPE_2026)
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
    from nanochat.kv_cache import KVCache
    config = tiny_config(**RECIPE_2026)
    model = randomize_(build_model(config))
    cache = KVCache(batch_size=2, num_heads=config.n_kv_head, seq_len=20, head_dim=config.n_embd // config.n_head,
                    num_layers=config.n_layer, device="cpu", dtype=torch.float32, embed_dim=config.n_embd)
    idx = random_tokens(config, 2, 20, seed=5)
    with torch.no_grad(), CountHostReads() as reads:
        pieces = [model(idx[:, :12], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    assert reads.count == 0
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), atol=1e-4, rtol=1e-4)


def test_kv_cache_of_the_established_seven_arguments_decodes_a_smeared_model():
    """KVCache(batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype), as nanochat's users build it:
    the smear's previous-token state is created by the first forward, and prefill + decode equals one forward."""
    from nanochat.kv_cache import KVCache
    config = tiny_config(**RECIPE_2026)
    model = randomize_(build_model(config))
    cache = KVCache(2, config.n_kv_head, 20, config.n_embd // config.n_head, config.n_layer, "cpu", torch.float32)
    assert cache.prev_embed is None
    idx = random_tokens(config, 2, 20, seed=6)
    with torch.no_grad():
        pieces = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
        assert cache.prev_embed.shape == (2, config.n_embd)
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), atol=1e-4, rtol=1e-4)
        wider = KVCache(3, config.n_kv_head, 20, config.n_embd // config.n_head, config.n_layer, "cpu", torch.float32)
        one = KVCache(1, config.n_kv_head, 20, config.n_embd // config.n_head, config.n_layer, "cpu", torch.float32)
        model(idx[:1, :7], kv_cache=one)
        wider.prefill(one)  # the Engine's prompt-once, sample-many copy carries the smear state along
        torch.testing.assert_close(wider.prev_embed, one.prev_embed.expand(3, -1))


def test_training_and_decoding_keep_every_tensor_on_the_model_device():
    """
    A training step and a decode step on the meta device: any tensor the code makes without device=... lands on
    the CPU and fails to mix with meta tensors, the bug that would break the same code on CUDA. (A FakeTensor
    "cuda" trace is not possible without CUDA: the CPU build aborts the process on .to() of a fake CUDA tensor.)
    """
    from nanochat.kv_cache import KVCache
    config = tiny_config(**RECIPE_2026)
    model = build_gpt(config, "meta")
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, config.vocab_size, (2, 16), device="meta")
    model(idx, idx).backward()
    optimizer.step()
    cache = KVCache(2, config.n_kv_head, 16, config.n_embd // config.n_head, config.n_layer, "meta", torch.float32,
                    config.n_embd)
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
    config = tiny_config(n_layer=2, window_pattern="L", **RECIPE_2026)
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
