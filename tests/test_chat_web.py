"""The chat server for real: uvicorn on a free local port, a tiny random GPT (or a scripted mock)."""
import asyncio
import json
import time

import httpx
import pytest
import torch

from nanochat.engine import Engine, reply_parts
from helpers import MESSAGES, ScriptedModel, make_gpt, scripted_server_app, serve, tiny_config
from scripts.chat_web import (MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOTAL_CHARS,
                              create_app, render_prompt)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer):
    from nanochat.gpt import build_gpt
    config = tiny_config(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size())
    model = build_gpt(config, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.125)  # spread the logits so greedy decoding is not a near-tie
    return model.eval()


@pytest.fixture(scope="module")
def server(gpt, tiny_tokenizer):
    """Two workers sharing one tiny GPT, 4 decode slots each."""
    app = create_app([(gpt, tiny_tokenizer)] * 2, temperature=0.8, top_k=50, max_tokens=16, max_batch=4)
    with serve(app) as url:
        yield url, app


def sse_events(response_text):
    """Parse an SSE body, checking every event is one well-formed `data: <json>` line."""
    blocks = response_text.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a complete event"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"malformed SSE event {block!r}"
        events.append(json.loads(block[len("data: "):]))
    return events


def reference_reply(model, tokenizer, messages, max_tokens):
    """What the server must stream at temperature 0: the Engine's greedy tokens up to the stop token."""
    prompt, dropped = render_prompt(tokenizer, messages, model.config.sequence_len, max_tokens)
    assert dropped == 0
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return prompt, results[0][len(prompt):]


def test_sse_stream_matches_engine(server, gpt, tiny_tokenizer):
    url, _ = server
    response = httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 12},
                          timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] in (0, 1) for e in events[:-1])
    _, expected = reference_reply(gpt, tiny_tokenizer, MESSAGES, max_tokens=12)
    assert "".join(e["token"] for e in events[:-1]) == tiny_tokenizer.decode(expected)
    assert "<title>nanochat</title>" in httpx.get(url, timeout=10).text


def long_conversation(num_messages, chars):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "a" * chars} for i in range(num_messages)]


@pytest.mark.parametrize("body, message", [
    ({"messages": long_conversation(MAX_MESSAGES + 1, 1)}, "too many messages"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "message 0 is too long"),
    ({"messages": long_conversation(5, MAX_TOTAL_CHARS // 4)}, "too long: 40000 characters in total"),
    ({"messages": MESSAGES, "temperature": -0.1}, "temperature must be a number between 0.0 and 2.0"),
    ({"messages": MESSAGES, "temperature": 2.5}, "temperature must be"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature must be"),
    ({"messages": MESSAGES, "top_k": 0}, "top_k must be an integer between 1 and 200"),
    ({"messages": MESSAGES, "top_k": 201}, "top_k must be"),
    ({"messages": MESSAGES, "top_k": 5.5}, "top_k must be"),
    ({"messages": MESSAGES, "top_p": 1.5}, "top_p must be a number between 0.0 and 1.0"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens must be an integer between 1 and 4096"),
    ({"messages": MESSAGES, "max_tokens": 4097}, "max_tokens must be"),
    ({"messages": MESSAGES, "max_tokens": [[[[1]]]]}, "max_tokens must be an integer between 1 and 4096, got list"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens must be an integer between 1 and 4096"),
    ({"messages": MESSAGES, "max_completion_tokens": 4097, "max_tokens": 5}, "max_completion_tokens must be"),
    ({"messages": MESSAGES, "max_completion_tokens": "10", "max_tokens": None}, "max_completion_tokens must be"),
    ({"messages": MESSAGES, "max_completion_tokens": 10, "max_tokens": 5}, "differ: give one of them"),
    ({"messages": []}, "non-empty list"),
    ({}, "non-empty list"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 42}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "text only"),
    ({"messages": MESSAGES[:2]}, "last message must be from the user"),
    ({"messages": [MESSAGES[0], MESSAGES[0]]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "the history of " * 100}]}, "context is 256 tokens"),
])
def test_limits_are_answered_with_400(server, body, message):
    url, _ = server
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_openai_client(server, gpt, tiny_tokenizer):
    import openai
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model_id = client.models.list().data[0].id
    prompt, expected = reference_reply(gpt, tiny_tokenizer, MESSAGES, max_tokens=10)

    reply = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=10)
    assert reply.choices[0].message.content == tiny_tokenizer.decode(expected)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_tokenizer.decode(expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    # content given as OpenAI's text parts, n=1 and top_p=1 (no-ops) and max_completion_tokens: the same reply
    parts = [[{"type": "text", "text": m["content"][:5]}, {"type": "text", "text": m["content"][5:]}] for m in MESSAGES]
    same = client.chat.completions.create(model=model_id, messages=[dict(m, content=p) for m, p in zip(MESSAGES, parts)],
                                          temperature=0, max_completion_tokens=10, n=1, top_p=1.0)
    assert same.choices[0].message.content == reply.choices[0].message.content
    short = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3 and reply.choices[0].message.content.startswith(short.choices[0].message.content)
    sampled = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, top_p=0.5, seed=3,
                                             max_tokens=10)
    again = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, top_p=0.5, seed=3,
                                           max_tokens=10)
    assert sampled.choices[0].message.content == again.choices[0].message.content  # a pinned seed repeats

    for bad, field in [(dict(temperature=3), "temperature"), (dict(top_p=1.5), "top_p"), (dict(n=2), "n must be 1"),
                       (dict(presence_penalty=0.5), "presence_penalty is not supported"),
                       (dict(stop=["a", "b", "c", "d", "e"]), "stop has 5 sequences; the limit is 4")]:
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model=model_id, messages=MESSAGES, **bad)


def test_stop_token_and_multibyte_text_reach_clients_intact(tiny_tokenizer):
    import openai
    text = "Caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 **ok**"
    messages = [{"role": "user", "content": "hi"}]
    app, script = scripted_server_app(tiny_tokenizer, text)
    with serve(app) as url:
        events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": messages}, timeout=30).text)
        pieces = [e["token"] for e in events[:-1]]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="nanochat", messages=messages)
        assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == len(script)  # the stop token counts as generated


def test_stop_sequences_cut_the_reply(tiny_tokenizer):
    import openai
    text = "First line.\n\nSecond part ### hidden"
    app, script = scripted_server_app(tiny_tokenizer, text)
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        hi = [{"role": "user", "content": "hi"}]
        for stop, expected in (("###", "First line.\n\nSecond part "), (["zzz", "\n\n"], "First line."),
                               ("absent", text)):
            reply = client.chat.completions.create(model="nanochat", messages=hi, stop=stop)
            assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
            chunks = list(client.chat.completions.create(model="nanochat", messages=hi, stop=stop, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        reply = client.chat.completions.create(model="nanochat", messages=hi, stop="###")
        assert reply.usage.completion_tokens < len(script)  # generation ended at the stop sequence


def test_hostile_stop_sequences_are_refused_or_cheap(tiny_tokenizer):
    """Stop sequences over the limits get 400 at once; at the limits (4 x 200 characters, each a near-match of
    the reply at every character), a 1000-token reply streams while /health keeps answering promptly."""
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.encode("a"), prompt_len=0)
    model.config.sequence_len = 1200  # (this instance's context: room for a 1000-token reply)
    near_misses = ["a" * (MAX_STOP_CHARS - 1) + end for end in "bcde"]
    assert len(near_misses) == MAX_STOP_SEQUENCES
    with serve(create_app([(model, tiny_tokenizer)], max_tokens=1000)) as url:
        for stop, message in ((["a" * 240_000 + "b"] * 4, f"stop sequence 0 is 240001 characters; the limit is {MAX_STOP_CHARS}"),
                              (["a", "b", "c", "d", "e"], "stop has 5 sequences; the limit is 4"),
                              ([["a"]], "stop must be a string or a list of strings, got list"),
                              (near_misses[:1] + ["x" * (MAX_STOP_CHARS + 1)], "stop sequence 1 is 201 characters")):
            response = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "stop": stop}, timeout=30)
            assert response.status_code == 400 and message in response.json()["error"]["message"]

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"messages": MESSAGES, "stop": near_misses, "stream": True}
                request = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=body))
                latencies = []
                while not request.done():
                    start = time.perf_counter()
                    assert (await client.get(f"{url}/health")).status_code == 200
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)
                return (await request).text, latencies

        text, latencies = asyncio.run(run())
    chunks = [e for e in sse_events(text.removesuffix("data: [DONE]\n\n"))]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "a" * 1000  # no stop matched
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # (before the limits and the linear matching, four 240,000-character stop sequences held the event loop 12.7 s)
    assert len(latencies) > 5 and max(latencies) < 2.0, latencies


def test_concurrent_requests_share_the_batch_and_match_lone_replies(server, gpt, tiny_tokenizer):
    """12 conversations at once over 2 workers x 4 slots: rows really are batched, each reply is the one the
    request gets alone (temperature 0), and /health answers throughout."""
    url, app = server
    batch_sizes = []
    for worker in app.state.workers:
        decode = worker.engine.decode
        worker.engine.decode = lambda ids, cache, decode=decode: batch_sizes.append(ids.size(0)) or decode(ids, cache)
    conversations = [[{"role": "user", "content": f"Question {i}: what is {'the history of ' * (i % 4)}Rome?"}]
                     for i in range(12)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def chat(messages):
                response = await client.post(f"{url}/chat/completions",
                                             json={"messages": messages, "max_tokens": 16, "temperature": 0})
                return sse_events(response.text)

            async def poll_health(tasks):
                latencies = []
                while not all(t.done() for t in tasks):
                    start = time.perf_counter()
                    assert (await client.get(f"{url}/health")).json()["status"] == "ok"
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)
                return latencies

            tasks = [asyncio.create_task(chat(messages)) for messages in conversations]
            latencies = await poll_health(tasks)
            return await asyncio.gather(*tasks), latencies

    try:
        results, latencies = asyncio.run(run())
    finally:
        for worker in app.state.workers:
            del worker.engine.decode
    for messages, events in zip(conversations, results):
        assert events[-1] == {"done": True}
        _, expected = reference_reply(gpt, tiny_tokenizer, messages, max_tokens=16)
        assert "".join(e["token"] for e in events[:-1]) == tiny_tokenizer.decode(expected)
    assert {e["gpu"] for events in results for e in events[:-1]} == {0, 1}  # both workers served
    assert max(batch_sizes) > 1
    assert latencies and max(latencies) < 5.0  # the event loop never blocked on generation
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["active_requests"] == stats["waiting_requests"] == stats["requests_active"] == 0
    assert stats["requests_total"] >= 12 and [w["max_batch"] for w in stats["workers"]] == [4, 4]


def test_failing_generation_ends_its_requests_not_the_worker(server, monkeypatch):
    url, app = server

    def broken_decode(self, ids, kv_cache):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(Engine, "decode", broken_decode)
    failed_before = httpx.get(f"{url}/stats", timeout=10).json()["requests_failed"]
    for _ in range(5):
        events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES}, timeout=30).text)
        assert "simulated CUDA error" in events[-2]["error"] and events[-1] == {"done": True}
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    assert response.status_code == 500 and "simulated" in response.json()["error"]["message"]
    monkeypatch.undo()
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["requests_failed"] == failed_before + 6
    assert stats["active_requests"] == stats["waiting_requests"] == 0
    events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES}, timeout=30).text)
    assert events[-1] == {"done": True} and "error" not in events[-2]


@pytest.fixture
def slow_server(tiny_tokenizer):
    """One worker, one slot, a model that never ends its reply and takes 50 ms per step: a request runs
    for its whole max_tokens (~12 s) unless it is cancelled."""
    word = tiny_tokenizer.encode(" word")[0]
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), [word], prompt_len=0, delay=0.05)
    with serve(create_app([(model, tiny_tokenizer)], max_batch=1, max_tokens=4096)) as url:
        yield url, model


def wait_until_idle(url, within):
    start = time.monotonic()
    while True:
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health["active_requests"] == health["waiting_requests"] == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"a request of a client that left still holds the worker: {health}"
        time.sleep(0.02)


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_a_streaming_client_leaving_frees_its_slot(slow_server, path):
    url, _ = slow_server
    body = {"messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as response:
        assert next(response.iter_lines()).startswith("data: ")
    wait_until_idle(url, within=2.0)


def test_abandoned_requests_free_the_worker_and_queued_ones_never_run(slow_server):
    """Non-streaming /v1 requests whose clients give up: the running one leaves the batch at once, the queued
    ones never reach the model (the worker is not held for their whole replies: 3 x 12 s)."""
    url, model = slow_server

    async def abandon(i, after):
        async with httpx.AsyncClient(timeout=after) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{url}/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": f"question {i}"}]})
        return time.monotonic()

    async def run():
        running = asyncio.create_task(abandon(0, after=1.5))
        while httpx.get(f"{url}/health", timeout=10).json()["active_requests"] == 0:
            await asyncio.sleep(0.02)
        queued = [asyncio.create_task(abandon(i, after=0.5)) for i in (1, 2)]  # wait for the only slot
        await asyncio.gather(*queued)
        return await running

    left_at = asyncio.run(run())
    wait_until_idle(url, within=2.0)
    assert time.monotonic() - left_at < 2.0
    assert [call for call in model.calls if call[1] > 1] == [model.calls[0]]  # one prefill: the queued never ran


def test_tool_markup_is_rendered_as_special_tokens(tiny_tokenizer):
    reply = "Sure. <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> So 5."
    assert reply_parts(reply) == [{"type": "text", "text": "Sure. "}, {"type": "python", "text": "2+3"},
                                  {"type": "python_output", "text": "5"}, {"type": "text", "text": " So 5."}]
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "thanks"}]
    prompt, _ = render_prompt(tiny_tokenizer, messages, 256)
    special = tiny_tokenizer.encode_special
    call = [special("<|python_start|>")] + tiny_tokenizer.encode("2+3") + [special("<|python_end|>")]
    assert any(prompt[i:i + len(call)] == call for i in range(len(prompt)))


@pytest.mark.slow
def test_a_long_chat_keeps_going_past_the_context(tiny_tokenizer):
    """25 turns with a real tiny model at a 64-token context, never an error. As the page does: the stream says
    how many of the oldest messages were left out, the client stops sending them, and the reply is the one the
    kept messages get on their own. As an OpenAI client does: the whole history, with a system message, every
    time; X-Dropped-Messages says how many were left out, and the prompt is the rest."""
    context, max_tokens = 64, 12
    model = make_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=context)
    import openai
    with serve(create_app([(model, tiny_tokenizer)], max_tokens=max_tokens, temperature=0.0)) as url:
        sent, total_dropped = [], 0
        for i in range(25):
            sent.append({"role": "user", "content": f"Tell me more about item {i}."})
            response = httpx.post(f"{url}/chat/completions", json={"messages": sent}, timeout=60)
            events = sse_events(response.text)
            dropped = events[0].get("dropped", 0)
            assert int(response.headers["x-dropped-messages"]) == dropped and dropped % 2 == 0
            sent = sent[dropped:]
            _, expected = reference_reply(model, tiny_tokenizer, sent, max_tokens)  # (they fit: nothing dropped)
            assert "".join(e.get("token", "") for e in events) == tiny_tokenizer.decode(expected)
            assert events[-1] == {"done": True} and not any("error" in e for e in events)
            sent.append({"role": "assistant", "content": tiny_tokenizer.decode(expected)})
            total_dropped += dropped
        assert total_dropped > 10

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        history = [{"role": "system", "content": "You are brief."}]
        for i in range(25):
            history.append({"role": "user", "content": f"And item {i}?"})
            raw = client.chat.completions.with_raw_response.create(model="nanochat", messages=history)
            reply, dropped = raw.parse(), int(raw.headers["x-dropped-messages"])
            prompt, more = render_prompt(tiny_tokenizer, history[:1] + history[1 + dropped:], context, max_tokens)
            assert more == 0 and reply.usage.prompt_tokens == len(prompt)  # the system message stays
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
        assert dropped > 10
