"""Log-probability costs of the serving engine, side by side in one process on the same model:

1. prompt scoring: 16 prompts scored by the engine (``echo`` with ``max_tokens`` 0: one prefill batch
   keeping every position's logits, log-softmax over the vocabulary, the chosen token's logprob)
   vs the model's plain forward over the same (16, T) tokens (no cache, no log-softmax).
   Ratio = scoring tokens/s / forward tokens/s (goal >= 0.8).
2. streamed logprobs: 16 concurrent seeded streams of 64 tokens each (interval 0, ignore_eos) with
   ``logprobs=1`` (the chosen token and its best alternative per token, put in the legacy response
   shape as the app does) vs without. Ratio = tokens/s with / without (goal >= 0.9). In process:
   the HTTP path (proxy, JSON) is not in it.

Rounds alternate the two sides (order reversed every other round); the ratio is the median of the
rounds' own ratios.

    .venv/bin/python bench/bench_logprobs.py            # ~2 minutes on 2 shared cores
    .venv/bin/python bench/bench_logprobs.py --rounds 7 --prompt-len 256
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bench_model import CONFIG, interleaved
from raytron.model.gpt import build_model, to_decode_layout
from raytron.model.sampling import SamplingParams
from raytron.serve.engine import Engine, EngineLimits
from raytron.serve.logprob_shapes import legacy_logprobs

BATCH = 16


def print_ratio(title: str, tokens: int, seconds: dict[str, list[float]], ours: str, base: str) -> None:
    for name, times in seconds.items():
        print(f"{title:<18} {name:<16} median {tokens / statistics.median(times):>10,.0f} tok/s  "
              f"best {tokens / min(times):>10,.0f} tok/s")
    ratio = statistics.median(b / o for o, b in zip(seconds[ours], seconds[base]))
    print(f"{title:<18} {'ratio':<16} {ratio:.2f}x  ({ours} / {base}, median of rounds)")


def scoring_runs(engine: Engine, prompts: list[list[int]]):
    tokens = torch.tensor(prompts)  # (B, T)

    async def score():
        await asyncio.gather(*(engine.complete(p, None, logprobs=0, echo=True) for p in prompts))

    @torch.no_grad()
    def forward():
        engine.model(tokens)  # (B, T, V)

    return {"echo scoring": lambda: asyncio.run(score()), "plain forward": forward}


def streaming_runs(engine: Engine, prompts: list[list[int]], new_tokens: int):
    def params(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True)

    async def one(i: int, logprobs: int | None) -> None:
        async for delta in engine.stream(prompts[i], params(i), 0.0, logprobs):
            if logprobs is not None:
                legacy_logprobs(delta.logprobs, str)

    async def all_streams(logprobs: int | None) -> None:
        await asyncio.gather(*(one(i, logprobs) for i in range(len(prompts))))

    return {"logprobs=1": lambda: asyncio.run(all_streams(1)), "no logprobs": lambda: asyncio.run(all_streams(None))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = to_decode_layout(build_model(CONFIG, seed=0)).eval()  # as a CPU replica serves it
    engine = Engine(model, None, lambda ids: "", EngineLimits(BATCH, BATCH * CONFIG.max_position_embeddings,
                                                              CONFIG.max_position_embeddings))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, CONFIG.vocab_size, (BATCH, args.prompt_len), generator=generator).tolist()
    print(f"model {CONFIG.hidden_size}x{CONFIG.num_layers}, vocab {CONFIG.vocab_size}, {args.threads} threads, "
          f"{args.rounds} rounds, {time.strftime('%H:%M:%S')}")
    seconds = interleaved(scoring_runs(engine, prompts), warmup=1, rounds=args.rounds, clock=time.perf_counter)
    print_ratio("prompt scoring", BATCH * args.prompt_len, seconds, "echo scoring", "plain forward")
    short = [p[:32] for p in prompts]
    seconds = interleaved(streaming_runs(engine, short, args.new_tokens), warmup=1, rounds=args.rounds,
                          clock=time.perf_counter)
    print_ratio("streamed", BATCH * args.new_tokens, seconds, "logprobs=1", "no logprobs")
    engine.close()


if __name__ == "__main__":
    main()
