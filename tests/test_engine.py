"""KV cache, sampling, the calculator tool and the Engine against the naive GPT.generate."""
import time

import pytest
import torch

from helpers import MockConfig, make_gpt
from nanochat.engine import Engine, StreamDecoder, sample_next_token, use_calculator
from nanochat.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MockModel:
    """
    Honours the Engine's model contract without any network: the logits at absolute
    position p point at script[p + 1 - prompt_len] (then keep repeating the last script token), or are
    uniform when there is no script. Like the real model, it advances the cache.
    """

    def __init__(self, vocab_size, script=None, prompt_len=0):
        self.config = MockConfig()
        self.vocab_size, self.script, self.prompt_len = vocab_size, script, prompt_len
        self.calls = []  # (batch size, new tokens) per forward

    def get_device(self):
        return "cpu"

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        self.calls.append((B, T))
        logits = torch.zeros(B, T, self.vocab_size)
        if self.script is not None:
            for t in range(T):
                index = kv_cache.get_pos() + t + 1 - self.prompt_len
                logits[:, t, self.script[min(max(index, 0), len(self.script) - 1)]] = 100.0
        kv_cache.advance(T)
        return logits


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer):
    return make_gpt(tiny_tokenizer.get_vocab_size())


def special(tokenizer, name):
    return tokenizer.encode_special(f"<|{name}|>")


# -------------------------------------------------------------------------------------------------
# KVCache

def test_kv_cache_api():
    cache = KVCache(batch_size=3, num_heads=2, seq_len=10, head_dim=4, num_layers=5, device="cpu",
                    dtype=torch.float32, embed_dim=4)
    assert cache.k_cache.shape == cache.v_cache.shape == (5, 3, 10, 2, 4)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.shape == (3,)
    k, v = cache.get_layer_cache(4)
    k[:, 0] = 1.0  # layer views write through to the cache the model reads next step
    assert cache.k_cache[4, :, 0].eq(1.0).all() and cache.k_cache[:4].eq(0).all()
    cache.advance(7)
    cache.advance(2)
    assert cache.get_pos() == 9 and type(cache.get_pos()) is int
    assert cache.cache_seqlens.tolist() == [9, 9, 9]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.advance(2)
    cache.reset()
    assert cache.get_pos() == 0 and cache.cache_seqlens.tolist() == [0, 0, 0]


def test_kv_cache_prefill_copies_prompt_into_every_row():
    small = KVCache(1, num_heads=2, seq_len=6, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32, embed_dim=8)
    small.k_cache.normal_()
    small.v_cache.normal_()
    small.prev_embed.normal_()
    small.advance(5)
    big = KVCache(4, num_heads=2, seq_len=20, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32, embed_dim=8)
    big.prefill(small)
    assert big.get_pos() == 5 and big.cache_seqlens.tolist() == [5] * 4
    for row in range(4):
        assert torch.equal(big.k_cache[:, row, :5], small.k_cache[:, 0, :5])
        assert torch.equal(big.v_cache[:, row, :5], small.v_cache[:, 0, :5])
        assert torch.equal(big.prev_embed[row], small.prev_embed[0])  # the prompt's last embedding, for smear
    assert big.k_cache[:, :, 5:].eq(0).all()  # only the cached prefix is copied
    big.k_cache[:, 0, 0] = 123.0  # rows are independent copies, not views of the prompt cache
    assert not small.k_cache.eq(123.0).any() and not big.k_cache[:, 1].eq(123.0).any()


def test_kv_cache_rows_share_memory_and_rows_move_whole():
    cache = KVCache(batch_size=4, num_heads=2, seq_len=10, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32,
                    embed_dim=8)
    view = cache.rows(1, 3, pos=0)
    assert view.batch_size == 2 and view.seq_len == 10
    view.get_layer_cache(2)[0][:, :3] = 7.0  # the model writes through the view...
    view.prev_embed.copy_(torch.tensor([[1.0] * 8, [2.0] * 8]))
    view.advance(3)
    assert cache.k_cache[2, 1:3, :3].eq(7.0).all() and cache.k_cache[:, [0, 3]].eq(0).all()  # ...into rows 1-2 only
    assert cache.prev_embed[:, 0].tolist() == [0, 1, 2, 0]
    assert cache.cache_seqlens.tolist() == [0, 3, 3, 0] and view.get_pos() == 3
    cache.copy_row(2, 0)
    assert torch.equal(cache.k_cache[:, 0], cache.k_cache[:, 2]) and cache.cache_seqlens.tolist() == [3, 3, 3, 0]
    assert cache.prev_embed[:, 0].tolist() == [2, 1, 2, 0]
    assert set(KVCache.ROW_DIMS) == {name for name, value in vars(cache).items() if torch.is_tensor(value)}


def test_rows_of_different_lengths_decode_as_if_alone(gpt):
    """Rows filled one by one (a server's unrelated conversations) then decoded together: each row's logits are
    those of a full forward over its own tokens, so positions and attention are per row."""
    config = gpt.config
    lengths, steps = [28, 5, 13], 10  # row 0 crosses the 32-token sliding window while decoding
    seqs = [torch.randint(0, config.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(n))
            for n in lengths]
    cache = KVCache(len(lengths), num_heads=config.n_kv_head, seq_len=config.sequence_len,
                    head_dim=config.n_embd // config.n_head, num_layers=config.n_layer, device="cpu", dtype=torch.float32,
                    embed_dim=config.n_embd)
    with torch.no_grad():
        for row, (n, seq) in enumerate(zip(lengths, seqs)):
            gpt(seq[None, :n], kv_cache=cache.rows(row, row + 1, pos=0))
        for t in range(steps):
            ids = torch.stack([seq[n + t] for n, seq in zip(lengths, seqs)]).unsqueeze(1)
            logits = gpt(ids, kv_cache=cache.rows(0, len(lengths), pos=max(lengths) + t))[:, -1]
            for row, (n, seq) in enumerate(zip(lengths, seqs)):
                torch.testing.assert_close(logits[row], gpt(seq[None, :n + t + 1])[0, -1], atol=1e-4, rtol=1e-4)
    assert cache.cache_seqlens.tolist() == [n + steps for n in lengths]
    # A row emptied for a new conversation (as a server frees a slot) keeps nothing of the old one: not its
    # keys, and not the last embedding that smear would mix into the new first token.
    cache.cache_seqlens[1] = 0
    fresh = torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        torch.testing.assert_close(gpt(fresh, kv_cache=cache.rows(1, 2, pos=0)), gpt(fresh), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# Sampling

def test_sample_next_token_greedy_and_top_k():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next_token(logits, rng, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, rng, temperature=1.0, top_k=1), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        token = sample_next_token(logits, rng, temperature=2.0, top_k=3)
        assert (top3 == token.unsqueeze(-1)).any(-1).all()


def test_sample_next_token_follows_softmax_and_seed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    draws = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=0.7)
    freqs = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freqs, torch.softmax(logits[0] / 0.7, -1), atol=0.01)
    again = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=0.7)
    assert torch.equal(draws, again)


def test_sample_next_token_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.5, 1.0, 0.5, -1.0, -2.0]])
    temperature, top_p = 0.8, 0.75
    probs = torch.softmax(logits[0] / temperature, -1)
    # the reference: the most likely ids, in order, until their total reaches top_p
    nucleus = []
    for i in probs.argsort(descending=True).tolist():
        nucleus.append(i)
        if probs[nucleus].sum() >= top_p:
            break
    assert 1 < len(nucleus) < len(probs)  # the case is not trivial
    draws = sample_next_token(logits.expand(20000, -1), torch.Generator().manual_seed(0), temperature, top_p=top_p)
    freqs = torch.bincount(draws, minlength=len(probs)).float() / len(draws)
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert torch.allclose(freqs, expected, atol=0.01)
    rng = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(sample_next_token(logits, rng(), 1.0, top_p=1.0), sample_next_token(logits, rng(), 1.0))
    assert sample_next_token(logits, rng(), 1.0, top_p=0.0).item() == 0  # only the most likely id is left
    assert sample_next_token(logits, rng(), 1.0, top_k=3, top_p=1e-6).item() == 0


# -------------------------------------------------------------------------------------------------
# Engine against the naive generate

def test_engine_greedy_matches_naive_generate(gpt, tiny_tokenizer):
    # 12 prompt + 40 new tokens cross the 32-token sliding window of the "S" layer (sequence_len 64)
    prompt = tiny_tokenizer.encode("The history of the city begins", prepend="<|bos|>")[:12]
    expected = list(gpt.generate(prompt, max_tokens=40, temperature=0.0))
    results, masks = Engine(gpt, tiny_tokenizer).generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
    stop = {special(tiny_tokenizer, "assistant_end"), tiny_tokenizer.get_bos_token_id()}
    if stop & set(expected):  # a random model may emit a stop token; the Engine stops there
        expected = expected[:min(expected.index(t) for t in stop & set(expected))]
    for row, mask in zip(results, masks):
        assert row == prompt + expected
        assert mask == [0] * len(prompt) + [1] * len(expected)


def test_single_token_prompt(gpt, tiny_tokenizer):
    prompt = [tiny_tokenizer.get_bos_token_id()]
    expected = list(gpt.generate(prompt, max_tokens=10, temperature=0.0))
    columns = list(Engine(gpt, tiny_tokenizer).generate(prompt, num_samples=2, max_tokens=10, temperature=0.0))
    assert [column for column, _ in columns] == [[t, t] for t in expected[:len(columns)]]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.slow
def test_compiled_decode_step_matches_naive_generate_without_recompiling(tiny_tokenizer, device):
    """The compiled decode step (real torch.compile: inductor on CPU, CUDA graphs on GPU) is one graph for
    every position and every prompt: two generations of different lengths, crossing the sliding window,
    compile it once."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: the CUDA-graph (reduce-overhead) decode step")
    from torch._dynamo.utils import counters
    gpt = make_gpt(tiny_tokenizer.get_vocab_size(), device=device)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(gpt, tiny_tokenizer, dtype=torch.float32, compile=True)  # fp32: exact argmax agreement
    for text, max_tokens in (("The history of the city begins", 40), ("Water", 25)):
        prompt = tiny_tokenizer.encode(text, prepend="<|bos|>")[:12]
        expected = list(gpt.generate(prompt, max_tokens=max_tokens, temperature=0.0))
        with torch._dynamo.config.patch(error_on_recompile=True):
            columns = list(engine.generate(prompt, num_samples=2, max_tokens=max_tokens, temperature=0.0))
        assert [column for column, _ in columns] == [[t, t] for t in expected[:len(columns)]]
        assert len(columns) == max_tokens or columns[-1][0][0] in engine.stop_tokens
    assert counters["stats"]["unique_graphs"] == 1
    assert engine.decode_cache(2).seq_len == gpt.config.sequence_len  # one cache, reused


def test_engine_seeds(gpt, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    engine = Engine(gpt, tiny_tokenizer)
    runs = [tuple(engine.generate_batch(prompt, max_tokens=20, temperature=1.0, seed=seed)[0][0]) for seed in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1


def test_num_samples_are_independent_rows(tiny_tokenizer):
    model = MockModel(tiny_tokenizer.get_vocab_size())  # uniform logits
    engine = Engine(model, tiny_tokenizer)
    columns = list(engine.generate([1, 2, 3], num_samples=8, max_tokens=4, temperature=1.0))
    assert len(set(columns[0][0])) > 1  # rows sample independently from the same distribution
    assert model.calls[0] == (1, 3)  # the prompt is prefilled once, at batch 1
    assert all(call == (8, 1) for call in model.calls[1:])


def test_max_tokens_and_context_limit(tiny_tokenizer):
    word = tiny_tokenizer.encode("the")[0]
    model = MockModel(tiny_tokenizer.get_vocab_size(), script=[word])  # never stops by itself
    engine = Engine(model, tiny_tokenizer)
    prompt = [tiny_tokenizer.get_bos_token_id()] * 5
    assert len(list(engine.generate(prompt, max_tokens=17))) == 17
    context = model.config.sequence_len
    assert len(list(engine.generate(prompt, max_tokens=1000))) == context - len(prompt)
    assert len(list(engine.generate(prompt))) == context - len(prompt)
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([word] * context))


def test_generate_batch_stops_before_stop_token(tiny_tokenizer):
    a, b = tiny_tokenizer.encode("the")[0], tiny_tokenizer.encode(" of")[0]
    for stop in (special(tiny_tokenizer, "assistant_end"), tiny_tokenizer.get_bos_token_id()):
        prompt = [tiny_tokenizer.get_bos_token_id(), a]
        model = MockModel(tiny_tokenizer.get_vocab_size(), script=[a, b, stop, a], prompt_len=len(prompt))
        results, masks = Engine(model, tiny_tokenizer).generate_batch(prompt, num_samples=2, max_tokens=10)
        assert results == [prompt + [a, b]] * 2
        assert masks == [[0, 0, 1, 1]] * 2


# -------------------------------------------------------------------------------------------------
# Tool use

def run_tool_script(tokenizer, expression):
    """A mock model that writes <|python_start|>expression<|python_end|> then ends its turn."""
    expr_tokens = tokenizer.encode(expression)
    prompt = tokenizer.encode("Compute", prepend="<|bos|>") + [special(tokenizer, "assistant_start")]
    filler = tokenizer.encode(" ok")  # what the model would say while the engine forces the output
    script = ([special(tokenizer, "python_start")] + expr_tokens + [special(tokenizer, "python_end")]
              + filler * 8 + [special(tokenizer, "assistant_end")])
    model = MockModel(tokenizer.get_vocab_size(), script=script, prompt_len=len(prompt))
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=60)
    return results[0][len(prompt):], masks[0][len(prompt):], expr_tokens


def test_tool_use_forces_calculator_output(tiny_tokenizer):
    tokens, masks, expr_tokens = run_tool_script(tiny_tokenizer, "2+3")
    call = [special(tiny_tokenizer, "python_start")] + expr_tokens + [special(tiny_tokenizer, "python_end")]
    output = ([special(tiny_tokenizer, "output_start")] + tiny_tokenizer.encode(str(2 + 3))
              + [special(tiny_tokenizer, "output_end")])
    assert tokens[:len(call) + len(output)] == call + output
    assert masks[:len(call)] == [1] * len(call)
    assert masks[len(call):len(call) + len(output)] == [0] * len(output)
    assert masks[len(call) + len(output):] == [1] * (len(tokens) - len(call) - len(output))


@pytest.mark.parametrize("expression", ["__import__('os').system('echo pwned')", "(1).__class__", "2**10**10",
                                        "9**9**9**9", "'a'*10**9", "open('/etc/passwd').read()"])
def test_tool_use_unsafe_expressions_produce_no_output(tiny_tokenizer, expression):
    start = time.perf_counter()
    tokens, masks, _ = run_tool_script(tiny_tokenizer, expression)
    assert special(tiny_tokenizer, "output_start") not in tokens
    assert all(m == 1 for m in masks)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("expression", ["2+3", "10/4", "6/3", "2**10", "-(3*4) + 1.5", "(1+2)*(3-4)/5",
                                        "2**-2", "7 - -2", '"strawberry".count("r")', "'banana'.count('an')"])
def test_calculator_agrees_with_python(expression):
    expected = eval(expression)  # trusted literals written in this test: the reference
    if isinstance(expected, float) and expected.is_integer():
        expected = int(expected)
    assert use_calculator(expression) == str(expected)


@pytest.mark.parametrize("expression", ["__import__('os')", "x + 1", "(1).real", "[1, 2]", "lambda: 1", "1/0",
                                        "'a'.count('a', 0)", "'ab'.upper()", "True + 1", "2 ^ 3", "2**100000",
                                        "(-8) ** 0.5", "'a' * 3", "", "1 +", "(" * 300 + "1" + ")" * 300])
def test_calculator_refuses(expression):
    assert use_calculator(expression) is None


def test_calculator_timeout_and_size_guard():
    long_sum = "+".join(["12345"] * 150)
    assert use_calculator(long_sum) == str(12345 * 150)
    assert use_calculator(long_sum, timeout=0.0) is None  # the deadline is checked while evaluating
    start = time.perf_counter()
    assert use_calculator("*".join(["(2**4000)"] * 100)) is None  # refused as soon as it grows too big
    assert use_calculator("9**9**9**9**9") is None
    assert time.perf_counter() - start < 1.0


# -------------------------------------------------------------------------------------------------

def test_stream_decoder_keeps_multibyte_characters_intact(tiny_tokenizer):
    text = "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642 done"
    tokens = tiny_tokenizer.encode(text)
    decoder = StreamDecoder(tiny_tokenizer)
    pieces = [decoder.push(t) for t in tokens] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # some character really was split across tokens (else the test is void)
