"""
Chat with the model in a browser (and through any OpenAI-compatible client).

    python -m scripts.chat_web -i sft                        # one GPU (or the CPU), http://localhost:8000
    python -m scripts.chat_web -i sft --num-gpus 8           # one model replica per GPU
    python -m scripts.chat_web -i sft --api-key SECRET       # before exposing it: clients send `Authorization: Bearer SECRET`

Endpoints: GET / (the chat page), POST /chat/completions (Server-Sent Events
`data: {"token": ..., "gpu": i}` ... `data: {"done": true}`), GET /health, GET /stats, and the
OpenAI-style POST /v1/chat/completions (stream or not) and GET /v1/models. With an API key, every
endpoint but the page and /health needs it (and FastAPI's /docs, /redoc and /openapi.json are off).
A conversation longer than the model's context loses its oldest exchanges (nanochat/serving.py,
fit_conversation): the response's X-Dropped-Messages header says how many messages were left out, and
the page's stream starts with `data: {"dropped": n}` (the page then stops sending them).

Each replica is a worker: a thread running continuous batching (nanochat/serving.py) over --max-batch
decode slots, so concurrent conversations share one decode loop instead of waiting for each other
(--max-batch 1 serves one request at a time). The event loop only parses requests and streams tokens.
A client that goes away cancels its generation, which frees its slot at the worker's next step.
create_app() builds the whole server around given (model, tokenizer) pairs, which is what tests use.
"""

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import random
import resource
import threading
import time
import uuid

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from nanochat.common import compute_init
from nanochat.engine import Engine, reply_parts
from nanochat.serving import BatchScheduler, GuardedH11Protocol, fit_conversation, generation_events
from nanochat.run import add_checkpoint_flags

logger = logging.getLogger("nanochat")

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# Request limits: they keep one request from monopolising a worker or the host's memory.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
TOP_P_RANGE = (0.0, 1.0)
MAX_TOKENS_RANGE = (1, 4096)
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 200  # per stop sequence: the stream holds back up to this many characters that might begin one
# Slow or idle clients: a request's body must arrive within BODY_TIMEOUT_S, its head (in GuardedH11Protocol)
# within HEADER_TIMEOUT_S, and at most MAX_CONNECTIONS connections are open (fewer under a low `ulimit -n`).
MAX_BODY_BYTES = 1_000_000
BODY_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1000
# OpenAI options this server does not implement: refused unless absent or neutral, never silently ignored
UNSUPPORTED_OPTIONS = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0,
                       "logit_bias": {}, "tools": [], "functions": [], "response_format": {"type": "text"}}


class RequestError(Exception):
    """A request the client must fix, answered with this HTTP status (400 unless said) and message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# -------------------------------------------------------------------------------------------------
# Request parsing

async def read_json(request, max_bytes, timeout):
    """The body as a JSON object. A body over max_bytes is refused (413) before it is read whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(f"the request body is {declared} bytes; the limit is {max_bytes}", status=413)
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise RequestError(f"the request body is over the limit of {max_bytes} bytes", status=413)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", status=408)
    except ClientDisconnect:
        raise RequestError("the client left while sending the request")
    try:
        body = json.loads(body)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise RequestError(f"the request body is not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a 'messages' list")
    return body


def shown(value):
    """A short description of a client's value for an error message (never the repr of a huge or deep one)."""
    return repr(value)[:40] if isinstance(value, (bool, int, float, str)) else type(value).__name__


def parse_number(value, name, default, value_range, integer):
    if value is None:
        return default
    low, high = value_range
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not low <= value <= high:
        raise RequestError(f"{name} must be {kind} between {low} and {high}, got {shown(value)}")
    return value


def parse_flag(body, name, field=None):
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{field or name} must be true or false, got {shown(value)}")
    return bool(value)


def message_text(content, index):
    """A message's content: a string, or OpenAI's content parts [{"type": "text", "text": ...}, ...] joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise RequestError(f"message {index}: content must be a string or a list of "
                       '{"type": "text", "text": ...} parts (this model reads text only)')


def parse_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES}); start a new conversation")
    parsed, total_chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"message {i} must be an object whose role is 'system', 'user' or 'assistant'")
        content = message_text(message.get("content"), i)
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"message {i} is too long: {len(content)} characters (the limit is {MAX_MESSAGE_CHARS})")
        total_chars += len(content)
        parsed.append({"role": message["role"], "content": content})
    if total_chars > MAX_TOTAL_CHARS:
        raise RequestError(f"the conversation is too long: {total_chars} characters in total "
                           f"(the limit is {MAX_TOTAL_CHARS}); start a new conversation")
    if parsed[-1]["role"] != "user":
        raise RequestError("the last message must be from the user (the model writes the reply)")
    return parsed


def parse_sampling(body, defaults):
    """-> dict(temperature, top_k, top_p, max_tokens, seed) from the body, falling back to the server's flags."""
    max_tokens = {name: parse_number(body.get(name), name, None, MAX_TOKENS_RANGE, integer=True)
                  for name in ("max_tokens", "max_completion_tokens")}  # the older and OpenAI's newer name
    if None not in max_tokens.values() and len(set(max_tokens.values())) > 1:
        raise RequestError("max_tokens and max_completion_tokens differ: give one of them")
    return dict(
        temperature=parse_number(body.get("temperature"), "temperature", defaults["temperature"], TEMPERATURE_RANGE,
                                 integer=False),
        top_k=parse_number(body.get("top_k"), "top_k", defaults["top_k"], TOP_K_RANGE, integer=True),
        top_p=parse_number(body.get("top_p"), "top_p", None, TOP_P_RANGE, integer=False),
        max_tokens=max_tokens["max_completion_tokens"] or max_tokens["max_tokens"] or defaults["max_tokens"],
        # a fresh seed per request so "regenerate" gives a new answer; clients may pin one
        seed=parse_number(body.get("seed"), "seed", random.randrange(2**31), (0, 2**63 - 1), integer=True),
    )


def parse_openai_options(body):
    """-> (stream, include_usage, stop sequences) of an OpenAI request; refuses what this server cannot do."""
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise RequestError(f"n must be 1 (one reply per request), got {shown(n)}")
    for name, neutral in UNSUPPORTED_OPTIONS.items():
        if body.get(name) is not None and body[name] != neutral:
            raise RequestError(f"{name} is not supported by this server")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError(f"stream_options must be an object, got {shown(stream_options)}")
    include_usage = parse_flag(stream_options or {}, "include_usage", "stream_options.include_usage")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list) and len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop has {len(stops)} sequences; the limit is {MAX_STOP_SEQUENCES}")
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop must be a string or a list of strings, got {shown(stop)}")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop sequence {i} is {len(s)} characters; the limit is {MAX_STOP_CHARS}")
    return parse_flag(body, "stream"), include_usage, stops


def render_prompt(tokenizer, messages, context, max_tokens=None):
    """-> (token ids of the conversation primed for the assistant's reply, how many of its oldest messages did not
    fit the context: see fit_conversation). Earlier replies come back as text with the tool markers decoded in it:
    they are rendered with the real special tokens again."""
    messages = [dict(m, content=reply_parts(m["content"])) if m["role"] == "assistant" else m for m in messages]
    try:
        prompt, kept = fit_conversation(tokenizer, messages, context, max_tokens)
    except ValueError as e:
        raise RequestError(str(e))
    return prompt, len(messages) - len(kept)


# -------------------------------------------------------------------------------------------------
# Workers

class Worker:
    """One model replica (one GPU): an Engine, and the BatchScheduler that a thread of its own runs."""

    def __init__(self, index, model, tokenizer, dtype=None, max_batch=8, compile=False):
        self.index = index
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, dtype=dtype, compile=compile)
        self.scheduler = BatchScheduler(self.engine, max_batch)
        self.thread = threading.Thread(target=self.scheduler.run, name=f"worker{index}", daemon=True)

    def load(self):
        return self.scheduler.num_active() + self.scheduler.num_waiting()


async def unless_client_leaves(request, coroutine):
    """Await coroutine, unless the client disconnects first: then cancel it (freeing its slot) and return None."""
    async def client_gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(coroutine), asyncio.ensure_future(client_gone())
    await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_headers(dropped):
    return {"Cache-Control": "no-cache", "X-Dropped-Messages": str(dropped)}


# -------------------------------------------------------------------------------------------------
# The app

def create_app(replicas, temperature=0.8, top_k=50, max_tokens=512, model_name="nanochat", dtype=None, max_batch=8,
               compile=False, api_key=None, max_body_bytes=MAX_BODY_BYTES, body_timeout=BODY_TIMEOUT_S):
    """
    replicas: list of (model, tokenizer), one worker each, with max_batch decode slots (compile: the
    compiled decode step). temperature/top_k/max_tokens are the defaults for requests that do not set
    them; dtype as in Engine (None: the device's compute dtype). api_key: None, or the key that every
    endpoint but the page and /health requires.
    """
    workers = [Worker(i, model, tokenizer, dtype, max_batch, compile) for i, (model, tokenizer) in enumerate(replicas)]
    tokenizer = workers[0].tokenizer
    context = workers[0].engine.model.config.sequence_len
    defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    stats = dict(requests_total=0, requests_active=0, requests_failed=0, tokens_generated=0)
    started = time.time()
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for worker in workers:
            worker.thread.start()
        yield
        for worker in workers:
            worker.scheduler.stop()
            worker.thread.join(timeout=10)

    # FastAPI's API docs describe every endpoint to anyone: with a key, they are off rather than unguarded
    docs = {} if api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="nanochat", lifespan=lifespan, **docs)
    app.state.workers = workers

    @app.exception_handler(RequestError)
    async def request_error(request, error):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if request.url.path.startswith("/v1/") or error.status == 401:  # the shape OpenAI clients read errors from
            code = "invalid_api_key" if error.status == 401 else None
            body = {"error": {"message": str(error), "type": "invalid_request_error", "code": code}}
        else:
            body = {"detail": str(error)}
        return JSONResponse(body, status_code=error.status, headers=headers)

    def require_api_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", status=401)

    guarded = [Depends(require_api_key)]

    async def parse_request(request):
        """-> (body, prompt, sampling, dropped: how many of the oldest messages did not fit)"""
        body = await read_json(request, max_body_bytes, body_timeout)
        messages, sampling = parse_messages(body), parse_sampling(body, defaults)
        # tokenizing (up to MAX_TOTAL_CHARS, a few times for a conversation that outgrew the context) off the event loop
        prompt, dropped = await asyncio.to_thread(render_prompt, tokenizer, messages, context, sampling["max_tokens"])
        return body, prompt, sampling, dropped

    def events_for(prompt, sampling, stops=()):
        worker = min(workers, key=Worker.load)
        return worker, generation_events(worker.scheduler, stats, prompt, sampling, stops)

    def load():
        return dict(num_workers=len(workers), active_requests=sum(w.scheduler.num_active() for w in workers),
                    waiting_requests=sum(w.scheduler.num_waiting() for w in workers))

    @app.get("/")
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        return dict(status="ok", ready=True, api_key_required=api_key is not None, **load())

    @app.get("/stats", dependencies=guarded)
    async def get_stats():
        return dict(stats, **load(), uptime_s=round(time.time() - started, 1),
                    workers=[{"gpu": w.index, "device": str(w.engine.device), "max_batch": w.scheduler.max_batch,
                              "active": w.scheduler.num_active(), "waiting": w.scheduler.num_waiting()}
                             for w in workers])

    @app.post("/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        _, prompt, sampling, dropped = await parse_request(request)
        worker, events = events_for(prompt, sampling)

        async def stream():
            if dropped:
                yield sse({"dropped": dropped})
            async for event in events:
                if "token" in event:
                    yield sse({"token": event["token"], "gpu": worker.index})
                elif "error" in event:
                    yield sse({"error": event["error"]})
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=stream_headers(dropped))

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def openai_chat_completions(request: Request):
        body, prompt, sampling, dropped = await parse_request(request)
        stream, include_usage, stops = parse_openai_options(body)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        _, events = events_for(prompt, sampling, stops)

        def usage(completion_tokens):
            return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt) + completion_tokens}

        if not stream:
            async def collect():
                return [event async for event in events]

            reply = await unless_client_leaves(request, collect())
            if reply is None:
                return Response(status_code=499)  # nobody is left to read it
            error = next((e["error"] for e in reply if "error" in e), None)
            if error is not None:
                return JSONResponse({"error": {"message": error, "type": "server_error"}}, status_code=500)
            text, final = "".join(e.get("token", "") for e in reply), reply[-1]
            completion = {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": final["finish_reason"]}],
                          "usage": usage(final["completion_tokens"])}
            return JSONResponse(completion, headers={"X-Dropped-Messages": str(dropped)})

        def chunk(delta, finish_reason=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        async def stream_chunks():
            yield chunk({"role": "assistant", "content": ""})
            async for event in events:
                if "token" in event:
                    yield chunk({"content": event["token"]})
                elif "error" in event:
                    yield sse({"error": {"message": event["error"], "type": "server_error"}})
                else:
                    yield chunk({}, event["finish_reason"])
                    if include_usage:
                        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model_name, "choices": [], "usage": usage(event["completion_tokens"])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream_chunks(), media_type="text/event-stream", headers=stream_headers(dropped))

    return app


def server_config(app, header_timeout=HEADER_TIMEOUT_S, max_connections=MAX_CONNECTIONS, **kwargs):
    """uvicorn's settings: slow or idle clients are dropped instead of holding connections (see GuardedH11Protocol)."""
    import uvicorn
    return uvicorn.Config(app, http=GuardedH11Protocol.with_limits(header_timeout, max_connections),
                          timeout_keep_alive=5, **kwargs)


def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


# -------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Serve the chat UI and an OpenAI-compatible API")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU")
    add_checkpoint_flags(parser, "sft", ["base", "sft", "rl"])
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["", "float32", "bfloat16", "float16"],
                        help="compute dtype (default: what the device runs fast, see nanochat.common.compute_choice)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    parser.add_argument("--host", type=str, default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="decode slots per worker: conversations served at once (0: 32 on GPU, 8 on CPU; 1: one at a time)")
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile the decode step: 1/0, -1 = on CUDA only")
    parser.add_argument("--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $NANOCHAT_API_KEY)")
    args = parser.parse_args()

    from nanochat.checkpoint_manager import find_checkpoint, load_model
    import uvicorn

    if args.num_gpus < 1:
        parser.error("--num-gpus must be >= 1")
    if args.max_batch < 0:
        parser.error("--max-batch must be >= 1 (or 0 for the device's default)")
    if args.dtype:
        os.environ["NANOCHAT_DTYPE"] = args.dtype  # the one compute-dtype setting: the models and their KV caches read it
    _, _, _, _, device = compute_init(args.device_type)  # from here on, a user error is one line, not a traceback
    device_type = device.type
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        parser.error(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
    max_batch = args.max_batch or (32 if device_type == "cuda" else 8)
    compile = bool(args.compile) if args.compile >= 0 else device_type == "cuda"
    if device_type == "cuda":
        _, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)  # one checkpoint for every replica
        replicas = []
        for i in range(args.num_gpus):
            model, tokenizer, _ = load_model(args.source, torch.device("cuda", i), "eval", model_tag, step)
            replicas.append((model, tokenizer))
    else:
        # CPU/MPS workers share one copy of the weights: inference never writes to them
        model, tokenizer, *_ = load_model(args.source, device, "eval", args.model_tag, args.step)
        replicas = [(model, tokenizer)] * args.num_gpus
        if device_type == "cpu":  # leave a core to the event loop that streams the tokens (+20% at 16 clients on 2 cores)
            torch.set_num_threads(max(1, torch.get_num_threads() - 1))

    app = create_app(replicas, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     model_name=f"nanochat-{args.source}", max_batch=max_batch, compile=compile,
                     api_key=args.api_key or None)
    if not args.api_key and not is_loopback(args.host):
        logger.warning(f"warning: serving on {args.host} without an API key, so anyone who can reach port {args.port} "
                       "can use it; set --api-key or NANOCHAT_API_KEY")
    logger.info(f"Serving {len(replicas)} worker(s) x {max_batch} slots on http://{args.host}:{args.port}")
    # fewer connections than files this process may open (`ulimit -n`), with room for the model's files, logs...
    max_connections = max(1, min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64))
    uvicorn.Server(server_config(app, host=args.host, port=args.port, max_connections=max_connections)).run()


if __name__ == "__main__":
    main()
