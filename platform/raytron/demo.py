"""``make demo``: a minute of training a tiny GPT in one process, then generation.

Builds a real-text corpus from installed Python docstrings under ./.demo/, trains a BPE
tokenizer on it, packs it into ``seq_len + 1`` blocks, trains with AdamW (linear warmup,
cosine decay) until the time budget or the step count runs out, printing the loss as it
falls, and finally completes a few prompts greedily and with seeded sampling.
This single-process path stands in until the Ray Train path lands.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from raytron.config import RaytronConfig, load_config
from raytron.data.corpus import build_docstring_corpus
from raytron.data.tokenizer import pack_documents, save_tokenizer, special_token_ids, train_tokenizer
from raytron.model.generation import generate
from raytron.model.gpt import build_model
from raytron.model.sampling import SamplingParams

WORKDIR = Path(".demo")
CONFIG = Path("jobs/configs/tiny_smoke.yaml")
CORPUS_BYTES = 3_000_000  # stdlib docstrings give ~1.8 MB; the rest comes from site-packages
VOCAB_SIZE = 4096
SEQ_LEN = 128
TIME_BUDGET_S = 60.0
LOG_EVERY_S = 3.0  # by time, not steps: the step rate differs a hundredfold between machines
MAX_STEPS = 2000  # the cosine runs over this; on a slow machine the time budget stops training first
PROMPTS = ["Return the", "This module provides", "Raises ValueError if"]


def read_texts(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def demo_config(vocab_size: int) -> RaytronConfig:
    overrides = [f"model.vocab_size={vocab_size}", f"train.seq_len={SEQ_LEN}", f"train.steps={MAX_STEPS}"]
    if CONFIG.is_file():
        return load_config(CONFIG, overrides)
    # Outside a checkout: the same tiny shape from defaults.
    return load_config(None, overrides + ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4"])


def warmup_cosine(warmup: int, steps: int, min_ratio: float):
    """LR multiplier: linear from 0 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: torch.nn.Module, cfg: RaytronConfig) -> torch.optim.AdamW:
    # Weight decay on matrices (and the embedding) only, not on biases and norm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def train(model: torch.nn.Module, blocks: torch.Tensor, cfg: RaytronConfig) -> None:
    t = cfg.train
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps, t.min_lr / t.lr))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(t.seed))
    model.train()
    start = last_log = time.perf_counter()
    losses_since_log = []
    for step in range(t.steps):
        # one shuffled order, repeated each epoch
        picked = order[(torch.arange(t.micro_batch_size) + step * t.micro_batch_size) % len(blocks)]
        batch = blocks[picked]  # (B, T + 1)
        loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        losses_since_log.append(loss.item())
        now = time.perf_counter()
        out_of_time = now - start > TIME_BUDGET_S
        if step == 0 or now - last_log > LOG_EVERY_S or out_of_time or step == t.steps - 1:
            tokens = len(losses_since_log) * batch[:, 1:].numel()
            # mean over the interval: single-batch losses are too noisy to show the trend
            print(f"step {step:5d}  loss {np.mean(losses_since_log):.3f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{tokens / (now - last_log):6.0f} tokens/s", flush=True)
            last_log, losses_since_log = now, []
        if out_of_time:
            break


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model.loss(model(batch[:, :-1]), batch[:, 1:]).item() for batch in blocks.split(batch_size)]
    return float(np.mean(losses))


def main() -> None:
    started = time.perf_counter()
    corpus = build_docstring_corpus(WORKDIR / "corpus", max_bytes=CORPUS_BYTES, include_site_packages=True)
    texts = read_texts(corpus.paths)
    print(f"corpus: {corpus.documents} docstrings, {corpus.bytes / 1e6:.1f} MB ({time.perf_counter() - started:.1f}s)")

    tokenizer = train_tokenizer(texts, vocab_size=VOCAB_SIZE)
    save_tokenizer(tokenizer, WORKDIR)
    eos = special_token_ids(tokenizer).eos
    token_lists = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    blocks = torch.from_numpy(pack_documents(token_lists, SEQ_LEN, eos)).long()  # (N, T + 1)
    held_out = len(blocks) // 20  # the last 5% of blocks, never trained on
    train_blocks, val_blocks = blocks[:-held_out], blocks[-held_out:]
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; {blocks.numel()} tokens in {len(blocks)} blocks "
          f"of {SEQ_LEN}+1 ({time.perf_counter() - started:.1f}s)")

    cfg = demo_config(tokenizer.get_vocab_size())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg.model, cfg.train.seed)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; training for up to {TIME_BUDGET_S:.0f}s")
    train(model, train_blocks, cfg)
    print(f"held-out loss: {held_out_loss(model, val_blocks, 64):.3f}")

    prompts = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    sampled = [SamplingParams(max_new_tokens=40, temperature=0.8, top_k=50, seed=i) for i in range(len(PROMPTS))]
    for name, params in [("greedy", greedy), ("sampled", sampled)]:
        completions = generate(model, prompts, params, eos_id=eos, decode=tokenizer.decode)
        for prompt, completion in zip(PROMPTS, completions):
            print(f"[{name}] {prompt!r} -> {completion.text!r}")


if __name__ == "__main__":
    main()
