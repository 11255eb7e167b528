"""Test-only fault injection: ``RAYTRON_FAULT=rank:step:marker`` in the driver's environment makes
that rank's worker process die (``os._exit``) after that step, once (the marker file records that
it happened). The driver forwards the variable to the workers with the train loop config."""

from __future__ import annotations

import os
from pathlib import Path


ENV_VAR = "RAYTRON_FAULT"


def maybe_crash(spec: str | None, rank: int, step: int) -> None:
    if not spec:
        return
    crash_rank, crash_step, marker = spec.split(":", 2)
    if rank == int(crash_rank) and step == int(crash_step) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed itself after step {step}\n")
        os._exit(1)
