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

A request may ask for log-probabilities (``serve/logprobs.py``): of each generated token and its
top alternatives, and with ``echo`` of its prompt's tokens, scored in the prefill that also fills
its cache (requests that echo prefill together, apart from those that do not, which keep the
cheaper last-position logits). A request without sampling parameters only scores its prompt.
A token's log-probabilities travel with its text: held back while its text is, and dropped with
it after a stop string's cut, so a choice's logprobs describe its text, streamed or not.

The model runs in a one-thread executor: the event loop stays free to accept requests and
stream tokens while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, AsyncIterator, Callable

import torch

from raytron.model.generation import Completion, SequenceState, decode_step, mask_padded_vocab, prefill
from raytron.model.gpt import GPT
from raytron.model.sampling import SamplingParams, choose_tokens
from raytron.serve.logprobs import TokenLogprob, chosen_logprobs, log_softmax, prefill_scoring

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
    logprobs: tuple[TokenLogprob, ...] = ()
    """Of the tokens not sent before whose text starts in the text sent so far (when asked for):
    held back with their text; at the end, with a stop string cut, those that start before the cut."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """Of the prompt's tokens, on the first delta (with echo)."""


SCORING_ONLY = SamplingParams(max_new_tokens=1, temperature=0)
"""The state of a request that only scores its prompt: it reserves one token and generates none."""


class _Request:
    def __init__(self, prompt: list[int], params: SamplingParams | None, interval_s: float,
                 logprobs: int | None = None, echo: bool = False):
        self.prompt = prompt
        self.interval_s = interval_s
        self.scoring_only = params is None
        self.top_logprobs = logprobs
        """Top alternatives per generated token (0: the chosen token's only); None: no logprobs."""
        self.echo = echo
        self.token_logprobs: list[TokenLogprob] = []
        self.token_starts: list[tuple[int, int]] = []
        """Per entry of ``token_logprobs``: the length of the text before its token, and how many
        U+FFFD end that text (see ``_token_start``)."""
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.logprobs_sent = 0
        params = SCORING_ONLY if params is None else params
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
        logprobs = self._logprobs_to_send()
        prompt_logprobs = self.prompt_logprobs
        self.prompt_logprobs = None  # handed over once
        return Delta(new, len(state.tokens), finish, logprobs, None if prompt_logprobs is None else tuple(prompt_logprobs))

    def _logprobs_to_send(self) -> tuple[TokenLogprob, ...]:
        """The scored tokens not sent yet whose text starts within the text sent so far (``sent``
        never shrinks, so none of them can fall after a stop string's start later). At the end, after
        a stop string cut, those that start before the cut; otherwise all of them (zero-width tokens
        at the very end included)."""
        done = self.state.done
        if done is None:
            bound = len(self.sent)
        elif len(done.text or "") < len(self.state.text or ""):  # a stop string cut the text
            bound = len(done.text)
        else:
            bound = math.inf
        text, end = self.state.text or "", self.logprobs_sent
        while end < len(self.token_logprobs) and _token_start(text, *self.token_starts[end]) < bound:
            end += 1
        logprobs = tuple(self.token_logprobs[self.logprobs_sent:end])
        self.logprobs_sent = end
        return logprobs


def _token_start(text: str, before: int, unfinished: int) -> int:
    """Where a token starts in ``text``, the text so far, given the length of the text before it and
    the U+FFFD that ended that text: still there, they were bytes that make no character and the
    token starts after them; gone, the token finished the character they stood for, which starts
    at the first of them."""
    return before if text[before - unfinished:before] == UNFINISHED_BYTES * unfinished else before - unfinished


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """``text`` without an unfinished character at its end and without an ending that could
    still grow into a stop string."""
    text = text.rstrip(UNFINISHED_BYTES)
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[:len(text) - held]


class Engine:
    def __init__(self, model: GPT, eos_id: int | None, decode: Callable[[list[int]], str], limits: EngineLimits,
                 metrics: ServeMetrics | None = None, vocab_size: int | None = None,
                 end_ids: frozenset[int] = frozenset()):
        if limits.context > model.cfg.max_position_embeddings:
            raise ValueError(f"limits.context: {limits.context} exceeds the model's max_position_embeddings "
                             f"({model.cfg.max_position_embeddings})")
        self.model = model.eval()
        self.vocab_size = min(vocab_size or model.cfg.vocab_size, model.cfg.vocab_size)
        """The true vocabulary (the tokenizer's): log-probabilities are over these tokens only."""
        self.eos_id = eos_id
        self.end_ids = end_ids - {eos_id}
        """Further ids that end generation as EOS does (the EOS set, the chat's end-of-turn token)."""
        self.decode = decode
        self.limits = limits
        self.metrics = metrics
        self.cache = model.new_cache(limits.max_batch_size, limits.context)
        self.free_slots = deque(range(limits.max_batch_size))
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.steps = 0
        """Iterations run so far (tests and benchmarks read it)."""
        self.batch_steps: Counter[int] = Counter()
        """Steps run, by the number of sequences in them (prefilled + decoded): a record of how full
        the batch was that outlives the moment, so a reader need not catch it mid-request."""
        self.cancelled = 0
        """Requests whose consumer left before they finished (their slots freed unfinished)."""
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

    def stats(self) -> dict[str, int | dict[int, int]]:
        return {"running": len(self.running), "waiting": len(self.waiting), "free_slots": len(self.free_slots),
                "max_batch_size": self.limits.max_batch_size, "steps": self.steps,
                "batch_steps": dict(sorted(self.batch_steps.items())), "cancelled": self.cancelled}

    async def stream(self, prompt: list[int], params: SamplingParams | None, interval_s: float = 0.0,
                     logprobs: int | None = None, echo: bool = False) -> AsyncIterator[Delta]:
        """Queue a request and yield its deltas: each has new text, the last has a finish_reason (and
        maybe no text). After one, the next but the last comes no sooner than ``interval_s`` later (0:
        every step's text once it is final). ``logprobs``: top alternatives per generated token (0:
        the chosen only; None: none); ``echo``: the prompt's log-probabilities in the first delta;
        ``params`` None: only score the prompt. Closing the iterator early (or cancelling its
        consumer) cancels the request."""
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if params is not None and self.end_ids and not params.ignore_eos:
            # as stop token ids they end the sequence like EOS and min_tokens holds them off like EOS
            params = replace(params, stop_token_ids=tuple(sorted(set(params.stop_token_ids) | self.end_ids)))
        request = _Request(prompt, params, interval_s, logprobs, echo)
        self.check(len(prompt), request.state.params.max_new_tokens)
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

    async def complete(self, prompt: list[int], params: SamplingParams | None, logprobs: int | None = None,
                       echo: bool = False) -> Delta:
        """The whole completion as one delta."""
        text, token_logprobs, prompt_logprobs = [], [], None
        async for delta in self.stream(prompt, params, math.inf, logprobs, echo):
            text.append(delta.text)
            token_logprobs += delta.logprobs
            prompt_logprobs = delta.prompt_logprobs if prompt_logprobs is None else prompt_logprobs
        return Delta("".join(text), delta.completion_tokens, delta.finish_reason, tuple(token_logprobs),
                     prompt_logprobs)

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
            self.batch_steps[len(joining) + len(decoding)] += 1
            self._publish(joining + decoding)

    def _drop_cancelled(self) -> None:
        self.cancelled += sum(r.cancelled for r in self.waiting)
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in [r for r in self.running if r.cancelled]:
            self.cancelled += 1
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
        if joining and self.metrics is not None:
            now = time.perf_counter()
            self.metrics.admitted([now - r.submitted for r in joining], sum(len(r.prompt) for r in joining))
        return joining

    @torch.no_grad()
    def _step(self, joining: list[_Request], decoding: list[_Request]) -> None:
        """Runs in the executor thread; touches only the model, the cache and these requests' states."""
        echoing = [r for r in joining if r.echo]
        if echoing:
            slots = torch.tensor([r.slot for r in echoing], device=self.cache.keys.device)  # (E,)
            logits, scored = prefill_scoring(self.model, [r.prompt for r in echoing], self.cache, slots,
                                             self.vocab_size, [r.top_logprobs or 0 for r in echoing])
            for request, entries in zip(echoing, scored):
                request.prompt_logprobs = entries
            self._sample(echoing, logits)
        plain = [r for r in joining if not r.echo]
        if plain:
            slots = torch.tensor([r.slot for r in plain], device=self.cache.keys.device)  # (J,)
            self._sample(plain, prefill(self.model, [r.prompt for r in plain], self.cache, slots))
        if decoding:
            slots = torch.tensor([r.slot for r in decoding], device=self.cache.keys.device)  # (D,)
            # the newest token sits at position - 1: its keys/values go into the cache now
            logits = decode_step(self.model, [r.state.tokens[-1] for r in decoding],
                                 [r.state.position - 1 for r in decoding], self.cache, slots)
            self._sample(decoding, logits)

    def _sample(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """logits (B, V') after each request's newest token -> each request's next token (and its
        log-probabilities when asked for)."""
        for request in [r for r in requests if r.scoring_only]:
            request.state.done = Completion([], "length", "")
        requests = [r for r in requests if not r.scoring_only]
        if not requests:
            return
        logits = mask_padded_vocab(logits, self.vocab_size)  # tokens the tokenizer lacks are never chosen
        states = [r.state for r in requests]
        chosen = choose_tokens(logits, [s.params for s in states], [s.generator for s in states],
                               [(r.prompt, r.state.tokens) for r in requests], self.eos_id).tolist()
        wanted = [row for row, r in enumerate(requests) if r.top_logprobs is not None]
        entries = dict(zip(wanted, chosen_logprobs(
            log_softmax(logits[wanted].cpu(), self.vocab_size), [chosen[row] for row in wanted],
            [requests[row].top_logprobs for row in wanted]))) if wanted else {}
        for row, (request, token) in enumerate(zip(requests, chosen)):
            state = request.state
            before = state.text or ""
            start = (len(before), len(before) - len(before.rstrip(UNFINISHED_BYTES)))  # for _token_start
            # an end token (EOS unless ignored, or a stop token id) finishes the sequence as EOS does
            ends = token in state.params.end_ids(self.eos_id)
            state.accept(token, token if ends else None, self.decode)
            if row in entries and not ends:
                request.token_logprobs.append(entries[row])
                request.token_starts.append(start)

    def _publish(self, stepped: list[_Request]) -> None:
        now = time.perf_counter()
        first_token, inter_token = [], []
        for request in stepped:
            if request.cancelled:
                continue
            if not request.scoring_only:  # a scored prompt generated no token
                (first_token if request.last_token_at is None else inter_token).append(
                    now - (request.last_token_at or request.submitted))
            request.last_token_at = now
            if request.state.done is None and now < request.deliver_at:
                continue
            delta = request.next_delta()
            if delta.text or delta.finish_reason is not None or delta.logprobs or delta.prompt_logprobs:
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
