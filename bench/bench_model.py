"""Our TP=1 GPT vs `transformers` GPT2LMHeadModel, side by side in one process.

Both models hold the same weights (ours exported with raytron.export and loaded by
AutoModelForCausalLM, attention through SDPA), see the same tokens and run on the same
torch threads. Repetitions alternate A/B, B/A, ... so drift (turbo, other load) hits both alike;
the table shows median and best tokens/s and the ratio ours / transformers (goal >= 1.0).

    .venv/bin/python bench/bench_model.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from raytron.config import ModelConfig
from raytron.export import export_huggingface
from raytron.model.generation import generate
from raytron.model.gpt import GPT, build_model
from raytron.model.sampling import SamplingParams

CONFIG = ModelConfig(flavour="gpt", vocab_size=8192, hidden_size=384, num_layers=4, num_heads=6,
                     max_position_embeddings=512)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(runs: dict[str, Callable[[], None]], warmup: int, rounds: int,
                clock: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds of every call of each run, calls alternating between runs round by round
    (order reversed every other round, so going first or second favours neither)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        order = list(runs.items())
        for name, run in order[::-1] if round_index % 2 else order:
            start = clock()
            run()
            seconds[name].append(clock() - start)
    return seconds


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
               tokens: torch.Tensor) -> Callable[[], None]:
    """Forward + loss + backward on tokens (B, T+1); the same loss code for both models."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits = forward(inputs)  # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        model.zero_grad(set_to_none=True)
    return step


def decode(ours: GPT, theirs: torch.nn.Module, prompts: torch.Tensor,
           new_tokens: int) -> dict[str, Callable[[], None]]:
    """Greedy decoding of prompts (B, P) for exactly new_tokens tokens (no EOS) by each model."""
    padded_rows = list(range(CONFIG.vocab_size, ours.padded_vocab))
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    return {
        "raytron": lambda: generate(ours, prompts.tolist(), greedy),
        "transformers": lambda: theirs.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0, suppress_tokens=padded_rows),
    }


def report(title: str, tokens: int, seconds: dict[str, list[float]]) -> float:
    """Print median and best tokens/s per model and return the ratio ours/HF.

    The ratio is the median over rounds of each round's own ratio: the two calls of a
    round run back to back, so load from other processes mostly hits both of them.
    The best round is printed too: on a shared machine it is the least disturbed one."""
    median = {name: tokens / statistics.median(times) for name, times in seconds.items()}
    best = {name: tokens / min(times) for name, times in seconds.items()}
    for name in seconds:
        print(f"{title:<30} {name:<14} {median[name]:>10,.0f} {best[name]:>10,.0f}")
    ratio = statistics.median(hf / ours for ours, hf in zip(seconds["raytron"], seconds["transformers"]))
    print(f"{title:<30} {'ratio ours/HF':<14} {ratio:>9.2f}x {best['raytron'] / best['transformers']:>9.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="'cpu' counts this process's CPU time: with --threads 1 other processes do not "
                             "change it (with more threads it counts OpenMP spin-waits too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    data = torch.Generator().manual_seed(0)

    ours = build_model(CONFIG, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        export_huggingface(ours, folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    print(f"model: {CONFIG.flavour} h={CONFIG.hidden_size} L={CONFIG.num_layers} heads={CONFIG.num_heads} "
          f"vocab={ours.padded_vocab}, fp32, torch threads={torch.get_num_threads()}, HF attention=sdpa, "
          f"{args.clock} clock")
    # other processes on the same cores distort every figure; the load average says whether they ran
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    print(f"{'':<30} {'':<14} {'median':>10} {'best':>10}  (tokens/s)")
    ours.train(), theirs.train()  # dropout is 0 in both; train mode is what training runs
    tokens = torch.randint(0, CONFIG.vocab_size, (args.batch, args.seq_len + 1), generator=data)
    seconds = interleaved({"raytron": train_step(ours, ours, tokens),
                           "transformers": train_step(lambda x: theirs(x).logits, theirs, tokens)},
                          warmup=2, rounds=args.rounds, clock=clock)
    ratios = {"train": report(f"fwd+bwd B={args.batch} T={args.seq_len}", args.batch * args.seq_len, seconds)}

    ours.eval(), theirs.eval()
    for batch in (1, args.batch):
        prompts = torch.randint(0, CONFIG.vocab_size, (batch, args.prompt_len), generator=data)
        seconds = interleaved(decode(ours, theirs, prompts, args.new_tokens), warmup=1, rounds=args.rounds,
                              clock=clock)
        ratios[f"decode B={batch}"] = report(f"decode B={batch} P={args.prompt_len} N={args.new_tokens}",
                                             batch * args.new_tokens, seconds)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print("ratios ours/HF: " + ", ".join(f"{name} {r:.2f}x" for name, r in ratios.items()))


if __name__ == "__main__":
    main()
