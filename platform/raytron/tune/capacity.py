"""How many trials a cluster hosts at once, and refusing a sweep it can never host.

Resources are counted twice under Tune with Train V2: each trial is an actor in Tune's placement group,
and its TorchTrainer then asks for a placement group of its own for the workers. The trial actor does
nothing but wait, so it asks for a sliver of a CPU (TRIAL_ACTOR_CPUS); the workers' CPUs and GPUs bound
how many trials run at once, less RAY_DATA_RESERVE_CPUS for the Ray Data tasks that read the shards.
Without that bound, trial actors would take every CPU and every Train placement group would wait forever.
"""

from __future__ import annotations

import math
from typing import Mapping

from raytron.config import RaytronConfig
from raytron.train.cluster import ResourceError, ensure_resources, worker_resources

TRIAL_ACTOR_CPUS = 0.01
RAY_DATA_RESERVE_CPUS = 1.0


def trial_resources(cfg: RaytronConfig) -> dict[str, float]:
    """What one trial's TorchTrainer workers take together."""
    return {name: amount * cfg.world_size for name, amount in worker_resources(cfg).items()}


def require_hostable(configs: list[RaytronConfig]) -> None:
    """Every trial config must fit the cluster alone (needs a connected Ray); the error names the trial's fields."""
    for cfg in configs:
        try:
            ensure_resources(cfg)
        except ResourceError as error:
            point = {key: _value(cfg, key) for key in cfg.tune.search_space}
            raise ResourceError(f"trial point {point}: {error}") from None


def concurrent_trials(configs: list[RaytronConfig], cluster: Mapping[str, float]) -> int:
    """Trials of the largest config that fit side by side, leaving room for Ray Data; at least 1."""
    fits = []
    for cfg in configs:
        room = {**cluster, "CPU": cluster.get("CPU", 0.0) - RAY_DATA_RESERVE_CPUS}
        fits.append(min(math.floor(room.get(name, 0.0) / need) for name, need in trial_resources(cfg).items()
                        if need > 0))
    return max(1, min(fits))


def _value(cfg: RaytronConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node
