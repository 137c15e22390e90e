"""
The GPT model: a Transformer with the tuned details of the nanochat design.

- rotary position embeddings (RoFormer, Su et al. 2021; no learned positions), QK-norm (Henry et al. 2020),
  parameter-free RMSNorm (Zhang & Sennrich 2019) everywhere
- untied token embedding and lm_head; ReLU^2 MLP (Primer, So et al. 2021); no biases
- every block's input mixes in the normed token embedding x0 through learnable per-layer scalars
  (from the modded-nanogpt speedrun)
- value embeddings: alternating layers add a gated per-token table lookup to v (modded-nanogpt's, after
  ResFormer's value residual, Zhou et al. 2024)
- sliding-window attention per layer (window_pattern), local layers between global ones as in Gemma 2
  (Gemma Team 2024); the last layer always sees the full context
- smear: each token's embedding mixes in the previous token's through a learned gate (a cheap bigram)
- backout: a learned share of the mid-depth residual is subtracted before the lm_head
- logits soft-capped with tanh (Gemma 2); vocab padded to a multiple of 64 and cropped back (as nanoGPT
  pads GPT-2's 50257 to 50304)
The constants (init scales, LRs, betas, the 2026 values of config_for_depth) are upstream nanochat's
tuning; our d4 ablation of the 2026 changes is dev/LOG.md, "2026-11-30: the 2026 training recipe".

GPTConfig's defaults are the January 2026 architecture, so a checkpoint whose saved config predates a field
loads as it was trained; config_for_depth() gives new models the 2026 values.

Precision without autocast: the embeddings are stored in the run's compute dtype (common.get_compute_dtype:
bf16 where the device multiplies bf16 fast, else fp32), so the activations start in it, and every Linear casts
its fp32 master weight to its input's dtype. Logits and the loss are fp32.

Construct under torch.device("meta"), then `to_empty(device=...)` and `init_weights()` (build_gpt does both).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat import flash_attention
from nanochat.common import get_compute_dtype, is_distributed
from nanochat.flash_attention import flash_attn
from nanochat.optim import DistMuonAdamW, MuonAdamW

LOGIT_SOFTCAP = 15.0  # logits live in (-15, 15): bounded logits keep early training stable (Gemma 2 caps at 30)
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x sequence_len, so generation can run past it
SMEAR_CHANNELS = 24  # the smear gate reads only the first 24 channels of the token embedding
SMEAR_BACKOUT_PARAMS = ("smear_gate.", "smear_lambda", "backout_lambda")
INIT_RECIPES = ("2026", "january")  # init_weights(recipe): the January one stays for ablations


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA, Ainslie et al. 2023, when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers: L = full context, S = short_window
    rotary_base: float = 10000.0
    qk_scale: float = 1.0  # q and k are multiplied by it after QK-norm: sharper attention than unit vectors give
    short_window: int = 0  # keys an "S" layer sees; 0 = sequence_len // 2
    ve_gate_channels: int = 32  # leading channels of the block input that the value-embedding gate reads
    ve_gate_scale: float = 2.0  # the value-embedding gate is ve_gate_scale * sigmoid(...)
    smear: bool = False
    backout: bool = False


def config_for_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, window_pattern="SSSL"):
    """The one dial: width = depth * aspect_ratio, rounded up to whole heads of head_dim; the 2026 architecture."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern.upper(),
                     rotary_base=100000.0, qk_scale=1.2,
                     short_window=math.ceil(sequence_len / 512) * 128,  # sequence_len / 4, up to a multiple of 128
                     ve_gate_channels=12, ve_gate_scale=3.0, smear=True, backout=True)


def build_gpt(config, device, init="2026"):
    """A freshly initialised GPT on device: built on meta first, so parameters get memory only once."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(init)
    return model


class Linear(nn.Linear):
    """
    A bias-free Linear whose fp32 master weight is cast to the input's dtype, so the matmul runs in the compute
    dtype the activations carry while the optimizer updates fp32 weights. Every matmul of the model is one of
    these: a lower-precision variant (fp8) is a subclass that overrides forward.
    """

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def norm(x):
    """Parameter-free RMSNorm over the last dim (torch's default eps)."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers own a value embedding, the last layer always does."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs formed by the two halves of each head: (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


def compute_window_sizes(config):
    """(left, right) attention window per layer from the tiled window_pattern; the final layer is always full."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern must be a string of 'S' and 'L' (e.g. 'SSSL' or 'L'), "
                         f"got {config.window_pattern!r}")
    long_window, short_window = (config.sequence_len, 0), (config.short_window or config.sequence_len // 2, 0)
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window
    return sizes


def check_config(config):
    if config.n_embd % config.n_head != 0 or (config.n_embd // config.n_head) % 2 != 0:
        raise ValueError(f"n_embd ({config.n_embd}) must split into n_head ({config.n_head}) heads of even size")
    if config.n_head % config.n_kv_head != 0:
        raise ValueError(f"n_kv_head ({config.n_kv_head}) must divide n_head ({config.n_head})")
    if config.n_embd < config.ve_gate_channels:
        raise ValueError(f"n_embd must be at least ve_gate_channels ({config.ve_gate_channels}), the channels the "
                         f"value-embedding gate reads")
    if config.smear and config.n_embd < SMEAR_CHANNELS:
        raise ValueError(f"n_embd must be at least {SMEAR_CHANNELS} (the smear gate reads that many channels)")
    if config.short_window < 0:
        raise ValueError(f"short_window must be >= 0 (0 = sequence_len // 2), got {config.short_window}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale, self.ve_gate_scale = config.qk_scale, config.ve_gate_scale
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = Linear(config.ve_gate_channels, self.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # per-head gate in (0, ve_gate_scale), about half of it at init: the value embedding starts mixed in
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = (t.to(q.dtype) for t in cos_sin)  # tables are bf16; match an fp32 compute dtype
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale  # QK-norm
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            if not torch.compiler.is_compiling():
                # Eager: attend over the filled prefix only, its length known on the host (no GPU sync). A compiled
                # step keeps the whole cache: the same shapes at every position.
                end = kv_cache.get_pos() + T
                k_cache, v_cache = k_cache[:, :end], v_cache[:, :end]
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.window_sizes = compute_window_sizes(config)
        # A vocab that is a multiple of 64 keeps the lm_head matmul on efficient tile sizes; logits are cropped.
        padded_vocab_size = math.ceil(config.vocab_size / 64) * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, padded_vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(padded_vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        if config.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        # Not persistent: derived from the config, so they stay out of checkpoints; init_weights() fills them.
        cos, sin = self._precompute_rotary(self.rotary_length, head_dim, config.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def rotary_length(self):
        return ROTARY_LENGTH_FACTOR * self.config.sequence_len

    @staticmethod
    def _precompute_rotary(seq_len, head_dim, base, device=None):
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        # (1, T, 1, head_dim/2): broadcasts over batch and heads of (B, T, H, D) tensors
        return angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, recipe="2026"):
        """
        Initialize every parameter and buffer in place (after construction on meta + to_empty). recipe "2026"
        (new models) or "january" (the earlier init, kept for ablations): the 2026 one starts with smaller token
        embeddings and MLP inputs, and residual/x0 scalars that fall with depth instead of being constant.
        """
        if recipe not in INIT_RECIPES:
            raise ValueError(f"init recipe must be one of {INIT_RECIPES}, got {recipe!r}")
        new = recipe == "2026"
        n_embd, n_layer = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3) / math.sqrt(n_embd)  # uniform(-b, b) has the std of N(0, 1/n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if new else 1.0)
        # a near-zero lm_head: the first logits are near uniform, so the loss starts at ln(vocab_size)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            fc_bound = 0.4 * bound if new else bound
            nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02 if new else 0.0)  # (January: exactly zero)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        device = self.get_device()
        depth = torch.arange(n_layer, device=device) / max(n_layer - 1, 1)  # 0 at the first layer, 1 at the last
        self.resid_lambdas.copy_(1.15 - 0.10 * depth if new else torch.ones_like(depth))
        self.x0_lambdas.copy_(0.20 - 0.15 * depth if new else torch.full_like(depth, 0.1))
        if self.config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()  # smear starts off; training opens it
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        head_dim = n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary(self.rotary_length, head_dim, self.config.rotary_base, device)
        # Settle the attention backend and build its masks now, eagerly: doing either inside a torch.compile
        # trace would leave graph breaks or extra work in the compiled model for good.
        flash_attention.prepare(device, self.config.sequence_len, self.window_sizes)
        # The embeddings' dtype is the model's compute dtype: the activations start in it (see Linear).
        compute_dtype = get_compute_dtype(device.type)
        self.transformer.wte.to(dtype=compute_dtype)
        for table in self.value_embeds.values():
            table.to(dtype=compute_dtype)

    def get_device(self):
        return self.transformer.wte.weight.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logit_positions=None):
        """
        idx (B, T) token ids -> logits (B, T, vocab_size) fp32, or the loss when targets are given.
        logit_positions (rows, positions), two index tensors of N entries: only those logits, (N, vocab_size). A
        caller that scores a few tokens per row skips the unembedding (vocab x width FLOPs per token) elsewhere.
        """
        B, T = idx.size()
        # get_pos(): the longest row. (A compiled decode step skips the check: reading the cache's Python
        # position would recompile every step.)
        pos0 = 0 if kv_cache is None or torch.compiler.is_compiling() else kv_cache.get_pos()
        if pos0 + T > self.rotary_length:
            raise ValueError(f"Position {pos0 + T} is beyond the rotary tables ({self.rotary_length} = "
                             f"{ROTARY_LENGTH_FACTOR} x sequence_len); use a shorter context")
        if kv_cache is None:
            cos_sin = self.cos[:, :T], self.sin[:, :T]
        else:
            # Per-row positions from the cache's lengths tensor: rows may hold different numbers of tokens (a
            # server batches unrelated conversations), and a compiled step sees the same shapes at every step.
            positions = kv_cache.cache_seqlens.unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            cos_sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, head_dim/2)
        x = norm(self.transformer.wte(idx))  # in the compute dtype, as the embeddings are stored
        if self.config.smear:
            x = self.smear(x, kv_cache)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if self.config.backout and i == self.config.n_layer // 2:
                x_mid = x
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_mid  # take back what the lower half wrote, in part
        if kv_cache is not None:
            kv_cache.advance(T)
        if logit_positions is not None:
            x = x[logit_positions]
        # Softcap 15 * tanh(z / 15) with the division moved before the (linear) lm_head: the hidden state is
        # vocab/n_embd times smaller than the logits, which saves two full passes over them (fwd + bwd).
        logits = self.lm_head(norm(x) / LOGIT_SOFTCAP)
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]  # drop the padding columns
        logits = LOGIT_SOFTCAP * torch.tanh(logits.float())  # logits and loss in fp32
        if targets is None:
            return logits
        reduction = "sum" if loss_reduction == "mean" else loss_reduction
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction=reduction)
        if loss_reduction == "mean":
            # torch's mean over zero targets (a fully masked micro-batch) is 0/0 = NaN; ours is 0, with zero gradients
            loss = loss / (targets != -1).sum().clamp(min=1)
        return loss if loss_reduction != "none" else loss.view(B, T)

    def smear(self, x, kv_cache):
        """
        x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1] over normed token embeddings. With a KV
        cache, the x[t-1] of each row's first new token is the one the cache kept from the previous call (so a
        decode step or a later prefill chunk is smeared like one full forward); a row with no tokens has none.
        """
        B, _, C = x.shape
        if kv_cache is None:
            previous = x.new_zeros(B, 1, C)
        else:
            if kv_cache.prev_embed is None:  # a cache built without embed_dim: its first forward creates it
                kv_cache.prev_embed = x.new_zeros(B, C)
            has_previous = (kv_cache.cache_seqlens > 0).view(B, 1, 1)
            previous = torch.where(has_previous, kv_cache.prev_embed.unsqueeze(1).to(x.dtype), 0.0)
            kv_cache.prev_embed.copy_(x[:, -1])
        shifted = torch.cat([previous, x[:, :-1]], dim=1)
        gate = torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + self.smear_lambda.to(x.dtype) * gate * shifted

    def num_scaling_params(self):
        """Parameter counts by kind (scaling-law fits use transformer_matrices + lm_head)."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            # (with smear and backout's lambdas and the smear gate's 24 weights)
            "scalars": sum(p.numel() for name, p in self.named_parameters()
                           if name.startswith(("resid_lambdas", "x0_lambdas", *SMEAR_BACKOUT_PARAMS))),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        return counts

    def estimate_flops(self):
        """FLOPs per token of one training step: 6 per matmul weight plus the attention score/value matmuls."""
        # every Linear (fp8 ones too); embeddings are lookups, and the elementwise scalars are negligible
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        head_dim = self.config.n_embd // self.config.n_head
        T = self.config.sequence_len
        attention_flops = sum(12 * self.config.n_head * head_dim * (T if left < 0 else min(left, T))
                              for left, _ in self.window_sizes)
        return 6 * matmul_params + attention_flops

    def setup_optimizer(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=None, scalar_lr=0.5):
        """
        One optimizer for everything: AdamW for embeddings, lm_head and scalars, Muon for block matrices.
        The LRs arrive scaled for the batch size; weight_decay is Muon's (the AdamW decays are fixed here).
        adam_betas: one (beta1, beta2) for the lm_head, embedding and resid groups, as in the January recipe;
        None (the default) gives each group the betas tuned for it below.
        """
        # The AdamW learning rates were tuned at width 768 (d12); wider models take steps smaller by
        # 1/sqrt(width), upstream nanochat's rule.
        scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, weight_decay=0.0):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=weight_decay)

        def tuned(betas):
            return betas if adam_betas is None else tuple(adam_betas)

        # AdamW (Loshchilov & Hutter 2019). Each table and scalar set gets its own betas and decay (upstream
        # nanochat's 2026 tuning, worth 0.038 bpb at d4: dev/LOG.md, "the 2026 training recipe"): the embeddings
        # see sparse, rare-token gradients, so a long second-moment memory (0.995) keeps their steps from
        # jumping when a rare token shows up; a little decay keeps unused rows from drifting.
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * scale, tuned((0.8, 0.96)), weight_decay=0.01),
            adamw([self.transformer.wte.weight], embedding_lr * scale, tuned((0.8, 0.995)), weight_decay=0.001),
            # value embeddings enter every other layer's values directly: half the token-embedding LR (at 1x, with
            # the January unembedding LR, d4 lost 0.2 bpb: dev/LOG.md, "the 2026 training recipe")
            adamw(list(self.value_embeds.parameters()), 0.5 * embedding_lr * scale, tuned((0.8, 0.995)), weight_decay=0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, tuned((0.8, 0.95)), weight_decay=0.05),  # sensitive: move slowly
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95)),  # higher beta1 for x0 helped at d20
        ]
        # The smear and backout gates (present only when the config turns them on) are a handful of scalars
        # whose useful range does not depend on the model size or batch: a fixed LR 0.2, no decay.
        gates = [p for name, p in self.named_parameters() if name.startswith(SMEAR_BACKOUT_PARAMS)]
        if gates:
            groups.append(adamw(gates, 0.2, (0.8, 0.95)))
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrices}):  # Muon stacks same-shape matrices into one update
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        for group in groups:
            group["initial_lr"] = group["lr"]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        distributed = is_distributed() and dist.get_world_size() > 1
        return DistMuonAdamW(groups) if distributed else MuonAdamW(groups)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive streaming generation (full forward per token, no cache): the reference for the Engine."""
        device = self.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_best, -float("inf"))
            if temperature > 0:  # (max subtracted, divisor >= the smallest normal float: a tiny temperature is greedy, not NaN)
                logits = logits - logits.max(dim=-1, keepdim=True).values
                probs = F.softmax(logits / max(temperature, torch.finfo(logits.dtype).tiny), dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
