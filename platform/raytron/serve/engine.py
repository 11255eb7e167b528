"""Continuous batching: an asyncio loop steps one running batch over a slotted KV cache.

Iteration-level scheduling (Orca, OSDI '22): every iteration admits waiting requests while a
KV-cache slot is free and their prompt + max_tokens fits under ``max_tokens_in_flight``
(first come, first served: a large request is not overtaken), prefills them together and
decodes one token for every sequence that was already running. The new ones join the decode
at the next iteration; a sequence that finishes (EOS, stop string, max_tokens) leaves at
once and its slot is free for the next iteration. A consumer that goes away (an HTTP client
disconnecting cancels its stream) marks its request cancelled and the loop frees the slot
before the next step.

A request's new text is handed to its consumer at most once per the interval it asked for (its
first text and its end at once): each delta costs its consumer, and behind an HTTP stream the
Serve proxy and the client, CPU that the model's threads share. A step that hands nothing over
costs nothing beyond the model; its text goes out with the next delta. ``complete`` asks for an
endless interval: its first text and its end.

Each sequence samples with its own parameters and seeded generator and attends only to its
own slot, so a seeded request produces the same text alone or in a full batch.

The model runs in a one-thread executor: the event loop stays free to accept requests and
stream tokens while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

import torch

from raytron.model.generation import SequenceState, decode_step, prefill
from raytron.model.gpt import GPT
from raytron.model.sampling import SamplingParams, choose_tokens

if TYPE_CHECKING:  # the engine itself runs without Ray (benchmarks, tests in one process)
    from raytron.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

UNFINISHED_BYTES = "\ufffd"
"""What a byte-level decoder shows for a character whose bytes are not all generated yet."""


class RequestTooLarge(ValueError):
    """prompt + max_tokens can never fit this engine."""


class EngineFailure(RuntimeError):
    """A step failed; the requests in it end with this error."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    """KV-cache slots: sequences decoded together."""
    max_tokens_in_flight: int
    """Sum over running sequences of prompt + max_tokens."""
    context: int
    """Longest prompt + completion (the cache's length per slot)."""


@dataclass(frozen=True)
class Delta:
    """What one request gained in one step."""

    text: str
    """Text not sent before (held back while it could still become a stop string)."""
    completion_tokens: int
    """Tokens generated so far."""
    finish_reason: str | None = None
    """'stop' or 'length' on the last delta."""


class _Request:
    def __init__(self, prompt: list[int], params: SamplingParams, interval_s: float):
        self.prompt = prompt
        self.interval_s = interval_s
        self.deliver_at = 0.0
        """perf_counter time from which new text is handed over (first text: at once)."""
        self.state = SequenceState(len(prompt), params)
        self.deltas: asyncio.Queue[Delta | EngineFailure] = asyncio.Queue()
        self.slot: int | None = None
        self.cancelled = False
        self.sent = ""
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.state.params.max_new_tokens

    def next_delta(self) -> Delta:
        state = self.state
        if state.done is not None:
            text = state.done.text or ""
        else:
            text = _stable_prefix(state.text or "", state.params.stop)
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += new
        finish = state.done.finish_reason if state.done is not None else None
        return Delta(new, len(state.tokens), finish)


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """``text`` without an unfinished character at its end and without an ending that could
    still grow into a stop string."""
    text = text.rstrip(UNFINISHED_BYTES)
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[:len(text) - held]


class Engine:
    def __init__(self, model: GPT, eos_id: int | None, decode: Callable[[list[int]], str], limits: EngineLimits,
                 metrics: ServeMetrics | None = None):
        if limits.context > model.cfg.max_position_embeddings:
            raise ValueError(f"limits.context: {limits.context} exceeds the model's max_position_embeddings "
                             f"({model.cfg.max_position_embeddings})")
        self.model = model.eval()
        self.eos_id = eos_id
        self.decode = decode
        self.limits = limits
        self.metrics = metrics
        self.cache = model.new_cache(limits.max_batch_size, limits.context)
        self.free_slots = deque(range(limits.max_batch_size))
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.steps = 0
        """Iterations run so far (tests and benchmarks read it)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="raytron-engine")
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestTooLarge when a request could never be scheduled."""
        if prompt_tokens + max_tokens > self.limits.context:
            raise RequestTooLarge(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                                  f"context window of {self.limits.context} tokens")
        if prompt_tokens + max_tokens > self.limits.max_tokens_in_flight:
            raise RequestTooLarge(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                  f"max_tokens_in_flight ({self.limits.max_tokens_in_flight})")

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "free_slots": len(self.free_slots),
                "max_batch_size": self.limits.max_batch_size, "steps": self.steps}

    async def stream(self, prompt: list[int], params: SamplingParams, interval_s: float = 0.0) -> AsyncIterator[Delta]:
        """Queue a request and yield its deltas: each has new text, the last has a finish_reason (and
        maybe no text). After one, the next but the last comes no sooner than ``interval_s`` later (0:
        every step's text once it is final). Closing the iterator early (or cancelling its consumer)
        cancels the request."""
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        self.check(len(prompt), params.max_new_tokens)
        request = _Request(prompt, params, interval_s)
        self._start()
        self.waiting.append(request)
        self._wakeup.set()
        try:
            while True:
                delta = await request.deltas.get()
                if isinstance(delta, EngineFailure):
                    raise delta
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            request.cancelled = True  # harmless once finished; otherwise the loop frees the slot
            self._wakeup.set()

    async def complete(self, prompt: list[int], params: SamplingParams) -> Delta:
        """The whole completion as one delta."""
        text = []
        async for delta in self.stream(prompt, params, math.inf):
            text.append(delta.text)
        return Delta("".join(text), delta.completion_tokens, delta.finish_reason)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="raytron-engine")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.running and not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            decoding = list(self.running)
            joining = self._admit()
            try:
                await loop.run_in_executor(self._executor, self._step, joining, decoding)
            except Exception as error:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail(joining + decoding, EngineFailure(f"generation failed: {error}"))
                continue
            self.steps += 1
            self._publish(joining + decoding)

    def _drop_cancelled(self) -> None:
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in [r for r in self.running if r.cancelled]:
            self._release(request)

    def _admit(self) -> list[_Request]:
        in_flight = sum(r.budget for r in self.running)
        joining = []
        while self.waiting and self.free_slots and in_flight + self.waiting[0].budget <= self.limits.max_tokens_in_flight:
            request = self.waiting.popleft()
            request.slot = self.free_slots.popleft()
            in_flight += request.budget
            joining.append(request)
        self.running += joining
        return joining

    @torch.no_grad()
    def _step(self, joining: list[_Request], decoding: list[_Request]) -> None:
        """Runs in the executor thread; touches only the model, the cache and these requests' states."""
        if joining:
            slots = torch.tensor([r.slot for r in joining], device=self.cache.keys.device)  # (J,)
            self._sample(joining, prefill(self.model, [r.prompt for r in joining], self.cache, slots))
        if decoding:
            slots = torch.tensor([r.slot for r in decoding], device=self.cache.keys.device)  # (D,)
            # the newest token sits at position - 1: its keys/values go into the cache now
            logits = decode_step(self.model, [r.state.tokens[-1] for r in decoding],
                                 [r.state.position - 1 for r in decoding], self.cache, slots)
            self._sample(decoding, logits)

    def _sample(self, requests: list[_Request], logits: torch.Tensor) -> None:
        states = [r.state for r in requests]
        chosen = choose_tokens(logits, [s.params for s in states], [s.generator for s in states]).tolist()
        for state, token in zip(states, chosen):
            state.accept(token, self.eos_id, self.decode)

    def _publish(self, stepped: list[_Request]) -> None:
        now = time.perf_counter()
        first_token, inter_token = [], []
        for request in stepped:
            if request.cancelled:
                continue
            (first_token if request.last_token_at is None else inter_token).append(
                now - (request.last_token_at or request.submitted))
            request.last_token_at = now
            if request.state.done is None and now < request.deliver_at:
                continue
            delta = request.next_delta()
            if delta.text or delta.finish_reason is not None:
                request.deltas.put_nowait(delta)
                request.deliver_at = now + request.interval_s
            if delta.finish_reason is not None:
                self._release(request)
        if self.metrics is not None:
            self.metrics.step(first_token, inter_token, len(self.running))

    def _fail(self, requests: list[_Request], error: EngineFailure) -> None:
        for request in requests:
            request.deltas.put_nowait(error)
            self._release(request)

    def _release(self, request: _Request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.free_slots.append(request.slot)
