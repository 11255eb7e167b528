"""What the training loop needs from whoever launched it: the latest checkpoint and a report call.

``LocalSession`` serves a single process (checkpoints in a local folder); ``raytron.train.ray_session.RaySession`` serves Ray Train workers.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import ContextManager, Iterator, Protocol


class Session(Protocol):
    def latest_checkpoint(self) -> ContextManager[Path | None]:
        """The newest complete checkpoint folder, or None on a fresh start."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Publish metrics; when ``checkpoint`` is given this rank's part of it is persisted."""

    def scratch_dir(self, step: int) -> Path:
        """An empty local folder to write this rank's part of a checkpoint into."""


class LocalSession:
    """Checkpoints as numbered folders under ``root`` (a folder is complete once renamed into place)."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep
        self.history: list[dict] = []

    def _complete(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*"))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        complete = self._complete()
        yield complete[-1] if complete else None

    def scratch_dir(self, step: int) -> Path:
        folder = self.root / f".partial_{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.history.append(metrics)
        if checkpoint is None:
            return
        checkpoint.rename(self.root / f"checkpoint_{int(metrics['step']):08d}")
        for stale in self._complete()[: -self.keep]:
            shutil.rmtree(stale)
