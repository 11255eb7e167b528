"""The console's progress line: one per log step, printed by rank 0 only.

    step 40/100  loss 5.2140  lr 3.00e-04  12,345 tok/s  MFU 41.2%  ETA 1m12s

ETA extrapolates the mean step time since the first step this process ran (a resumed run counts from its
checkpoint), so start-up does not count against it.
"""

from __future__ import annotations

import time

PROGRESS_LINE_REGEX = r"\] step \d+/\d+  loss "
"""Matches every progress line (after its ``[run] `` prefix), so Ray's log deduplication can leave them alone."""


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLine:
    def __init__(self, total_steps: int, prefix: str = ""):
        self.total_steps = total_steps
        self.prefix = prefix
        self._first: tuple[int, float] | None = None

    def line(self, metrics: dict, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        step = int(metrics["step"])
        if self._first is None:
            self._first = (step, now)
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
                 f"{metrics['tokens_per_s']:,.0f} tok/s"]
        if "val_loss" in metrics:
            parts.append(f"val_loss {metrics['val_loss']:.4f}")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        first_step, first_time = self._first
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
            parts.append(f"ETA {format_duration(per_step * (self.total_steps - step))}")
        return self.prefix + "  ".join(parts)
