"""The chat server exposed to a network: API key, body limits, malformed requests, slow clients (real sockets)."""
import collections
import json
import select
import socket
import time

import httpx
import pytest

from scripts.chat_web import create_app, is_loopback
from helpers import MESSAGES, ScriptedModel, serve

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(tiny_tokenizer):
    """A server that requires KEY, takes bodies of up to 10 kB, waits 0.5 s for a body or a request head, and
    answers everything with " the"."""
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.encode(" the"), prompt_len=0)  # one token
    app = create_app([(model, tiny_tokenizer)], api_key=KEY, max_body_bytes=10_000, body_timeout=0.5, max_tokens=1)
    with serve(app, header_timeout=0.5, max_connections=20) as url:
        yield url


def test_only_loopback_addresses_count_as_private():
    # main() prints a warning when serving any other address without a key
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))


def post(url, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30, **kwargs)


def test_api_key_guards_every_endpoint_but_the_page_and_health(guarded):
    import openai
    url = guarded
    assert httpx.get(url, timeout=10).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).json()["api_key_required"] is True
    for key in (None, "wrong", KEY + "x", KEY[:-1]):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in [("POST", "/chat/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/stats")]:
            response = httpx.request(method, f"{url}{path}", json={"messages": MESSAGES}, headers=headers, timeout=10)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/stats", headers={"Authorization": KEY}, timeout=10).status_code == 401  # no "Bearer"
    assert post(url, "/chat/completions", {"messages": MESSAGES}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    reply = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="nanochat", messages=MESSAGES)
    assert reply.choices[0].message.content == " the"


def raw_request(url, head, body=b""):
    """A fresh connection on which these raw bytes were sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + body)
    return sock


def read_status(sock):
    """The status code of the response on sock, or None when the server closed it without one."""
    data = b""
    try:
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None


def test_bodies_over_the_limit_are_refused_before_they_are_read(guarded):
    url = guarded
    big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    response = post(url, "/v1/chat/completions", big)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    # No Content-Length (chunked): the server counts bytes and answers while the body is still coming.
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    sock = raw_request(url, head)
    answered = False
    for _ in range(12_800):  # up to 100 MB, never the final chunk
        sock.sendall(b"2000\r\n" + b" " * 0x2000 + b"\r\n")
        if answered := bool(select.select([sock], [], [], 0.001)[0]):
            break
    assert answered and read_status(sock) == 413
    sock.close()


def test_a_body_that_does_not_arrive_gets_408(guarded):
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    sock = raw_request(guarded, head, b'{"messages": ')
    start = time.monotonic()
    assert read_status(sock) == 408 and time.monotonic() - start < 5
    sock.close()


@pytest.mark.parametrize("body, status, message", [
    (b"[" * 200_000 + b"]" * 200_000, 413, "the limit is 10000"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    (b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "nested too deeply"),
    (b'{"messages": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "message 0 must be an object"),
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
])
def test_malformed_json_gets_a_clear_error(guarded, body, status, message):
    response = httpx.post(f"{guarded}/v1/chat/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]["message"]


@pytest.mark.parametrize("fields, message", [
    ({"stream": "false"}, "stream must be true or false, got 'false'"),
    ({"stream": 1}, "stream must be true or false"),
    ({"stream": True, "stream_options": 5}, "stream_options must be an object, got 5"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage must be true or false"),
    ({"n": 2}, "n must be 1"),
    ({"n": "1"}, "n must be 1"),
    ({"n": True}, "n must be 1"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "content must be a string or a list"),
    ({"messages": [["user", "hi"]]}, "message 0 must be an object"),
    ({"logit_bias": {"5": 10}}, "logit_bias is not supported"),
])
def test_wrong_types_get_400_naming_the_field(guarded, fields, message):
    response = post(guarded, "/v1/chat/completions", {"messages": MESSAGES, **fields})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_valid_openai_shapes_are_accepted(guarded):
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]
    for fields in ({"n": None, "stream": None, "stream_options": None, "stop": None},
                   {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                 {"role": "user", "content": parts}]},
                   {"stream": False, "presence_penalty": 0, "logprobs": False, "user": "someone", "model": "any"}):
        response = post(guarded, "/v1/chat/completions", {"messages": MESSAGES, **fields})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == " the"
    response = post(guarded, "/v1/chat/completions", {"messages": MESSAGES, "stream": False})
    assert response.headers["content-type"] == "application/json"  # "stream": false does not stream


def test_slow_clients_cannot_starve_the_others(tiny_tokenizer):
    """60 connections that send half a request head, 3x the 20-connection limit: the ones waiting longest are
    dropped to make room, so normal requests get through at once; the head timeout (2 s) closes the rest."""
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.encode(" the"), prompt_len=0)
    with serve(create_app([(model, tiny_tokenizer)], max_tokens=1), header_timeout=2.0, max_connections=20) as url:
        start = time.monotonic()
        slow = [raw_request(url, b"POST /chat/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(60)]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.post(f"{url}/chat/completions", json={"messages": MESSAGES}, timeout=5).status_code == 200
        assert time.monotonic() - start < 2.0  # served before any head timed out: by making room
        open_now = []
        for sock in slow:
            sock.settimeout(0.01)
            try:
                open_now.append(sock.recv(1) != b"")
            except socket.timeout:
                open_now.append(True)
            except ConnectionResetError:
                open_now.append(False)
        assert open_now[:40] == [False] * 40 and sum(open_now) > 10  # the oldest went first
        for sock in slow:
            sock.settimeout(5)
            assert read_status(sock) is None  # closed without an answer
            sock.close()
        assert time.monotonic() - start < 5


def test_api_docs_are_off_when_a_key_is_set(guarded, tiny_tokenizer):
    """FastAPI's docs describe every endpoint: a server with a key does not serve them, with or without the key."""
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        for key in (None, KEY):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert httpx.get(f"{guarded}{path}", headers=headers, timeout=10).status_code == 404
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.encode(" the"), prompt_len=0)
    with serve(create_app([(model, tiny_tokenizer)])) as url:  # no key: a local server keeps its docs
        assert "/v1/chat/completions" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200


# What an attacker (or a careless client) may send, field by field: wrong types, out of range, huge, odd unicode.
ODD_VALUES = [None, True, -1, 0, 1, 1.5, 1e-300, 10**30, "x", "\ud800", "\U0001f642\u0301", [], ["a"], {"a": 1},
              "NaN", "Infinity"]  # (the last two are sent as bare JSON literals; a temperature of 1e-300 is 0 in fp32)
ODD_MESSAGES = [
    [{"role": "user"}], [{"role": "user", "content": None}], [{"content": "hi"}], [{"role": "tool", "content": "hi"}],
    [{"role": "user", "content": "\ud800\udfff\ud800"}], [{"role": "user", "content": "\x00\x01\u200b\ufeff"}],
    [{"role": "user", "content": "<|assistant_end|><|bos|><|user_start|>"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|python_start|>1+1"}, {"role": "user", "content": "?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "?"}],
    [{"role": "system", "content": "x"}], [{"role": "system", "content": "x"}, {"role": "system", "content": "y"}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [None]}], [{"role": "user", "content": "hi", "name": {"a": [1]}}],
    [{"role": "user", "content": ""}] * 499 + [{"role": "user", "content": "hi"}],
    [{"role": "user" if i % 2 == 0 else "assistant", "content": "\U0001f642" * 60} for i in range(499)],
]
SAMPLING_FIELDS = ["temperature", "top_k", "top_p", "max_tokens", "max_completion_tokens", "seed"]  # both endpoints
OPENAI_FIELDS = ["n", "stream", "stop", "stream_options", "logprobs", "top_logprobs", "logit_bias", "response_format",
                 "presence_penalty", "tools"]  # /v1 only (the page's endpoint ignores them)
BOTH, OPENAI = ("/chat/completions", "/v1/chat/completions"), ("/v1/chat/completions",)


def odd_json(value):
    return value if value in ("NaN", "Infinity") else json.dumps(value)


@pytest.mark.slow
def test_odd_requests_get_a_clear_400_never_a_500(tiny_tokenizer):
    """Each field set to each odd value, and malformed or odd messages, on the chat endpoints that read them: every
    answer is a whole reply (no failed generation either) or a 400 whose message is one line naming the field; the
    server keeps serving."""
    model = ScriptedModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.encode(" the"), prompt_len=0)
    base = '"messages": ' + json.dumps(MESSAGES)
    bodies = [("", BOTH, f'{{"messages": {json.dumps(messages)}}}') for messages in ODD_MESSAGES]
    bodies += [(field, paths, f'{{{base}, "{field}": {odd_json(value)}}}')
               for fields, paths in ((SAMPLING_FIELDS, BOTH), (OPENAI_FIELDS, OPENAI)) for field in fields
               for value in ODD_VALUES]
    bodies += [("stop", OPENAI, f'{{{base}, "stop": {json.dumps(stop)}}}') for stop in (["\ud800", "\U0001f642"], ["", ""], [None])]
    statuses = collections.Counter()
    with serve(create_app([(model, tiny_tokenizer)], max_tokens=2)) as url, httpx.Client(timeout=30) as client:
        for field, paths, body in bodies:
            for path in paths:
                response = client.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"})
                statuses[response.status_code] += 1
                assert response.status_code in (200, 400), (path, body[:200], response.text[:300])
                assert response.status_code == 400 or '"error"' not in response.text, (body[:200], response.text[:300])
                if response.status_code == 400:
                    error = response.json()
                    message = error["error"]["message"] if path.startswith("/v1") else error["detail"]
                    assert "\n" not in message and len(message) < 300
                    assert field in message or not field, (body[:200], message)
        assert client.get(f"{url}/health").json()["active_requests"] == 0
        assert client.post(f"{url}/chat/completions", json={"messages": MESSAGES}).status_code == 200
    assert statuses[200] > 50 and statuses[400] > 150  # both kinds really happened
