"""Continuous batching (BatchScheduler) against lone generation, per-row tools, leaving, errors; stop sequences; long chats."""
import pytest
import torch

from nanochat.engine import Engine
from nanochat.serving import BatchScheduler, Generation, StopText, fit_conversation
from helpers import MockConfig, make_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ChainModel:
    """
    Engine contract mock whose next token depends only on the row's newest token (next_token[token], else
    `default`), so every row follows its own chain whatever shares the batch. Records (B, T) per forward.
    """

    def __init__(self, vocab_size, next_token, default, fail_at_call=None):
        self.config = MockConfig()
        self.vocab_size, self.next_token, self.default = vocab_size, next_token, default
        self.fail_at_call = fail_at_call
        self.calls = []

    def get_device(self):
        return "cpu"

    def forward(self, ids, kv_cache=None):
        self.calls.append(tuple(ids.shape))
        if len(self.calls) == self.fail_at_call:
            raise RuntimeError("simulated CUDA error")
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t, token in enumerate(row):
                logits[b, t, self.next_token.get(token, self.default)] = 100.0
        kv_cache.advance(ids.size(1))
        return logits


class Recorder:
    """Submits Generations and records what their callbacks report."""

    def __init__(self, scheduler):
        self.scheduler, self.tokens, self.forced, self.finished = scheduler, {}, {}, {}

    def submit(self, name, prompt, **kwargs):
        self.tokens[name], self.forced[name] = [], []

        def on_token(token, forced):
            self.tokens[name].append(token)
            self.forced[name].append(forced)

        generation = Generation(prompt, on_token, lambda reason: self.finished.__setitem__(name, reason), **kwargs)
        self.scheduler.submit(generation)
        return generation

    def run(self, max_steps=1000):
        for _ in range(max_steps):
            if not (self.scheduler.num_active() or self.scheduler.num_waiting()):
                return
            self.scheduler.step()
        raise AssertionError("the scheduler never finished")


def lone_tokens(engine, prompt, max_tokens):
    """The reference: Engine.generate serving this one request, greedy, up to and including a stop token."""
    tokens = []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0):
        tokens.append(column[0])
        if column[0] in engine.stop_tokens:
            break
    return tokens


@pytest.mark.parametrize("compile", [False, True])
def test_batched_equals_lone_at_temperature_zero(tiny_tokenizer, compile):
    """Requests of different lengths join a running batch mid-way (one waits for a free slot) and each gets
    the tokens it gets alone; the compiled step is one graph for all of it."""
    from torch._dynamo.utils import counters
    gpt = make_gpt(tiny_tokenizer.get_vocab_size())  # context 64, window pattern SL: rows cross the 32-token window
    texts = ["The history of the city begins", "Water", "In 1905 the railway company built a new station and"]
    prompts = [tiny_tokenizer.encode(text, prepend="<|bos|>") for text in texts]
    max_tokens = [40, 25, 30]
    joins = {0: [0], 3: [1], 7: [2]}  # step -> requests submitted before it
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(gpt, tiny_tokenizer, dtype=torch.float32, compile=compile)
    recorder = Recorder(BatchScheduler(engine, max_batch=2))
    for step in range(200):
        for i in joins.get(step, []):
            recorder.submit(i, prompts[i], max_tokens=max_tokens[i], temperature=0.0)
        if step > max(joins) and not (recorder.scheduler.num_active() or recorder.scheduler.num_waiting()):
            break
        with torch._dynamo.config.patch(error_on_recompile=True):
            recorder.scheduler.step()
    recorder.submit("again", prompts[0], max_tokens=max_tokens[0], temperature=0.0)  # into the emptied batch
    recorder.run()
    assert recorder.tokens["again"] == recorder.tokens[0]
    for i, prompt in enumerate(prompts):
        expected = lone_tokens(Engine(gpt, tiny_tokenizer, dtype=torch.float32), prompt, max_tokens[i])
        assert recorder.tokens[i] == expected
        assert recorder.finished[i] == ("stop" if expected[-1] in engine.stop_tokens else "length")
    assert any(len(tokens) > 20 for tokens in recorder.tokens.values())
    if compile:
        assert counters["stats"]["unique_graphs"] == 1


def special(tokenizer, name):
    return tokenizer.encode_special(f"<|{name}|>")


def test_tool_output_is_forced_into_its_own_row_only(tiny_tokenizer):
    sp = lambda name: special(tiny_tokenizer, name)  # noqa: E731
    expression = tiny_tokenizer.encode("2+3")
    call = [sp("python_start"), *expression, sp("python_end")]
    words = tiny_tokenizer.encode(" the city of")
    start_a, start_b, filler = tiny_tokenizer.encode("A")[0], tiny_tokenizer.encode("B")[0], words[0]
    chain = [start_a, *call, sp("assistant_end")]  # A calls the calculator then ends (after the forced output)
    chain_b = [start_b, *words, sp("assistant_end")]  # B just talks
    next_token = {a: b for seq in (chain, chain_b) for a, b in zip(seq, seq[1:])}
    next_token[sp("output_end")] = sp("assistant_end")
    assert len(set(chain + chain_b)) == len(chain) + len(chain_b) - 1  # every token has one successor
    model = ChainModel(tiny_tokenizer.get_vocab_size(), next_token, default=filler)
    recorder = Recorder(BatchScheduler(Engine(model, tiny_tokenizer), max_batch=4))
    recorder.submit("b", [tiny_tokenizer.get_bos_token_id(), start_b], temperature=0.0)
    recorder.scheduler.step()
    recorder.submit("a", [tiny_tokenizer.get_bos_token_id(), start_a], temperature=0.0)
    recorder.run()
    output = [sp("output_start"), *tiny_tokenizer.encode("5"), sp("output_end")]
    assert recorder.tokens["a"] == call + output + [sp("assistant_end")]
    assert recorder.forced["a"] == [False] * len(call) + [True] * len(output) + [False]
    assert recorder.tokens["b"] == words + [sp("assistant_end")] and not any(recorder.forced["b"])
    assert recorder.finished == {"a": "stop", "b": "stop"}


def endless_model(tokenizer, **kwargs):
    word = tokenizer.encode("the")[0]
    return ChainModel(tokenizer.get_vocab_size(), {}, default=word, **kwargs)


def test_slots_limit_the_batch_and_are_reused(tiny_tokenizer):
    model = endless_model(tiny_tokenizer)
    recorder = Recorder(BatchScheduler(Engine(model, tiny_tokenizer), max_batch=2))
    bos = tiny_tokenizer.get_bos_token_id()
    for i, max_tokens in enumerate([3, 6, 4, 5]):
        recorder.submit(i, [bos] * (i + 2), max_tokens=max_tokens, temperature=1.0, seed=i)
    recorder.run()
    assert {i: len(tokens) for i, tokens in recorder.tokens.items()} == {0: 3, 1: 6, 2: 4, 3: 5}
    assert set(recorder.finished.values()) == {"length"}
    decode_batches = [B for B, T in model.calls if T == 1]
    assert max(decode_batches) == 2 and decode_batches[-1] == 1  # never more rows than slots; rows leave
    # the context bounds every row: a prompt one token short of it gets one token
    recorder.submit("full", [bos] * (MockConfig.sequence_len - 1), temperature=0.0)
    recorder.run()
    assert len(recorder.tokens["full"]) == 1 and recorder.finished["full"] == "length"
    with pytest.raises(ValueError, match="prompt"):
        recorder.submit("too long", [bos] * MockConfig.sequence_len)


def test_cancelled_requests_leave_at_the_next_step_and_queued_ones_never_run(tiny_tokenizer):
    model = endless_model(tiny_tokenizer)
    scheduler = BatchScheduler(Engine(model, tiny_tokenizer), max_batch=1)
    recorder = Recorder(scheduler)
    bos = tiny_tokenizer.get_bos_token_id()
    running = recorder.submit("running", [bos] * 3, temperature=0.0)
    queued = recorder.submit("queued", [bos] * 7, temperature=0.0)  # waits: the only slot is taken
    for _ in range(5):
        scheduler.step()
    queued.cancel()
    running.cancel()
    tokens_before, calls_before = len(recorder.tokens["running"]), len(model.calls)
    scheduler.step()  # the running row leaves before this step's decode; the queued one is dropped unrun
    scheduler.step()
    assert recorder.finished == {"running": "cancelled", "queued": "cancelled"}
    assert len(recorder.tokens["running"]) == tokens_before and recorder.tokens["queued"] == []
    assert model.calls[calls_before:] == [] and (1, 7) not in model.calls
    assert scheduler.num_active() == scheduler.num_waiting() == 0


def test_a_failed_forward_ends_the_batch_not_the_worker(tiny_tokenizer):
    model = endless_model(tiny_tokenizer, fail_at_call=4)
    recorder = Recorder(BatchScheduler(Engine(model, tiny_tokenizer), max_batch=4))
    bos = tiny_tokenizer.get_bos_token_id()
    recorder.submit("a", [bos] * 3, max_tokens=10, temperature=0.0)
    recorder.submit("b", [bos] * 4, max_tokens=10, temperature=0.0)
    recorder.run()
    assert all(reason.startswith("error: RuntimeError: simulated CUDA error") for reason in recorder.finished.values())
    recorder.submit("c", [bos] * 3, max_tokens=5, temperature=0.0)
    recorder.run()
    assert recorder.finished["c"] == "length" and len(recorder.tokens["c"]) == 5


# -------------------------------------------------------------------------------------------------

def reference_stop_cut(text, stops):
    """-> (what a client gets, stopped): read the text as it grows; the first time it ends with a stop sequence,
    cut it where that sequence starts (of several ending there, the longest)."""
    for end in range(1, len(text) + 1):
        ending = [len(s) for s in stops if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(ending)], True
    return text, False


def stream_through_stop_text(pieces, stops):
    """-> (text sent, stopped) when the pieces are pushed one by one, checking what is held back on the way."""
    stop_text, sent = StopText(stops), ""
    longest = max((len(s) for s in stops), default=0)
    for piece in pieces:
        sent += stop_text.push(piece)
        assert len(stop_text.held) <= max(longest - 1, 0)  # only a possible start of a stop sequence waits
        if stop_text.stopped:
            return sent, True
    return sent + stop_text.flush(), False


def random_pieces(text, generator, num_cuts=8):
    bounds = sorted(torch.randint(0, len(text) + 1, (num_cuts,), generator=generator).tolist())
    return [text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])]


@pytest.mark.parametrize("stops", [["END"], ["\n\n", "###"], ["aaa"], ["xyz"], [], ["more", "e a"], ["", "###"]])
def test_stop_text_cuts_at_the_first_stop_whatever_the_pieces(stops):
    text = "Some answer.\n\nMore text ### and aaaa then END and more"
    expected = reference_stop_cut(text, stops)
    generator = torch.Generator().manual_seed(len(stops))
    for _ in range(20):
        assert stream_through_stop_text(random_pieces(text, generator), stops) == expected


def test_stop_text_agrees_with_the_reference_on_overlapping_stops():
    """Texts and stops over a two-letter alphabet: stops that overlap themselves and each other (where a matcher
    must fall back correctly), pieces cut anywhere, one character at a time, and all at once."""
    generator = torch.Generator().manual_seed(0)

    def word(length):
        return "".join("ab"[i] for i in torch.randint(0, 2, (length,), generator=generator).tolist())

    for case in range(300):
        text = word(int(torch.randint(0, 40, (1,), generator=generator)))
        stops = [word(int(torch.randint(1, 7, (1,), generator=generator))) for _ in range(case % 4 + 1)]
        expected = reference_stop_cut(text, stops)
        for pieces in (random_pieces(text, generator), list(text), [text]):
            assert stream_through_stop_text(pieces, stops) == expected, (text, stops, pieces)
    assert stream_through_stop_text(["xabcd"], ["abcd", "bc"]) == ("xa", True)  # "bc" is complete first
    assert stream_through_stop_text(["xab", "cd"], ["abc", "bc"]) == ("x", True)  # both end at "c": the longer


# -------------------------------------------------------------------------------------------------

def test_a_long_chat_keeps_going_by_dropping_its_oldest_exchanges(tiny_tokenizer):
    """25 turns with a real tiny model at a 64-token context: every prompt is what the chat format renders for the
    kept messages, which are the system message and the newest turns, as many as leave the reply its room."""
    context, room = 64, 64 // 4
    engine = Engine(make_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=context), tiny_tokenizer)
    system = {"role": "system", "content": "Be brief."}
    turns, num_dropped = [], []

    def rendered(messages):
        return tiny_tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})

    for i in range(25):
        turns.append({"role": "user", "content": f"Question {i}: and then?"})
        prompt, kept = fit_conversation(tiny_tokenizer, [system] + turns, context)
        assert kept[0] == system and kept[1:] == turns[len(turns) - len(kept) + 1:]  # the newest turns
        assert prompt == rendered(kept)
        assert len(prompt) + room <= context or len(kept) == 2  # room for the reply, or only the question is left
        if len(kept) < len(turns) + 1:  # dropped: and one exchange fewer dropped would not have left the room
            assert len(rendered([system] + turns[len(turns) - len(kept) - 1:])) + room > context
        num_dropped.append(len(turns) + 1 - len(kept))
        reply, _ = engine.generate_batch(prompt, max_tokens=room, temperature=0.0, seed=i)
        turns.append({"role": "assistant", "content": tiny_tokenizer.decode(reply[0][len(prompt):])})
    assert num_dropped[0] == 0 and num_dropped[-1] > 10 and num_dropped == sorted(num_dropped)

    # a smaller max_tokens keeps more of the conversation; a last message that alone leaves no room is refused
    recent = turns[-8:-1]  # user, assistant, ..., user
    assert len(fit_conversation(tiny_tokenizer, recent, context, max_tokens=2)[1]) > \
        len(fit_conversation(tiny_tokenizer, recent, context)[1])
    with pytest.raises(ValueError, match="the last message with the system message is .* tokens but the model's context"):
        fit_conversation(tiny_tokenizer, [system, {"role": "user", "content": "word " * 80}], context)
    with pytest.raises(ValueError, match="expected 'assistant'"):  # what the chat format cannot render
        fit_conversation(tiny_tokenizer, [turns[0], turns[0]], context)
