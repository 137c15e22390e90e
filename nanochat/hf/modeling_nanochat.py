"""
A nanochat model in Hugging Face transformers: the same math as nanochat's gpt.py, written for the export.

- token embedding, parameter-free RMSNorm (no weights anywhere); optional smear: each token's embedding
  mixes in the previous token's through a learned gate
- before every block: x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the normed embedding)
- attention: rotary embeddings (pairs formed from the two halves of each head), then QK-norm times qk_scale;
  a left window per layer (a query at i sees keys i - w .. i); grouped-query heads
- value embeddings: some layers add a gated token-embedding lookup to v
- MLP: ReLU squared; no biases anywhere
- optional backout: the residual after the middle layer is partly subtracted before the final norm
- untied lm_head, logits soft-capped with tanh, vocab padded to a multiple of 64 and cropped back

The parameter names are nanochat's own, so the safetensors file holds exactly the trained state dict.
Generation keeps every key and value in a transformers DynamicCache and applies the windows as masks; the
cache also carries each row's last real token embedding, which smear needs at the next step (beam search
reorders it with the cache; assisted decoding, which crops the cache, would leave it stale).

Padding: attention_mask (B, past + T) marks each row's real tokens, wherever the pads sit (left, right or
between chunks). A row computes exactly what it computes alone: its positions count its real tokens only (the
first one is position 0), windows are measured in those positions, no real token attends to a pad, and smear's
"previous token" is the previous real one. position_ids are derived from the mask, never taken as given.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanochatConfig

# transformers renamed the cache argument and output field from past_key_values to cache in 5.x
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def norm(x):
    """Parameter-free RMSNorm over the last dim (torch's default eps)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_cos_sin(positions, head_dim, base):
    """cos, sin of shape (B, T, 1, head_dim / 2) for the absolute positions (B, T) of each row's tokens."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    # nanochat keeps its rotary tables in bf16: rounding the same way gives the trained model's exact angles
    return angles.cos().bfloat16()[:, :, None, :], angles.sin().bfloat16()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate pairs formed by the two halves of each head: (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


def token_positions(attention_mask):
    """(B, S) mask of real tokens -> (B, S) positions: a row's real tokens count 0, 1, 2, ...; a pad gets the
    position of the real token before it (0 before any), which no real token ever looks at."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def attention_masks(attention_mask, positions, num_queries, windows):
    """
    -> {window: (B, 1, T, S) bool}: the last T of the S tokens attend, True where query i may see key j: j is a
    real token at or before i (in the sequence) whose position is within the window, q - window <= k <= q. A pad
    query sees itself alone: a row of a softmax with nothing to attend would be NaN, and 0 * NaN leaks NaN into
    real rows through the values.
    """
    S = attention_mask.size(1)
    key_index = torch.arange(S, device=attention_mask.device)
    query_index = key_index[S - num_queries:]
    causal = key_index[None, :] <= query_index[:, None]  # (T, S)
    key_real = attention_mask.bool()[:, None, :]  # (B, 1, S)
    key_pos, query_pos = positions[:, None, :], positions[:, S - num_queries:, None]  # (B, 1, S), (B, T, 1)
    itself = (key_index[None, :] == query_index[:, None])[None]  # (1, T, S)
    query_pad = ~attention_mask.bool()[:, S - num_queries:, None]  # (B, T, 1)
    masks = {}
    for w in windows:
        visible = causal & key_real & (key_pos >= query_pos - w)
        masks[w] = (visible | (itself & query_pad))[:, None]
    return masks


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.config.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.config.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * self.config.qk_scale, norm(k) * self.config.qk_scale
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # every key and value so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    _no_split_modules = ["Block"]  # device_map="auto" keeps each block (and its residual) on one device

    def __init__(self, config):
        super().__init__(config)
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        if config.smear:
            self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights come from a trained checkpoint

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def smear(self, x, real, cache):
        """
        x[t] += smear_lambda * sigmoid(smear_gate(x[t, :channels])) * x[p], p the real token before t; zeros when
        there is none (a row's first real token). real (B, T) marks this chunk's real tokens. The cache carries
        each row's last real embedding to the next chunk (zeros before any: normed embeddings are never zero).
        """
        B, T, C = x.shape
        carried = getattr(cache, "smear_previous_embedding", None) if cache is not None else None
        if carried is None:
            carried = x.new_zeros(B, 1, C)
        # index in [carried, x[0], ..., x[T-1]] of the last real token before each t (0: the carried one)
        index = torch.arange(1, T + 1, device=x.device).expand(B, T)
        last_real = torch.where(real, index, 0).cummax(dim=1).values  # up to and including t
        before = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)
        candidates = torch.cat([carried, x], dim=1)
        previous = candidates.gather(1, before[..., None].expand(B, T, C))
        if cache is not None:  # the next chunk's first real token mixes in this chunk's last real one
            cache.smear_previous_embedding = candidates.gather(1, last_real[:, -1:, None].expand(B, 1, C))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_gate_channels]))
        return x + gate * previous

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        """
        input_ids (B, T) -> logits (B, T, vocab_size) in fp32 (the last logits_to_keep positions if > 0).
        attention_mask (B, past + T): 1 on real tokens, 0 on padding (default: all real).
        """
        config = self.config
        # position_ids is no parameter, so generate() does not make it: windows need the positions of the cached
        # keys too, and the mask is their one source
        if kwargs.get("position_ids") is not None:
            raise ValueError("This nanochat export derives positions from attention_mask (a row's first real token "
                             "is position 0): leave position_ids out")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.size()
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > config.rotary_length:
            raise ValueError(f"Position {past + T} is beyond the {config.rotary_length} positions this model's rotary "
                             f"embeddings cover; use a shorter context")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        positions = token_positions(attention_mask)
        head_dim = config.n_embd // config.n_head
        cos, sin = rotary_cos_sin(positions[:, past:], head_dim, config.rotary_base)
        masks = attention_masks(attention_mask, positions, T, set(config.window_sizes))

        x = norm(self.transformer.wte(input_ids))
        if config.smear:
            x = self.smear(x, attention_mask[:, past:].bool(), cache)
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[config.window_sizes[i]], cache)
            if i == config.backout_layer:
                x_mid = x
        if config.backout:
            x = x - self.backout_lambda * x_mid  # take back part of the middle layer's residual
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        softcap = config.logit_softcap
        logits = self.lm_head(norm(x) / softcap)[..., :config.vocab_size]  # divide before the (linear) head
        logits = softcap * torch.tanh(logits.float())

        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    def _reorder_cache(self, cache, beam_idx):
        """Beam search: the rows of the cache follow their beams, smear's previous embedding included."""
        cache.reorder_cache(beam_idx)
        if getattr(cache, "smear_previous_embedding", None) is not None:
            cache.smear_previous_embedding = cache.smear_previous_embedding.index_select(0, beam_idx)
        return cache
