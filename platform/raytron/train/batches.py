"""Per-step micro-batches for one rank: each DP group reads its own slice, its peers get copies.

The first rank of each DP index's group (``topology.data_source``) pulls a global batch of
``micro_batch_size x grad_accum_steps x dp`` blocks, keeps its DP slice, and broadcasts it
to its PP and TP peers, so only data-parallel groups ever see different data. Every DP
group walks the same global order, so each block is used exactly once per epoch, and
``dp=2`` sees the same global batch as ``dp=1``. The position (epoch, batch) is checkpointed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from raytron.config import RaytronConfig
from raytron.parallel.topology import Topology


class BlockSource(Protocol):
    def batches(self, epoch: int, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``rows`` packed blocks in epoch order: {'tokens': (rows, T+1), optional 'id': (rows,)}."""


class ArraySource:
    """Blocks held in memory (single-process runs and tests)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # (N, T+1)

    def batches(self, epoch: int, rows: int) -> Iterator[dict[str, np.ndarray]]:
        ids = np.arange(len(self.tokens))
        for start in range(0, len(self.tokens) - rows + 1, rows):
            yield {"tokens": self.tokens[start:start + rows], "id": ids[start:start + rows]}


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0
    """Global batches already consumed in this epoch."""


class StepBatches:
    def __init__(self, source: BlockSource | None, cfg: RaytronConfig, topology: Topology):
        self.source = source
        self.topology = topology
        self.micro = cfg.train.micro_batch_size
        self.accum = cfg.train.grad_accum_steps
        self.block_len = cfg.train.seq_len + 1
        self.position = DataPosition()
        self.is_reader = topology.data_source.rank == 0
        self.last_ids: list[int] = []
        """Block ids of the last step's DP slice (reader ranks; for audits)."""
        self.wait_seconds = 0.0
        self._iterator: Iterator | None = None

    def seek(self, position: DataPosition) -> None:
        self.position = DataPosition(position.epoch, position.batch)
        self._iterator = None

    def _global_batches(self) -> Iterator[dict[str, np.ndarray]]:
        rows = self.micro * self.accum * self.topology.layout.dp
        while True:
            skip = self.position.batch  # on resume, skip what the checkpoint already consumed
            produced = False
            for index, batch in enumerate(self.source.batches(self.position.epoch, rows)):
                produced = True
                if index >= skip:
                    yield batch
            if not produced:
                raise ValueError(f"training data has fewer than {rows} blocks: one global batch cannot be filled")
            self.position = DataPosition(self.position.epoch + 1, 0)

    def next(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next step: grad_accum tensors of (micro, T+1) token ids."""
        started = time.perf_counter()
        local = torch.empty(self.micro * self.accum, self.block_len, dtype=torch.long)
        if self.is_reader:
            if self._iterator is None:
                self._iterator = self._global_batches()
            batch = next(self._iterator)
            self.position.batch += 1
            rows = slice(self.topology.dp_index * len(local), (self.topology.dp_index + 1) * len(local))
            local.copy_(torch.as_tensor(batch["tokens"][rows]))
            self.last_ids = batch["id"][rows].tolist() if "id" in batch else []
        group = self.topology.data_source
        if group.size > 1:
            dist.broadcast(local, src=group.ranks[0], group=group.group)
        self.wait_seconds = time.perf_counter() - started
        return list(local.split(self.micro))
