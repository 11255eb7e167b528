"""Test-only fault injection: ``RAYTRON_FAULT=rank:step:marker`` makes that rank's process die
(``os._exit``) after that step, once (the marker file records that it happened)."""

from __future__ import annotations

import os
from pathlib import Path


def maybe_crash(rank: int, step: int) -> None:
    spec = os.environ.get("RAYTRON_FAULT")
    if not spec:
        return
    crash_rank, crash_step, marker = spec.split(":", 2)
    if rank == int(crash_rank) and step == int(crash_step) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed itself after step {step}\n")
        os._exit(1)
