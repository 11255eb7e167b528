"""Linear warmup then cosine decay to min_lr, as a multiplier of the peak lr per optimizer step."""

from __future__ import annotations

import math

from raytron.config import TrainConfig


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Factor applied to train.lr for optimizer step ``step`` (0-based)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = train.min_lr / train.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
