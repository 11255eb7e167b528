"""The DeepSpeed config, derived from raytron's; ``deepspeed_overrides`` is merged last and wins."""

from __future__ import annotations

import copy
from typing import Any

from raytron.config import RaytronConfig


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(cfg: RaytronConfig) -> dict[str, Any]:
    train, parallel = cfg.train, cfg.parallel
    derived = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": cfg.global_batch_size,
        # DeepSpeed 0.19 clips at 1.0 when this key is absent: always say it (0 disables)
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        # our optimizer is torch's AdamW, which ZeRO wraps without a JIT build
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(derived, cfg.deepspeed_overrides)
