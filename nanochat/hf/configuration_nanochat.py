"""
The configuration of a nanochat model exported for Hugging Face transformers.

Every architecture constant is a field, so one modeling file serves models trained with any recipe. The
defaults are the original (January) design: a field absent from config.json means that design's value.
The derived per-layer facts (attention windows, which layers own a value embedding) are written out by the
exporter from the trained model itself, so this code never re-derives them.
"""

from transformers import PretrainedConfig


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat"
    # transformers' generic code (generate, caches, pipelines) reads the standard names
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
    }

    def __init__(
        self,
        vocab_size=32768,  # real tokens; the embedding tables have padded_vocab_size rows
        padded_vocab_size=32768,  # rounded up to a multiple of 64 for the matmul; logits are cropped back
        sequence_len=2048,  # the training context
        n_layer=12,
        n_head=6,  # query heads
        n_kv_head=6,  # key/value heads (grouped-query attention when fewer)
        n_embd=768,
        window_pattern="SSSL",  # how the windows below were made: L = sequence_len, S = short_window
        short_window=0,  # tokens of an S layer (0: sequence_len // 2)
        window_sizes=None,  # left attention window of each layer: a query at i sees keys i - w .. i
        value_embed_layers=None,  # layers whose values get a gated token-embedding lookup added
        ve_gate_channels=32,  # leading channels of the attention input that the value-embedding gate reads
        ve_gate_scale=2.0,  # gate = ve_gate_scale * sigmoid(ve_gate(x[..., :ve_gate_channels]))
        rotary_base=10000.0,
        rotary_length=None,  # positions the trained model's rotary tables cover (default 10 x sequence_len)
        qk_scale=1.0,  # q and k are multiplied by this after QK-norm
        logit_softcap=15.0,  # logits = softcap * tanh(z / softcap)
        smear=False,  # each token's embedding mixes in the previous token's through a learned gate
        smear_gate_channels=24,  # leading embedding channels the smear gate reads
        backout=False,  # the residual after backout_layer is partly subtracted before the final norm
        backout_layer=None,  # default n_layer // 2
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.sequence_len = sequence_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        self.short_window = short_window
        self.window_sizes = list(window_sizes) if window_sizes is not None else [sequence_len] * n_layer
        if value_embed_layers is None:  # the original rule: alternating layers, the last one always
            value_embed_layers = [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]
        self.value_embed_layers = list(value_embed_layers)
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_scale = ve_gate_scale
        self.rotary_base = rotary_base
        self.rotary_length = rotary_length if rotary_length is not None else 10 * sequence_len
        self.qk_scale = qk_scale
        self.logit_softcap = logit_softcap
        self.smear = smear
        self.smear_gate_channels = smear_gate_channels
        self.backout = backout
        self.backout_layer = backout_layer if backout_layer is not None else n_layer // 2
        # what clients read as the context (lm-eval's window, pipelines' limits): the one the model was trained on;
        # positions run on to rotary_length, as in nanochat, for generations that go past it
        self.max_position_embeddings = sequence_len
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
