"""
Serving under load: N concurrent streaming clients on loopback against scripts.chat_web, with continuous
batching (--max-batch slots) and one request at a time (--max-batch 1, the old worker), in the same run.

    NANOCHAT_BASE_DIR=... python -m dev.bench_serve -i sft                       # a trained checkpoint, CPU
    python -m dev.bench_serve -i sft --device-type cuda --max-batch 32 --clients 1,8,32

Each client sends --requests streaming /v1/chat/completions requests one after the other (greedy, so both
servers have the same work), starting at a random moment within the first --stagger seconds, as users do.
Printed per server and client count: aggregate tokens/s, time to first token (TTFT) and time per output
token after the first (TPOT) at p50/p95, and how many replies equal the one-at-a-time server's.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = ["Why is the sky blue?", "What is the capital of France?", "Write a short poem about the sea.",
           "Explain how a bicycle works.", "What is 12 times 7?", "Tell me a story about a dragon who learned to read.",
           "List three facts about the moon.", "How do plants make food?", "What did the Romans build?",
           "Give me advice for a job interview.", "Who wrote Hamlet, and what is it about?", "Hello!",
           "Describe the water cycle in a few sentences.", "Why do cats purr?", "What is a prime number?",
           "Summarize the history of the printing press."]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, max_batch):
    """scripts.chat_web in a subprocess (the real server, its own interpreter); returns (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "scripts.chat_web", "-i", args.source, "--port", str(port), "--host", "127.0.0.1",
               "--max-batch", str(max_batch), "--compile", str(args.compile), "-m", str(args.max_tokens)]
    for flag, value in (("--device-type", args.device_type), ("-g", args.model_tag), ("-s", args.step)):
        if value:
            command += [flag, str(value)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"the server did not start: `{' '.join(command)}` (run it by hand to see why)")
        time.sleep(0.5)


async def one_request(client, url, prompt, max_tokens):
    """Stream one reply -> dict(text, tokens, ttft, tpot) (tpot None for a one-token reply)."""
    body = {"model": "nanochat", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    text, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                text.append(chunk["choices"][0]["delta"]["content"])
    ttft = (first or time.perf_counter()) - start
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return dict(text="".join(text), tokens=tokens, ttft=ttft, tpot=tpot)


async def load(url, num_clients, args):
    """num_clients clients, each sending args.requests requests in turn -> (results by (client, i), wall seconds)."""
    rng = random.Random(num_clients)
    results = {}

    async def client_loop(c, client):
        await asyncio.sleep(rng.uniform(0, args.stagger) if num_clients > 1 else 0)
        for i in range(args.requests):
            prompt = PROMPTS[(c * args.requests + i) % len(PROMPTS)]
            results[c, i] = await one_request(client, url, prompt, args.max_tokens)

    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(num_clients)))
        return results, time.perf_counter() - start


def percentile(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"])
    parser.add_argument("-g", "--model-tag", type=str, default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--device-type", type=str, default="")
    parser.add_argument("--clients", type=str, default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64, help="max new tokens per reply")
    parser.add_argument("--max-batch", type=int, default=16, help="decode slots of the batching server")
    parser.add_argument("--compile", type=int, default=-1, help="the servers' --compile (1/0, -1 = on CUDA only)")
    parser.add_argument("--stagger", type=float, default=1.0, help="clients start within this many seconds")
    args = parser.parse_args()
    client_counts = [int(n) for n in args.clients.split(",")]

    print(f"{os.cpu_count()} CPUs; {args.requests} requests per client, up to {args.max_tokens} tokens each, "
          f"clients start within {args.stagger:g} s")
    print(f"{'server':>14} {'clients':>7} {'tokens/s':>9} {'speedup':>7} {'TTFT p50':>9} {'p95':>7} "
          f"{'TPOT p50':>9} {'p95':>7} {'same replies':>12}")
    baseline = {}
    for max_batch in (1, args.max_batch):
        process, url = start_server(args, max_batch)
        try:
            asyncio.run(load(url, 1, args))  # warm-up: allocator, first compile
            for num_clients in client_counts:
                results, seconds = asyncio.run(load(url, num_clients, args))
                tokens_per_s = sum(r["tokens"] for r in results.values()) / seconds
                if max_batch == 1:
                    baseline[num_clients] = (tokens_per_s, results)
                base_tokens_per_s, base_results = baseline[num_clients]
                same = sum(r["text"] == base_results[key]["text"] for key, r in results.items())
                ms = lambda q, key: 1000 * percentile([r[key] for r in results.values()], q)  # noqa: E731
                name = "one at a time" if max_batch == 1 else f"batch {max_batch}"
                print(f"{name:>14} {num_clients:>7} {tokens_per_s:>9.0f} {tokens_per_s / base_tokens_per_s:>6.1f}x "
                      f"{ms(50, 'ttft'):>7.0f}ms {ms(95, 'ttft'):>5.0f}ms {ms(50, 'tpot'):>7.1f}ms {ms(95, 'tpot'):>5.1f}ms "
                      f"{same:>5}/{len(results)}")
        finally:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
