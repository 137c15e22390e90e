"""
Models, checkpoints and servers several test modules share (a test module never imports another, nor does a
torchrun worker): the tiny model config every test builds on (tiny_config) and tiny random GPTs, mocks that
honour the Engine's model contract, the chat server run for real on a free local port, the bits-per-byte
fixtures and a tiny checkpoint for the chat stages.
"""
import contextlib
import socket
import threading
import time
from dataclasses import asdict

import torch

from nanochat.gpt import GPTConfig, build_gpt

# The tests' tiny GPT: 2 layers of width 64, 2 heads, full attention, a 64-token vocab and 32-token context.
TINY_CONFIG = dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")


def tiny_config(**overrides):
    """TINY_CONFIG as a GPTConfig, with what a test changes (a bigger vocab, GQA, short windows, smear...)."""
    return GPTConfig(**{**TINY_CONFIG, **overrides})


def make_gpt(vocab_size, sequence_len=64, device="cpu"):
    """A tiny random GPT of the 2026 architecture whose every part matters: init_weights zeroes the output
    projections and smear_lambda, so redraw all matrices (otherwise attention, and with it the KV cache, would
    not influence the logits) and turn smear and backout well on."""
    config = tiny_config(sequence_len=sequence_len, vocab_size=vocab_size, n_head=4, window_pattern="SL", rotary_base=100000.0,
                         qk_scale=1.2, short_window=32, ve_gate_channels=12, ve_gate_scale=3.0, smear=True, backout=True)
    model = build_gpt(config, device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.size(1) ** -0.5)
        model.smear_lambda.fill_(0.8)
        model.backout_lambda.fill_(0.5)
    return model.eval()


def tiny_gpt(vocab_size, sequence_len=128):
    """A tiny January-architecture GPT with every parameter redrawn large, so scores differ clearly."""
    config = tiny_config(sequence_len=sequence_len, vocab_size=vocab_size, n_kv_head=1, window_pattern="SL")
    return redrawn_gpt(config, scale=0.3)


def redrawn_gpt(config, scale):
    """A GPT of this config with every parameter redrawn from N(0, scale^2) (seed 0), in eval mode."""
    model = build_gpt(config, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


class MockConfig:
    """The config fields the Engine reads from a model, for mocks."""
    n_layer, n_head, n_kv_head, n_embd, sequence_len = 2, 2, 1, 8, 128


class ScriptedConfig:
    n_layer, n_head, n_kv_head, n_embd, sequence_len = 1, 1, 1, 4, 256


class ScriptedModel:
    """
    Engine contract mock: after a prompt of prompt_len tokens each row writes `script`, one token per step
    (then repeats its last token). delay: seconds per forward, a slow model. Records (B, T) per forward.
    """

    def __init__(self, vocab_size, script, prompt_len, delay=0.0):
        self.config = ScriptedConfig()
        self.vocab_size, self.script, self.prompt_len, self.delay = vocab_size, script, prompt_len, delay
        self.calls = []

    def get_device(self):
        return "cpu"

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        self.calls.append((B, T))
        time.sleep(self.delay)
        logits = torch.zeros(B, T, self.vocab_size)
        for b, cached in enumerate(kv_cache.cache_seqlens.tolist()):
            logits[b, -1, self.script[min(cached + T - self.prompt_len, len(self.script) - 1)]] = 100.0
        kv_cache.advance(T)
        return logits


@contextlib.contextmanager
def serve(app, **config):
    """Run the app with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn
    from scripts.chat_web import server_config  # only the server helpers need the web stack
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def scripted_server_app(tokenizer, text, **kwargs):
    """An app whose model answers the first message "hi" with `text` then <|assistant_end|>."""
    from scripts.chat_web import create_app, render_prompt
    messages = [{"role": "user", "content": "hi"}]
    prompt, _ = render_prompt(tokenizer, messages, ScriptedConfig.sequence_len)
    script = tokenizer.encode(text) + [tokenizer.encode_special("<|assistant_end|>")]
    return create_app([(ScriptedModel(tokenizer.get_vocab_size(), script, len(prompt)), tokenizer)], **kwargs), script


MESSAGES = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me about the history of Rome."}]


# Bits per byte: a model, token byte counts and batches with ignored and zero-byte (special-token) targets
BPB_VOCAB = 96
BPB_ZERO_BYTE_IDS = [90, 91]  # token ids standing for special tokens: 0 bytes


def bpb_model():
    """A small random GPT for the bits-per-byte tests (and their workers on other ranks)."""
    config = tiny_config(sequence_len=16, vocab_size=BPB_VOCAB, n_embd=32)
    return redrawn_gpt(config, scale=0.2)


def bpb_token_bytes():
    token_bytes = torch.randint(1, 5, (BPB_VOCAB,), generator=torch.Generator().manual_seed(0))
    token_bytes[BPB_ZERO_BYTE_IDS] = 0
    return token_bytes


def bpb_batches(seed, num_batches=2):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        x = torch.randint(0, BPB_VOCAB, (3, 16), generator=gen)
        y = torch.randint(0, BPB_VOCAB, (3, 16), generator=gen)
        y[0, :3] = -1  # ignored positions (e.g. masked chat tokens)
        y[1, 5], y[2, 7] = BPB_ZERO_BYTE_IDS  # special-token targets
        batches.append((x, y))
    return batches


# A tiny checkpoint the chat stages start from, as base_train would have left it
MODEL_TAG = "d2"
# What base_train records for the stages that continue it (distinctive values, so a test can tell them apart)
DEVICE_BATCH_SIZE = 2
RESOLVED = {"total_batch_size": 512, "embedding_lr": 0.25, "unembedding_lr": 0.02, "matrix_lr": 0.03, "scalar_lr": 0.4}


def make_tiny_checkpoint(base_dir, tokenizer, stage_dirs, with_optimizer=False):
    """
    Save the tokenizer and one tiny random GPT (step 0) under base_dir/<stage_dir>/d2 for each stage dir,
    with the batch and LRs a base run records, and (with_optimizer) the state of an optimizer that took
    one step, as base_train saves it.
    """
    from nanochat.checkpoint_manager import save_checkpoint
    tokenizer.save(str(base_dir / "tokenizer"))
    config = tiny_config(sequence_len=256, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = build_gpt(config, "cpu")
    optimizer_data = None
    if with_optimizer:
        optimizer = model.setup_optimizer(**{k: v for k, v in RESOLVED.items() if k.endswith("_lr")})
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # a zero step: moments exist, the weights stay those of the fresh model
        optimizer.step()
        optimizer_data = optimizer.state_dict()
    meta = {"step": 0, "finished": True, "model_config": asdict(config), "device_batch_size": DEVICE_BATCH_SIZE,
            "resolved": RESOLVED}
    for stage_dir in stage_dirs:
        save_checkpoint(str(base_dir / stage_dir / MODEL_TAG), 0, model.state_dict(), optimizer_data, meta)
    return config
