"""The training session of a Ray Train worker: checkpoints through ray.train, metrics to MLflow on rank 0."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import ray.train

from raytron.train.batches import dp_slices
from raytron.train.fault_injection import maybe_crash


class RayDatasetSource:
    """Blocks from a Ray Dataset given whole to every DP reader, in dataset order (column 'tokens', optional 'id')."""

    def __init__(self, dataset):
        self.dataset = dataset

    def batches(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> Iterator[dict[str, np.ndarray]]:
        global_batches = self.dataset.iter_batches(batch_size=rows * dp, batch_format="numpy", drop_last=True)
        return dp_slices(global_batches, start, rows, dp_index)


class RaySession:
    def __init__(self, rank: int, log_metrics: Callable[[dict, int], None] | None = None,
                 fault: str | None = None):
        self.rank = rank
        self.log_metrics = log_metrics
        self.fault = fault

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def scratch_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"raytron-step{step}-rank{self.rank}-"))

    def publish(self, metrics: dict) -> None:
        step = int(metrics["step"])
        if self.log_metrics is not None:
            self.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        maybe_crash(self.fault, self.rank, step)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        # Train V2's controller collects one report per worker per poll (every ~2 s): reporting
        # every step would pace training at the poll interval, so the loop reports sparingly.
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=f"checkpoint_{int(metrics['step']):08d}",
                             delete_local_checkpoint_after_upload=True)
