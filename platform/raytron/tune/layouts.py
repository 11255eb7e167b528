"""``tune.layouts: auto``: a throughput sweep over every valid (dp, pp, tp, micro batch, grad accum) for the
configured worker count at the configured global batch.

A layout is valid when dp x pp x tp is the worker count, micro batch x grad accum x dp is the global batch,
and the config it gives passes the same checks as any run (layers % pp, heads % tp, ffn % tp, ZeRO with pp,
...), plus, when ``resources.memory_per_worker_gb`` is given, the memory estimate of `raytron info` (weights,
grads, optimizer state per rank) fits in it. Each layout runs ``tune.layout_steps`` steps; trials are ranked by
tokens/s.
"""

from __future__ import annotations

from typing import Any

from raytron.config import ConfigError, RaytronConfig
from raytron.model.memory import over_memory_limit
from raytron.tune.space import trial_config

LAYOUT_KEYS = ("parallel.dp", "parallel.pp", "parallel.tp", "train.micro_batch_size", "train.grad_accum_steps")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(workers: int, global_batch: int) -> list[dict[str, int]]:
    """Every (dp, pp, tp, micro, accum) with dp*pp*tp = workers and micro*accum*dp = global batch."""
    layouts = []
    for dp in divisors(workers):
        for pp in divisors(workers // dp):
            tp = workers // dp // pp
            if global_batch % dp:
                continue
            for micro in divisors(global_batch // dp):
                values = (dp, pp, tp, micro, global_batch // dp // micro)
                layouts.append(dict(zip(LAYOUT_KEYS, values)))
    return layouts


def valid_layouts(cfg: RaytronConfig) -> tuple[list[dict[str, int]], list[tuple[dict[str, int], str]]]:
    """(valid layouts, [(invalid layout, why)]) for the config's worker count and global batch."""
    workers = cfg.resources.num_workers or cfg.world_size
    base = {**cfg.to_dict(), "resources": {**cfg.to_dict()["resources"], "num_workers": None}}
    valid, invalid = [], []
    for layout in candidate_layouts(workers, cfg.global_batch_size):
        try:
            trial = trial_config(base, layout, f"layout {layout}")
        except ConfigError as error:
            invalid.append((layout, str(error).split("\n", 1)[-1].strip()))
            continue
        too_big = over_memory_limit(trial)
        if too_big:
            invalid.append((layout, too_big))
            continue
        valid.append(layout)
    return valid, invalid


def layout_sweep(cfg: RaytronConfig) -> tuple[RaytronConfig, list[dict[str, Any]]]:
    """The sweep config of a layout sweep (ranked by tokens/s, every layout run tune.layout_steps steps, no early
    stopping) and its valid layouts; ConfigError when none is valid."""
    valid, invalid = valid_layouts(cfg)
    if not valid:
        reasons = "\n".join(f"  - {layout}: {why}" for layout, why in invalid)
        raise ConfigError(f"tune.layouts: auto: no valid layout for {cfg.resources.num_workers or cfg.world_size} "
                          f"workers at a global batch of {cfg.global_batch_size}:\n{reasons}")
    tune = cfg.tune.model_copy(update={"metric": "tokens_per_s", "mode": "max", "scheduler": "fifo"})
    train = cfg.train.model_copy(update={"steps": cfg.tune.layout_steps})
    return cfg.model_copy(update={"tune": tune, "train": train}), valid
