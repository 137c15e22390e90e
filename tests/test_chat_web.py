"""The chat server for real: uvicorn on a free local port, a tiny random GPT (or a scripted mock)."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from nanochat.engine import Engine
from scripts.chat_web import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOTAL_CHARS, assistant_parts, create_app, render_prompt


class ScriptedConfig:
    n_layer, n_head, n_kv_head, n_embd, sequence_len = 1, 1, 1, 4, 256


class ScriptedModel:
    """Engine contract mock: after a prompt of prompt_len tokens it writes `script`, one token per step."""

    def __init__(self, vocab_size, script, prompt_len):
        self.config = ScriptedConfig()
        self.vocab_size, self.script, self.prompt_len = vocab_size, script, prompt_len

    def get_device(self):
        return "cpu"

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        index = min(kv_cache.get_pos() + T - self.prompt_len, len(self.script) - 1)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[index]] = 100.0
        kv_cache.advance(T)
        return logits


@contextlib.contextmanager
def serve(app):
    """Run the app with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread sync costs more than it saves
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer):
    from nanochat.gpt import GPTConfig, build_gpt
    config = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64, window_pattern="L")
    model = build_gpt(config, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.125)  # spread the logits so greedy decoding is not a near-tie
    return model.eval()


@pytest.fixture(scope="module")
def server(gpt, tiny_tokenizer):
    """Two workers sharing one tiny GPT."""
    app = create_app([(gpt, tiny_tokenizer)] * 2, temperature=0.8, top_k=50, max_tokens=16)
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
    prompt = render_prompt(tokenizer, messages, model.config.sequence_len)
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return prompt, results[0][len(prompt):]


MESSAGES = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me about the history of Rome."}]


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
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens must be an integer between 1 and 4096"),
    ({"messages": MESSAGES, "max_tokens": 4097}, "max_tokens must be"),
    ({"messages": []}, "non-empty list"),
    ({}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 42}]}, "content must be a string"),
    ({"messages": MESSAGES[:2]}, "last message must be from the user"),
    ({"messages": [MESSAGES[0], MESSAGES[0]]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "the history of " * 100}]}, "context is 256 tokens"),
])
def test_limits_are_answered_with_400(server, body, message):
    url, _ = server
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_malformed_requests(server):
    url, _ = server
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(f"{url}/chat/completions", content=content, timeout=30,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert "JSON" in response.json()["detail"]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "top_k": 0}, timeout=30)
    assert response.status_code == 400 and "top_k" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


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

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=3)


def test_stop_token_and_multibyte_text_reach_clients_intact(tiny_tokenizer):
    import openai
    text = "Caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 **ok**"
    messages = [{"role": "user", "content": "hi"}]
    prompt = render_prompt(tiny_tokenizer, messages, ScriptedConfig.sequence_len)
    script = tiny_tokenizer.encode(text) + [tiny_tokenizer.encode_special("<|assistant_end|>")]
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), script, len(prompt))
    with serve(create_app([(model, tiny_tokenizer)])) as url:
        events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": messages}, timeout=30).text)
        pieces = [e["token"] for e in events[:-1]]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="nanochat", messages=messages)
        assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == len(script)  # the stop token counts as generated


def test_concurrent_requests_queue_and_health_stays_up(server):
    url, _ = server

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def chat(i):
                response = await client.post(f"{url}/chat/completions",
                                             json={"messages": [{"role": "user", "content": f"Question {i}"}],
                                                   "max_tokens": 8})
                return sse_events(response.text)

            async def poll_health(tasks):
                latencies = []
                while not all(t.done() for t in tasks):
                    start = time.perf_counter()
                    assert (await client.get(f"{url}/health")).json()["status"] == "ok"
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)
                return latencies

            tasks = [asyncio.create_task(chat(i)) for i in range(32)]
            latencies = await poll_health(tasks)
            return await asyncio.gather(*tasks), latencies

    results, latencies = asyncio.run(run())
    assert all(events[-1] == {"done": True} for events in results)
    assert {e["gpu"] for events in results for e in events[:-1]} == {0, 1}  # both workers served
    assert latencies and max(latencies) < 5.0  # the event loop never blocked on generation
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["available_workers"] == stats["num_workers"] == 2 and stats["requests_active"] == 0
    assert stats["requests_total"] >= 32


def test_failing_generation_returns_worker(server, monkeypatch):
    url, app = server

    def broken_generate(self, tokens, **kwargs):
        yield self.tokenizer.encode("Hi"), [1]
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(Engine, "generate", broken_generate)
    failed_before = httpx.get(f"{url}/stats", timeout=10).json()["requests_failed"]
    for _ in range(5):  # more failures than workers: a leaked worker would hang the later requests
        events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES}, timeout=30).text)
        assert "simulated CUDA error" in events[-2]["error"] and events[-1] == {"done": True}
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    assert response.status_code == 500 and "simulated" in response.json()["error"]["message"]
    monkeypatch.undo()
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["requests_failed"] == failed_before + 6
    assert httpx.get(f"{url}/health", timeout=10).json()["available_workers"] == 2
    assert app.state.pool.available.qsize() == len(app.state.pool.workers) == 2
    events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES}, timeout=30).text)
    assert events[-1] == {"done": True} and "error" not in events[-2]


def test_client_disconnect_returns_worker(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/chat/completions", json={"messages": MESSAGES, "max_tokens": 200},
                      timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/health", timeout=10).json()["available_workers"] != 2:
        assert time.monotonic() < deadline, "the worker of a disconnected client never came back"
        time.sleep(0.05)


def test_tool_markup_is_rendered_as_special_tokens(tiny_tokenizer):
    reply = "Sure. <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> So 5."
    assert assistant_parts(reply) == [{"type": "text", "text": "Sure. "}, {"type": "python", "text": "2+3"},
                                      {"type": "python_output", "text": "5"}, {"type": "text", "text": " So 5."}]
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "thanks"}]
    prompt = render_prompt(tiny_tokenizer, messages, 256)
    special = tiny_tokenizer.encode_special
    call = [special("<|python_start|>")] + tiny_tokenizer.encode("2+3") + [special("<|python_end|>")]
    assert any(prompt[i:i + len(call)] == call for i in range(len(prompt)))
