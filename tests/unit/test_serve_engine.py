"""The continuous-batching engine in one process (no Ray): batch invariance, join/leave, limits,
cancellation and streamed text."""

from __future__ import annotations

import asyncio

import pytest

from raytron.config import ModelConfig
from raytron.model.generation import generate
from raytron.model.gpt import build_model
from raytron.model.sampling import SamplingParams
from raytron.serve.engine import Engine, EngineLimits, RequestTooLarge, _stable_prefix

EOS = 0
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42], [100, 101, 102, 103, 104], [7] * 20, [3, 1, 4, 1, 5]]


def letters(ids: list[int]) -> str:
    """A decoder: token i is one letter, so texts and stop strings are easy to reason about."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=200, hidden_size=48, num_layers=2, num_heads=4, max_position_embeddings=96)
    return build_model(cfg, seed=3)


def engine_for(model, batch: int = 16, in_flight: int = 10_000, context: int = 96) -> Engine:
    return Engine(model, EOS, letters, EngineLimits(batch, in_flight, context))


def params_for(index: int) -> SamplingParams:
    # mixed lengths and a mix of greedy and seeded sampling
    return SamplingParams(max_new_tokens=4 + 3 * (index % 5), temperature=0.0 if index % 3 == 0 else 0.9,
                          top_k=50 if index % 2 else 0, top_p=0.95, seed=1000 + index)


def test_concurrent_seeded_requests_match_one_at_a_time(model):
    requests = [(PROMPTS[i % len(PROMPTS)], params_for(i)) for i in range(16)]

    async def run():
        engine = engine_for(model)
        together = await asyncio.gather(*(engine.complete(p, sp) for p, sp in requests))
        steps_together = engine.steps
        alone = [await engine.complete(p, sp) for p, sp in requests]
        engine.close()
        return together, steps_together, alone

    together, steps_together, alone = asyncio.run(run())
    assert [d.text for d in together] == [d.text for d in alone]
    assert [d.completion_tokens for d in together] == [d.completion_tokens for d in alone]
    # they really ran together: far fewer steps than the sum of their tokens
    assert steps_together <= max(sp.max_new_tokens for _, sp in requests) + 1
    # and the engine agrees with plain generate
    reference = [generate(model, [p], sp, EOS, letters)[0] for p, sp in requests]
    assert [d.text for d in alone] == [c.text for c in reference]


def test_late_requests_join_the_running_batch_and_finished_ones_leave(model):
    async def run():
        engine = engine_for(model, batch=4)
        long = asyncio.create_task(engine.complete(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0)))
        while engine.steps < 5:
            await asyncio.sleep(0)
        seen = engine.stats()
        short = await engine.complete(PROMPTS[1], SamplingParams(max_new_tokens=3, temperature=0))
        during = engine.stats()
        await long
        return seen, short, during, engine.stats(), long.result()

    seen, short, during, after, long = asyncio.run(run())
    assert seen["running"] == 1
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    assert during["running"] == 1 and during["free_slots"] == 3  # the short one left, the long one still runs
    assert long.completion_tokens == 40
    assert {k: after[k] for k in ("running", "waiting", "free_slots", "max_batch_size", "cancelled")} == {
        "running": 0, "waiting": 0, "free_slots": 4, "max_batch_size": 4, "cancelled": 0}
    assert sum(after["batch_steps"].values()) == after["steps"] and max(after["batch_steps"]) == 2


def test_batch_size_and_tokens_in_flight_limit_admission(model):
    async def run(engine, count):
        done = await asyncio.gather(*(engine.complete(PROMPTS[2], SamplingParams(max_new_tokens=10, temperature=0))
                                      for _ in range(count)))
        engine.close()
        return max(engine.stats()["batch_steps"]), done

    largest, done = asyncio.run(run(engine_for(model, batch=3), 7))
    assert largest == 3 and all(d.completion_tokens == 10 for d in done)
    # each request budgets 1 + 10 tokens: 25 tokens in flight admit two at a time
    largest, done = asyncio.run(run(engine_for(model, batch=8, in_flight=25), 5))
    assert largest == 2 and all(d.completion_tokens == 10 for d in done)


def test_closing_a_stream_frees_its_slot(model):
    async def run():
        engine = engine_for(model, batch=2)
        streams = [engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True))
                   for _ in range(2)]
        for stream in streams:
            await stream.__anext__()
        full = engine.stats()
        for stream in streams:
            await stream.aclose()
        # the loop drops them before its next step (the step under way when they closed still counts
        # as a pair); a new pair then runs together
        while engine.stats()["running"]:
            await asyncio.sleep(0)
        before = engine.stats()["batch_steps"].get(2, 0)
        await asyncio.gather(*(engine.complete(PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0))
                               for _ in range(2)))
        return full, engine.stats()["batch_steps"].get(2, 0) - before, engine.stats()

    full, pair_steps, after = asyncio.run(run())
    assert full["free_slots"] == 0
    assert pair_steps >= 1  # with a slot leaked the pair could never run together
    assert after["free_slots"] == 2 and after["running"] == 0 and after["cancelled"] == 2


def test_requests_that_can_never_fit_are_refused(model):
    engine = engine_for(model, in_flight=50, context=40)
    with pytest.raises(RequestTooLarge, match="context window of 40"):
        engine.check(30, 11)
    engine.check(30, 10)
    with pytest.raises(RequestTooLarge, match="max_tokens_in_flight"):
        engine_for(model, in_flight=20, context=40).check(10, 11)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine_for(model, context=97)


def test_streamed_text_holds_back_possible_stop_strings():
    assert _stable_prefix("hello wor", ("world",)) == "hello "
    assert _stable_prefix("hello w", ("xy", "wq")) == "hello "
    assert _stable_prefix("hello", ("world",)) == "hello"
    assert _stable_prefix("caf\ufffd", ()) == "caf"


def test_streamed_deltas_add_up_to_the_completion_and_stop_at_a_stop_string(model):
    prompt = PROMPTS[3]
    reference = generate(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0), EOS, letters)[0].text
    stop = reference[10:13]  # three letters in the middle of the greedy text

    async def run():
        engine = engine_for(model)
        deltas = [d async for d in engine.stream(prompt, SamplingParams(max_new_tokens=30, temperature=0,
                                                                          stop=(stop,)))]
        return deltas

    deltas = asyncio.run(run())
    text = "".join(d.text for d in deltas)
    assert text == reference[:reference.find(stop)]
    assert all(stop not in d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_an_interval_hands_over_the_same_text_in_fewer_deltas(model):
    prompt, params = PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0.9, seed=7)
    reference = generate(model, [prompt], params, EOS, letters)[0]

    async def run(interval_s):
        engine = engine_for(model)
        deltas = [d async for d in engine.stream(prompt, params, interval_s)]
        engine.close()
        return deltas

    every_step, hour = asyncio.run(run(0.0)), asyncio.run(run(3600.0))
    assert "".join(d.text for d in every_step) == "".join(d.text for d in hour) == reference.text
    # one letter per token: with no interval every step hands over its letter; an hour lets only the
    # first text and the end through
    assert len(every_step) == len(reference.tokens) and len(hour) == 2
    for deltas in (every_step, hour):
        assert deltas[-1].finish_reason == reference.finish_reason
        assert deltas[-1].completion_tokens == len(reference.tokens)
