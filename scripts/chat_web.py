"""
Chat with the model in a browser (and through any OpenAI-compatible client).

    python -m scripts.chat_web -i sft                 # one GPU (or the CPU), http://localhost:8000
    python -m scripts.chat_web -i sft --num-gpus 8    # one model replica per GPU, requests spread over them

Endpoints: GET / (the chat page), POST /chat/completions (Server-Sent Events
`data: {"token": ..., "gpu": i}` ... `data: {"done": true}`), GET /health, GET /stats, and the
OpenAI-style POST /v1/chat/completions (stream or not) and GET /v1/models.

Each replica is a worker; a request waits in an asyncio queue until a worker is free, and its
generation runs in a thread so the event loop keeps serving other requests (and /health).
create_app() builds the whole server around given (model, tokenizer) pairs, which is what tests use.
"""

import argparse
import asyncio
import json
import logging
import os
import random
import re
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.engine import Engine, StreamDecoder

logger = logging.getLogger("nanochat")

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# Request limits (SPEC §9): they keep one request from monopolising a worker or the host's memory.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)


class RequestError(Exception):
    """A request the client must fix: answered with HTTP 400 and this message."""


# -------------------------------------------------------------------------------------------------
# Request parsing

async def read_json(request):
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with a 'messages' list")
    return body


def parse_number(value, name, default, value_range, integer):
    if value is None:
        return default
    low, high = value_range
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not low <= value <= high:
        raise RequestError(f"{name} must be {kind} between {low} and {high}, got {value!r}")
    return value


def parse_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES}); start a new conversation")
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"message {i} must be an object whose role is 'system', 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str):
            raise RequestError(f"message {i}: content must be a string")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"message {i} is too long: {len(content)} characters (the limit is {MAX_MESSAGE_CHARS})")
        total_chars += len(content)
    if total_chars > MAX_TOTAL_CHARS:
        raise RequestError(f"the conversation is too long: {total_chars} characters in total "
                           f"(the limit is {MAX_TOTAL_CHARS}); start a new conversation")
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be from the user (the model writes the reply)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_sampling(body, defaults):
    """-> dict(temperature, top_k, max_tokens, seed) from the body, falling back to the server's flags."""
    max_tokens_key = "max_completion_tokens" if "max_tokens" not in body else "max_tokens"  # OpenAI's newer name
    return dict(
        temperature=parse_number(body.get("temperature"), "temperature", defaults["temperature"], TEMPERATURE_RANGE,
                                 integer=False),
        top_k=parse_number(body.get("top_k"), "top_k", defaults["top_k"], TOP_K_RANGE, integer=True),
        max_tokens=parse_number(body.get(max_tokens_key), max_tokens_key, defaults["max_tokens"], MAX_TOKENS_RANGE,
                                integer=True),
        # a fresh seed per request so "regenerate" gives a new answer; clients may pin one
        seed=parse_number(body.get("seed"), "seed", random.randrange(2**31), (0, 2**63 - 1), integer=True),
    )


TOOL_MARKUP = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


def assistant_parts(text):
    """Earlier replies come back as text with the tool markers decoded in it; turn them back into
    python / python_output parts so they are rendered with the real special tokens."""
    parts, last = [], 0
    for match in TOOL_MARKUP.finditer(text):
        parts.append({"type": "text", "text": text[last:match.start()]})
        is_call = match.group(1) is not None
        parts.append({"type": "python" if is_call else "python_output", "text": match.group(1 if is_call else 2)})
        last = match.end()
    parts.append({"type": "text", "text": text[last:]})
    return [p for p in parts if p["type"] != "text" or p["text"]]


def render_prompt(tokenizer, messages, context):
    """Token ids of the conversation, primed for the assistant's reply."""
    messages = [dict(m, content=assistant_parts(m["content"])) if m["role"] == "assistant" else m for m in messages]
    try:
        prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    except ValueError as e:
        raise RequestError(str(e))
    if len(prompt) >= context:
        raise RequestError(f"the conversation is {len(prompt)} tokens but the model's context is {context} tokens; "
                           "start a new conversation or send a shorter message")
    return prompt


# -------------------------------------------------------------------------------------------------
# Workers

class Worker:
    """One model replica (one GPU) with its Engine; serves one request at a time."""

    def __init__(self, index, model, tokenizer, dtype=None):
        self.index = index
        self.engine = Engine(model, tokenizer, dtype=dtype)
        self.tokenizer = tokenizer
        self.num_requests = 0
        self.busy = False

    def generate(self, prompt, sampling, stop):
        """Yield {"token": text} pieces (never splitting a character), then {"finish_reason", "completion_tokens"}."""
        decoder = StreamDecoder(self.tokenizer)
        finish_reason, num_tokens = "length", 0
        for token_column, _ in self.engine.generate(prompt, num_samples=1, **sampling):
            token = token_column[0]
            num_tokens += 1
            if token in self.engine.stop_tokens:
                finish_reason = "stop"
                break
            text = decoder.push(token)
            if text:
                yield {"token": text}
            if stop.is_set():  # the client went away
                break
        text = decoder.flush()
        if text:
            yield {"token": text}
        yield {"finish_reason": finish_reason, "completion_tokens": num_tokens}


class WorkerPool:
    """Free workers wait in an asyncio queue; a request takes one and always gives it back."""

    def __init__(self, workers):
        self.workers = workers
        self.available = asyncio.Queue()
        for worker in workers:
            self.available.put_nowait(worker)

    async def acquire(self):
        worker = await self.available.get()
        worker.busy = True
        worker.num_requests += 1
        return worker

    def release(self, worker):
        worker.busy = False
        self.available.put_nowait(worker)


def call_in_loop(loop, fn, *args):
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


async def generation_events(pool, stats, prompt, sampling):
    """
    Run one generation on a free worker, in a thread, and yield (worker, event) as events arrive:
    {"token": text}, {"error": message} if generation raised, and last {"finish_reason", ...}.
    The thread returns the worker to the pool whatever happens, after its last model call.
    """
    worker = await pool.acquire()
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    stop = threading.Event()

    def produce():
        try:
            for event in worker.generate(prompt, sampling, stop):
                call_in_loop(loop, events.put_nowait, event)
        except Exception as e:
            logger.exception("generation failed")
            call_in_loop(loop, events.put_nowait, {"error": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            call_in_loop(loop, events.put_nowait, None)
            call_in_loop(loop, pool.release, worker)

    stats["requests_total"] += 1
    stats["requests_active"] += 1
    threading.Thread(target=produce, name=f"generate-worker{worker.index}", daemon=True).start()
    try:
        while (event := await events.get()) is not None:
            stats["tokens_generated"] += event.get("completion_tokens", 0)
            stats["requests_failed"] += int("error" in event)
            yield worker, event
    finally:
        stop.set()
        stats["requests_active"] -= 1


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -------------------------------------------------------------------------------------------------
# The app

def create_app(replicas, temperature=0.8, top_k=50, max_tokens=512, model_name="nanochat", dtype=None):
    """
    replicas: list of (model, tokenizer), one worker each. temperature/top_k/max_tokens are the defaults
    for requests that do not set them; dtype as in Engine (None: the device's compute dtype).
    """
    workers = [Worker(i, model, tokenizer, dtype) for i, (model, tokenizer) in enumerate(replicas)]
    pool = WorkerPool(workers)
    tokenizer = workers[0].tokenizer
    context = workers[0].engine.model.config.sequence_len
    defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    stats = dict(requests_total=0, requests_active=0, requests_failed=0, tokens_generated=0)
    started = time.time()
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()

    app = FastAPI(title="nanochat")
    app.state.pool = pool

    @app.exception_handler(RequestError)
    async def bad_request(request, error):
        if request.url.path.startswith("/v1/"):  # the shape OpenAI clients read their error message from
            return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error"}}, status_code=400)
        return JSONResponse({"detail": str(error)}, status_code=400)

    async def parse_request(request):
        body = await read_json(request)
        messages = parse_messages(body)
        return body, render_prompt(tokenizer, messages, context), parse_sampling(body, defaults)

    @app.get("/")
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "num_workers": len(workers), "available_workers": pool.available.qsize()}

    @app.get("/stats")
    async def get_stats():
        return dict(stats, num_workers=len(workers), available_workers=pool.available.qsize(),
                    uptime_s=round(time.time() - started, 1),
                    workers=[{"gpu": w.index, "device": str(w.engine.device), "busy": w.busy,
                              "requests": w.num_requests} for w in workers])

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        _, prompt, sampling = await parse_request(request)

        async def stream():
            async for worker, event in generation_events(pool, stats, prompt, sampling):
                if "token" in event:
                    yield sse({"token": event["token"], "gpu": worker.index})
                elif "error" in event:
                    yield sse({"error": event["error"]})
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        body, prompt, sampling = await parse_request(request)
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = generation_events(pool, stats, prompt, sampling)

        def usage(completion_tokens):
            return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt) + completion_tokens}

        if not body.get("stream"):
            text, final, error = [], None, None
            async for _, event in events:
                text.append(event.get("token", ""))
                error = event.get("error", error)
                final = event if "finish_reason" in event else final
            if error is not None or final is None:
                return JSONResponse({"error": {"message": error, "type": "server_error"}}, status_code=500)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": final["finish_reason"]}],
                    "usage": usage(final["completion_tokens"])}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta, finish_reason=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            async for _, event in events:
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

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# -------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Serve the chat UI and an OpenAI-compatible API")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["", "float32", "bfloat16", "float16"],
                        help="compute dtype (default: what the device runs fast, see nanochat.common.compute_choice)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    parser.add_argument("--host", type=str, default="0.0.0.0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type
    import uvicorn

    device_type = args.device_type or autodetect_device_type()
    if args.dtype:
        os.environ["NANOCHAT_DTYPE"] = args.dtype  # the one compute-dtype setting: the models and their KV caches read it
    if args.num_gpus < 1:
        parser.error("--num-gpus must be >= 1")
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        parser.error(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
    if device_type == "cuda":
        replicas = []
        for i in range(args.num_gpus):
            model, tokenizer, _ = load_model(args.source, torch.device("cuda", i), phase="eval",
                                             model_tag=args.model_tag, step=args.step)
            replicas.append((model, tokenizer))
    else:
        # CPU/MPS workers share one copy of the weights: inference never writes to them
        model, tokenizer, _ = load_model(args.source, torch.device(device_type), phase="eval",
                                         model_tag=args.model_tag, step=args.step)
        replicas = [(model, tokenizer)] * args.num_gpus

    app = create_app(replicas, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     model_name=f"nanochat-{args.source}")
    logger.info(f"Serving {len(replicas)} worker(s) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
