"""
Fast inference: batched sampling on a KV cache (nanochat/kv_cache.py) and the calculator tool.

The naive GPT.generate re-runs the whole sequence for every new token (quadratic work). The Engine
runs the prompt through the model once (prefill, batch 1), copies that cache into num_samples rows,
then feeds one token per row per step (decode, optionally one compiled graph for every step). Each row
also runs a small tool-use state machine: when the model closes a <|python_start|> ... <|python_end|>
block, the engine evaluates the expression with a safe calculator and forces
<|output_start|> result <|output_end|> into that row.

The Engine needs only a narrow contract, so tests can drive it with mock models:
model.config (n_layer, n_head, n_kv_head, n_embd, sequence_len), model.get_device(), and
model.forward(ids, kv_cache=cache) -> logits (B, T, V), where the model calls cache.advance(T) and row b's
new tokens sit at positions cache.cache_seqlens[b] onwards; tokenizer.encode(text), decode(ids),
get_bos_token_id(), encode_special(name).

nanochat/serving.py builds continuous batching (a server's many conversations in one decode loop) on
the same pieces: the cache's per-row lengths, decode(), RowState and update_row().
"""

import ast
import operator
import re
import time
from collections import deque

import torch

from nanochat.common import get_compute_dtype
from nanochat.kv_cache import KVCache


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """
    (B, V) logits -> (B,) token ids. temperature 0 is greedy; top_k keeps the k most likely ids; top_p keeps
    the most likely ids until their probability reaches top_p (nucleus sampling, Holtzman et al. 2020), the
    first one always.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] or None, got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # A tiny temperature must not give nan (inf - inf, or 0 / 0): the logits are scaled after subtracting their
    # max, so the others go to -inf instead of the max to inf, and by no less than the dtype's smallest normal
    # number (1e-300 is 0 in fp32). Such a temperature samples the most likely id, as it should.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    indices = None  # where the kept logits sit in the vocab, once they are a subset
    if top_k is not None and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k, dim=-1)
    if top_p is not None and top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
        indices = order if indices is None else indices.gather(-1, order)
        probs = torch.softmax(logits / temperature, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the ids before it already reach top_p
        outside[..., 0] = False
        logits = logits.masked_fill(outside, -float("inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return (choice if indices is None else indices.gather(-1, choice)).squeeze(-1)


# -------------------------------------------------------------------------------------------------
# The calculator tool, as GSM8K's solutions annotate their arithmetic for one (Cobbe et al. 2021). Model-written
# text is never eval'd: we parse it with `ast` and evaluate a whitelist ourselves, so only numbers,
# + - * / ** and "literal".count("literal") can run.

MAX_EXPRESSION_CHARS = 1000  # far above any GSM8K calculation; bounds parse time
MAX_INT_BITS = 4096  # ~1200 digits: every integer operation below this size takes microseconds
CALCULATOR_TIMEOUT_S = 0.1

BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def use_calculator(expression, timeout=CALCULATOR_TIMEOUT_S):
    """The result of a calculator expression as text, or None when it is not allowed or fails."""
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    deadline = time.monotonic() + timeout
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body, deadline)
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError, TimeoutError):
        return None
    # GSM8K's tool outputs write whole numbers without ".0"; match them so the model sees what it learned
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _evaluate(node, deadline):
    if time.monotonic() > deadline:
        raise TimeoutError("calculator expression took too long")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        return UNARY_OPS[type(node.op)](_number(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _number(node.left, deadline), _number(node.right, deadline)
        return _check_size(BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _number(node.left, deadline), _number(node.right, deadline)
        # refuse 9**9**9 before computing it: the result's size is known from the operands
        if isinstance(base, int) and isinstance(exponent, int) and base.bit_length() * exponent > MAX_INT_BITS:
            raise ValueError("power too large")
        return _check_size(base ** exponent)
    if _is_literal_count(node):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError(f"{type(node).__name__} is not allowed in a calculator expression")


def _number(node, deadline):
    value = _evaluate(node, deadline)
    if type(value) not in (int, float):
        raise TypeError("arithmetic needs numbers")
    return value


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError("integer too large")
    if isinstance(value, complex):  # a negative float to a fractional power
        raise ValueError("complex result")
    return value


def _is_literal_count(node):
    """"strawberry".count("r"): a string literal's count() with one string literal argument."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


TOOL_MARKUP = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


def reply_parts(text):
    """
    A reply as text, tool markers written out (as tokenizer.decode gives them, and as chat clients send
    earlier replies back) -> {"type": "text" | "python" | "python_output", "text"} parts, which the
    tokenizer's conversation rendering turns back into the real special tokens.
    """
    parts, last = [], 0
    for match in TOOL_MARKUP.finditer(text):
        parts.append({"type": "text", "text": text[last:match.start()]})
        is_call = match.group(1) is not None
        parts.append({"type": "python" if is_call else "python_output", "text": match.group(1 if is_call else 2)})
        last = match.end()
    parts.append({"type": "text", "text": text[last:]})
    return [p for p in parts if p["type"] != "text" or p["text"]]


# -------------------------------------------------------------------------------------------------

class RowState:
    """Per-row decoding state: tokens so far, tokens to force next, and the open python block."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.forced_tokens = deque()
        self.python_expr_tokens = None  # a list while inside <|python_start|> ... <|python_end|>
        self.completed = False


class StepCache:
    """
    A KVCache as a compiled decode step sees it: per-layer views, the previous embeddings and the lengths
    tensor, no Python position. The views come in as inputs because writing through a view taken inside the
    compiled graph makes inductor copy whole cache layers at every step (10x slower, measured in dev/LOG.md).
    """

    def __init__(self, k_layers, v_layers, prev_embed, cache_seqlens):
        self.k_layers, self.v_layers, self.prev_embed, self.cache_seqlens = k_layers, v_layers, prev_embed, cache_seqlens

    def get_layer_cache(self, layer_idx):
        return self.k_layers[layer_idx], self.v_layers[layer_idx]

    def advance(self, num_tokens):
        pass  # the Engine advances the real cache after the step


class Engine:

    def __init__(self, model, tokenizer, dtype=None, compile=False):
        """
        dtype: the KV cache's dtype; default the run's compute dtype (common.get_compute_dtype), which the
        model's activations carry too.
        compile: run single-token decode steps through torch.compile (CUDA graphs on GPU). Every step then
        has the same shapes: the cache always spans the model's context and is kept per batch size, reused
        by the next generation, so a compiled Engine runs one generation at a time. Prefill stays eager.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(model.get_device())
        self.dtype = dtype or get_compute_dtype(self.device.type)
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.compiled_step = None
        self.decode_caches = {}  # batch size -> (KVCache, the compiled step's cache inputs), when compiled
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.compiled_step = torch.compile(self.decode_step, dynamic=False, fullgraph=True, mode=mode)

    def forward_last(self, ids, kv_cache):
        """Logits of the last position, (B, V) fp32."""
        with torch.no_grad():
            logits = self.model.forward(ids, kv_cache=kv_cache)
        return logits[:, -1, :].float()

    def decode(self, ids, kv_cache):
        """forward_last for one new token per row, through the compiled step when there is one."""
        if self.compiled_step is None:
            return self.forward_last(ids, kv_cache)
        _, cache_inputs = self.decode_caches[kv_cache.batch_size]
        with torch.no_grad():
            logits = self.compiled_step(ids, *cache_inputs, kv_cache.cache_seqlens)
        kv_cache.advance(1)
        return logits.clone()  # CUDA graphs reuse their output buffer at the next step

    def decode_step(self, ids, k_layers, v_layers, prev_embed, cache_seqlens):
        """The function torch.compile sees: its inputs are tensors of the same shapes at every step."""
        cache = StepCache(k_layers, v_layers, prev_embed, cache_seqlens)
        return self.model.forward(ids, kv_cache=cache)[:, -1, :].float()

    def decode_cache(self, batch_size):
        """The reused full-context cache of a compiled Engine (fixed addresses, so CUDA graphs can replay)."""
        if batch_size not in self.decode_caches:
            cache = self.new_cache(batch_size, self.model.config.sequence_len)
            k_layers, v_layers = cache.k_cache.unbind(0), cache.v_cache.unbind(0)
            if self.device.type == "cuda":  # (the step writes into all of these)
                for view in (*k_layers, *v_layers, cache.prev_embed):
                    torch._dynamo.mark_static_address(view)
            self.decode_caches[batch_size] = (cache, (k_layers, v_layers, cache.prev_embed))
        return self.decode_caches[batch_size][0]

    def new_cache(self, batch_size, seq_len):
        return KVCache.for_model(self.model.config, batch_size, seq_len, self.device, self.dtype)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Stream (token_column, token_masks) per step: one token per row, mask 0 where the engine
        forced the token (tool output), else 1. Stops when every row has emitted a stop token, after
        max_tokens steps, or when the model's context (config.sequence_len) is full; max_tokens=None
        means "until the context is full".
        """
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of token ids (ints)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        context = self.model.config.sequence_len
        if len(tokens) >= context:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the model's context is {context} tokens; "
                             "shorten the prompt (or start a new conversation)")
        room = context - len(tokens)
        max_tokens = room if max_tokens is None else min(max_tokens, room)

        rng = torch.Generator(device=self.device).manual_seed(seed)
        prompt_cache = self.new_cache(batch_size=1, seq_len=len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self.forward_last(ids, prompt_cache).expand(num_samples, -1)
        assert prompt_cache.get_pos() == len(tokens), "the model must advance the KV cache"
        if self.compiled_step is not None:
            kv_cache = self.decode_cache(num_samples)  # prefill() below resets its rows to the prompt
        else:
            kv_cache = self.new_cache(batch_size=num_samples, seq_len=len(tokens) + max_tokens)
        kv_cache.prefill(prompt_cache)
        del prompt_cache

        rows = [RowState(tokens) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
            token_column, token_masks = [], []
            for row, sampled_token in zip(rows, sampled):
                is_forced = len(row.forced_tokens) > 0
                token = row.forced_tokens.popleft() if is_forced else sampled_token
                token_column.append(token)
                token_masks.append(0 if is_forced else 1)
                self.update_row(row, token)
            yield token_column, token_masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=self.device).unsqueeze(1)
            logits = self.decode(ids, kv_cache)

    def update_row(self, row, token):
        """Record a token and run the tool-use state machine of its row."""
        row.tokens.append(token)
        if token in self.stop_tokens:
            row.completed = True
        if token == self.python_start:
            row.python_expr_tokens = []
        elif token == self.python_end and row.python_expr_tokens is not None:
            result = use_calculator(self.tokenizer.decode(row.python_expr_tokens))
            row.python_expr_tokens = None
            if result is not None:
                row.forced_tokens.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python_expr_tokens is not None:
            row.python_expr_tokens.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        -> (results, masks): per row the prompt followed by its generated tokens, up to but not
        including its first stop token (<|assistant_end|> or <|bos|>); masks are 0 on the prompt and
        on forced tool outputs. kwargs as in generate.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if completed[i]:
                    continue
                if token in self.stop_tokens:
                    completed[i] = True
                    continue
                results[i].append(token)
                masks[i].append(mask)
        return results, masks


class StreamDecoder:
    """
    Turns a token stream into text pieces that never split a character: byte-level BPE may spread
    one multi-byte UTF-8 character over several tokens, and decoding a partial one gives U+FFFD.
    """

    MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes, each token carries at least one

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token):
        """New complete text after this token ('' while a character is still incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
