"""What the training loop needs from whoever launched it: the latest checkpoint and a report call.

``LocalSession`` serves one process or a torchrun-style group sharing a filesystem;
``raytron.train.ray_session.RaySession`` serves Ray Train workers.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

import torch.distributed as dist


class Session(Protocol):
    def latest_checkpoint(self) -> ContextManager[Path | None]:
        """The newest complete checkpoint folder, or None on a fresh start."""

    def publish(self, metrics: dict) -> None:
        """Every step's metrics (cheap: no synchronisation between workers)."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """A synchronising report on log and checkpoint steps; with ``checkpoint`` this rank's
        part of it is persisted."""

    def scratch_dir(self, step: int) -> Path:
        """A folder to write this rank's part of a checkpoint into."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class LocalSession:
    """Checkpoints as numbered folders under ``root``. All ranks write into one partial folder;
    after every rank has finished, rank 0 renames it into place, so a folder named
    ``checkpoint_*`` is always complete."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.history: list[dict] = []

    def _complete(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*"))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        complete = self._complete()
        yield complete[-1] if complete else None

    def scratch_dir(self, step: int) -> Path:
        folder = self.root / f".partial_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        _barrier()
        return folder

    def publish(self, metrics: dict) -> None:
        self.history.append(metrics)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        _barrier()  # every rank's files are written
        if self.rank == 0:
            checkpoint.rename(self.root / f"checkpoint_{int(metrics['step']):08d}")
            for stale in self._complete()[: -self.keep]:
                shutil.rmtree(stale)
        _barrier()
