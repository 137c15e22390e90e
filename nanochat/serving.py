"""
Serving many users from one model: continuous batching, long conversations, stop sequences, and a
guarded HTTP protocol.

Continuous batching (iteration-level scheduling, as in Orca: Yu et al. 2022; 6.0x the tokens/s of one request
at a time at 16 clients: dev/LOG.md, "Integration"). A BatchScheduler owns a KV cache of max_batch rows
(slots), each spanning the model's context. A submitted Generation waits until a slot is free, is prefilled
alone (batch 1, straight into its row), samples its first token at once, and from then on gets one token per
decode step together with every other active row. It leaves when it ends (a stop token, its max_tokens, a full
context) or is cancelled (its client went away), and its slot goes to the next request at the next step.
Active rows are kept in rows 0..n-1 (a leaving row's slot is refilled with the last row), so an eager decode
step runs exactly the n active rows; a compiled one (Engine(compile=True)) always runs all max_batch rows: one
graph, whatever the load.

Each row samples with its own generator and runs its own calculator-tool state machine, so what a
request gets does not depend on its neighbours: at temperature 0, the tokens it would get served
alone. (Up to float rounding: a matmul over 8 rows may round differently from one over 1 row, which
could flip a near-tie between two tokens; the compiled step always has max_batch rows.)

Also here: what a conversation that outgrew the model's context keeps (fit_conversation, for the web
server and the terminal chat), and the text stream of one request, from asyncio (generation_events).
"""

import asyncio
import functools
import logging
import threading
from collections import deque

import torch
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.engine import RowState, StreamDecoder, sample_next_token

logger = logging.getLogger(__name__)


class Generation:
    """
    One request: a prompt and its sampling settings in, tokens out through callbacks, which run on the
    scheduler's thread: on_token(token, forced) for each token (forced: the engine wrote it, a tool
    output), then on_finish(reason) once, with reason "stop" (a stop token, which on_token saw), "length"
    (max_tokens, or the context is full), "cancelled" or "error: ...".
    """

    def __init__(self, prompt, on_token, on_finish, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 seed=42):
        self.prompt, self.on_token, self.on_finish = prompt, on_token, on_finish
        self.max_tokens, self.temperature, self.top_k, self.top_p, self.seed = max_tokens, temperature, top_k, top_p, seed
        self.cancelled = False

    def cancel(self):
        """Safe from any thread: the scheduler drops the request at its next step (or before it starts)."""
        self.cancelled = True


class Slot:
    """An active Generation's row: its tokens and tool state (RowState), generator and token budget."""

    def __init__(self, generation, device, context):
        self.generation = generation
        self.row = RowState(generation.prompt)
        self.rng = torch.Generator(device=device).manual_seed(generation.seed)
        room = context - len(generation.prompt)
        self.max_tokens = room if generation.max_tokens is None else min(generation.max_tokens, room)
        self.num_tokens = 0

    def finish_reason(self):
        if self.row.completed:
            return "stop"
        if self.num_tokens == self.max_tokens:
            return "length"
        return "cancelled" if self.generation.cancelled else None


class BatchScheduler:
    """max_batch decode slots over one Engine; submit() from any thread, run() on the worker's thread."""

    def __init__(self, engine, max_batch):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.context = engine.model.config.sequence_len
        if engine.compiled_step is not None:  # the compiled graph's own cache: fixed addresses (CUDA graphs replay them)
            self.cache = engine.decode_cache(max_batch)
        else:
            self.cache = engine.new_cache(max_batch, self.context)
        self.slots = []  # active rows, in row order
        self.logits = None  # (len(slots), V): each active row's next-token logits
        self.waiting = deque()
        self.wakeup = threading.Condition()
        self.stopped = False

    def submit(self, generation):
        """Queue a request; it joins the batch at the first step with a free slot."""
        if not generation.prompt or len(generation.prompt) >= self.context:
            raise ValueError(f"the prompt has {len(generation.prompt)} tokens; it must have 1 to {self.context - 1}")
        with self.wakeup:
            self.waiting.append(generation)
            self.wakeup.notify()

    def num_active(self):
        return len(self.slots)

    def num_waiting(self):
        return len(self.waiting)

    def run(self):
        """The worker loop: step while there is work, sleep while there is none, until stop()."""
        while True:
            with self.wakeup:
                while not (self.stopped or self.slots or self.waiting):
                    self.wakeup.wait()
                if self.stopped:
                    return
            self.step()

    def stop(self):
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()

    def step(self):
        """Let waiting requests join, give every active row its next token, let finished rows leave, decode."""
        try:
            self.join()
            if not self.slots:
                return
            for slot, token in zip(self.slots, self.sample()):
                forced = len(slot.row.forced_tokens) > 0
                token = slot.row.forced_tokens.popleft() if forced else token
                self.engine.update_row(slot.row, token)
                slot.num_tokens += 1
                if not slot.generation.cancelled:
                    slot.generation.on_token(token, forced)
            for i in reversed(range(len(self.slots))):
                if (reason := self.slots[i].finish_reason()) is not None:
                    self.leave(i, reason)
            self.logits = self.decode() if self.slots else None
        except Exception as e:  # a failed forward (say, out of memory) ends every request in the batch, not the worker
            logger.exception("generation failed")
            for slot in self.slots:
                slot.generation.on_finish(f"error: {type(e).__name__}: {e}")
            self.slots, self.logits = [], None

    def join(self):
        """Prefill waiting requests into free slots (abandoned ones are dropped without running)."""
        while len(self.slots) < self.max_batch:
            with self.wakeup:
                if not self.waiting:
                    return
                generation = self.waiting.popleft()
            if generation.cancelled:
                generation.on_finish("cancelled")
                continue
            row = len(self.slots)
            self.slots.append(Slot(generation, self.engine.device, self.context))
            self.cache.cache_seqlens[row] = 0
            ids = torch.tensor([generation.prompt], dtype=torch.long, device=self.engine.device)
            logits = self.engine.forward_last(ids, self.cache.rows(row, row + 1, pos=0))
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def sample(self):
        """Each active row's next token from its logits, with its own settings and generator."""
        tokens = self.logits.argmax(dim=-1)  # the greedy rows' tokens
        for i, slot in enumerate(self.slots):
            g = slot.generation
            if g.temperature > 0:
                tokens[i] = sample_next_token(self.logits[i:i + 1], slot.rng, g.temperature, g.top_k, g.top_p)[0]
        return tokens.tolist()

    def leave(self, i, reason):
        """Free row i: the last active row moves into it, so active rows stay 0..n-1."""
        slot, last = self.slots[i], len(self.slots) - 1
        if i != last:
            self.cache.copy_row(last, i)
            self.slots[i] = self.slots[last]
        self.slots.pop()
        slot.generation.on_finish(reason)

    def decode(self):
        """Feed every active row its newest token -> (n, V) logits."""
        n = len(self.slots)
        ids = torch.tensor([[slot.row.tokens[-1]] for slot in self.slots], dtype=torch.long, device=self.engine.device)
        longest = max(len(slot.row.tokens) for slot in self.slots) - 1  # tokens cached so far
        if self.engine.compiled_step is None:
            return self.engine.decode(ids, self.cache.rows(0, n, longest))
        # The compiled graph runs every slot: free ones decode a dummy token at position 0 and stay empty.
        ids = torch.cat([ids, ids.new_zeros(self.max_batch - n, 1)])
        logits = self.engine.decode(ids, self.cache.rows(0, self.max_batch, longest))
        self.cache.cache_seqlens[n:] = 0
        return logits[:n]


def fit_conversation(tokenizer, messages, context, max_tokens=None):
    """
    -> (prompt, kept): the token ids of the conversation primed for the assistant's reply, and the messages
    they render. A conversation that outgrew the model's context loses its oldest exchanges (a user message
    and the reply to it; never a leading system message, nor the last message), the fewest that leave the
    reply room for max_tokens tokens, or for a quarter of the context if that is less (an answer has room,
    and most of the context still holds the conversation). Raises ValueError for a conversation the chat
    format cannot render, or whose last message alone (with the system message) leaves no room at all.
    """
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(head):]
    room = min(max_tokens or context, context // 4)

    def render(num_dropped):  # whole exchanges, so the roles still alternate
        kept = head + turns[2 * num_dropped:]
        return tokenizer.render_for_completion({"messages": kept + [{"role": "assistant", "content": ""}]}), kept

    prompt, kept = render(0)
    if len(prompt) + room > context:
        # binary search (a few renderings, whatever the length): dropping `low` exchanges leaves too little room
        low, high = 0, (len(turns) - 1) // 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if len(render(middle)[0]) + room > context else (low, middle)
        prompt, kept = render(high)
    if len(prompt) >= context:
        with_system = " with the system message" if head else ""
        raise ValueError(f"the last message{with_system} is {len(prompt)} tokens but the model's context is {context} "
                         "tokens; send a shorter message")
    return prompt, kept


def call_in_loop(loop, fn, *args):
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


async def generation_events(scheduler, stats, prompt, sampling, stops=()):
    """
    Run one generation on a scheduler (from asyncio) and yield its events as they come: {"token": text}
    (never splitting a character, never showing a stop sequence), then {"finish_reason",
    "completion_tokens"}, or {"error": message}. Leaving early (the client went away) cancels it: its slot
    is free at the next step. stats: the server's counters (requests_total, requests_active, requests_failed,
    tokens_generated), kept up to date.
    """
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    put = functools.partial(call_in_loop, loop, events.put_nowait)
    generation = Generation(prompt, on_token=lambda token, forced: put(token), on_finish=put, **sampling)
    engine = scheduler.engine
    decoder, stop_text, num_tokens = StreamDecoder(engine.tokenizer), StopText(stops), 0
    scheduler.submit(generation)
    stats["requests_total"] += 1
    stats["requests_active"] += 1
    try:
        while isinstance(item := await events.get(), int):  # tokens, until the finish reason
            num_tokens += 1
            if item not in engine.stop_tokens and (text := stop_text.push(decoder.push(item))):
                yield {"token": text}
            if stop_text.stopped:
                break
        if isinstance(item, str) and item.startswith("error"):
            stats["requests_failed"] += 1
            yield {"error": f"generation failed: {item.removeprefix('error: ')}"}
            return
        if not stop_text.stopped and (text := stop_text.push(decoder.flush()) + stop_text.flush()):
            yield {"token": text}
        yield {"finish_reason": "stop" if stop_text.stopped else item, "completion_tokens": num_tokens}
    finally:
        generation.cancel()
        stats["requests_active"] -= 1
        stats["tokens_generated"] += num_tokens


class StopText:
    """
    Cuts streamed text at the first stop sequence it completes (OpenAI's `stop`): push() returns the
    text that is safe to send now, holding back the end that could still become a stop sequence.
    Linear time: each stop sequence is followed by a Knuth-Morris-Pratt matcher that reads every
    character once, so a piece costs its own length (times the number of stops) whatever came before,
    and the text held back is shorter than the longest stop sequence.
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fallbacks = [prefix_function(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop: how many of its first characters the text ends with
        self.held = ""
        self.stopped = False

    def push(self, text):
        if not self.stops:
            return text
        text, start = self.held + text, len(self.held)
        for end, char in enumerate(text[start:], start + 1):
            completed = 0  # the longest stop sequence that ends here
            for i, (stop, fallback) in enumerate(zip(self.stops, self.fallbacks)):
                k = self.matched[i]
                while k and stop[k] != char:
                    k = fallback[k - 1]
                self.matched[i] = k = k + (stop[k] == char)
                if k == len(stop):
                    completed = max(completed, k)
            if completed:
                self.held, self.stopped = "", True
                return text[:end - completed]
        keep = max(self.matched)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self):
        text, self.held = self.held, ""
        return text


def prefix_function(s):
    """p[i]: the length of the longest proper prefix of s[:i+1] that is also its suffix (where KMP falls back to)."""
    p = [0] * len(s)
    for i in range(1, len(s)):
        k = p[i - 1]
        while k and s[i] != s[k]:
            k = p[k - 1]
        p[i] = k + (s[i] == s[k])
    return p


class GuardedH11Protocol(H11Protocol):
    """
    uvicorn's HTTP/1.1 protocol with two guards against clients that hold connections open without
    sending requests (each costs a file descriptor, and a server out of them refuses everyone):
    - a connection whose request head has not fully arrived header_timeout seconds after it opened (or
      after its previous response) is closed;
    - past max_connections open connections, the one that has waited longest for a request head (a
      slow or idle client) is closed to make room; a request in progress is never dropped.
    Use it as uvicorn.Config(http=GuardedH11Protocol.with_limits(...)).
    """

    def __init__(self, *args, header_timeout, max_connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.head_deadline = self.head_cycle = self.head_since = None

    @classmethod
    def with_limits(cls, header_timeout, max_connections):
        return functools.partial(cls, header_timeout=header_timeout, max_connections=max_connections)

    def connection_made(self, transport):
        super().connection_made(transport)
        self.await_request_head()
        if len(self.connections) > self.max_connections:
            waiting = [c for c in self.connections if c.awaiting_head() and not c.transport.is_closing()]
            min(waiting, key=lambda c: c.head_since).transport.close()  # (this new one, if no other waits)

    def await_request_head(self):
        if self.head_deadline is not None:
            self.head_deadline.cancel()
        self.head_cycle, self.head_since = self.cycle, self.loop.time()  # a new request head sets a new self.cycle
        self.head_deadline = self.loop.call_later(self.header_timeout, self.head_timed_out)

    def awaiting_head(self):
        return self.head_deadline is not None and self.cycle is self.head_cycle

    def head_timed_out(self):
        if self.awaiting_head() and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        self.await_request_head()  # the next request on a kept-alive connection

    def connection_lost(self, exc):
        if self.head_deadline is not None:
            self.head_deadline.cancel()
        super().connection_lost(exc)
