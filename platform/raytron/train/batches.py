"""Per-step micro-batches for one rank: each DP group reads its own blocks, its peers get copies.

The first rank of each DP index's group (``topology.data_source``) asks the source for its
DP group's next batch of ``micro_batch_size x grad_accum_steps`` blocks and broadcasts it to its
PP and TP peers, so only data-parallel groups ever see different data. Sources give every DP
group the same number of batches per epoch (or the readers agree to end the epoch when one runs
dry) and never a block to two groups, so each block is used at most once per epoch. The position (epoch, batch) is checkpointed; a source starts an
epoch at any batch (a resume).

SFT batches also carry ``loss_mask`` (which targets are scored) and, for packed rows,
``segments`` (which sample each token belongs to): they travel with the tokens in the same
broadcast. Every rank then learns the global batch's scored count (an all-reduce over the DP
groups) and gives each micro-batch the factor that makes its masked loss sum the global mean's share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from raytron.config import RaytronConfig
from raytron.parallel.cross_entropy import micro_batch_loss_scale
from raytron.parallel.topology import Topology


class BlockSource(Protocol):
    def batches(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> Iterator[dict[str, np.ndarray]]:
        """DP group ``dp_index``'s batches of ``rows`` packed blocks in ``epoch``, from its ``start``-th on:
        {'tokens': (rows, T+1), optional 'id': (rows,), SFT 'loss_mask': (rows, T+1) bool and, packed,
        'segments': (rows, T+1) int}. All groups get the same number of batches."""


def dp_slices(global_batches: Iterator[dict[str, np.ndarray]], start: int, rows: int,
              dp_index: int) -> Iterator[dict[str, np.ndarray]]:
    """For sources with one global order: DP group ``dp_index``'s slice of each global batch of
    ``rows x dp`` blocks, from the ``start``-th on. Any dp then sees the same global batches."""
    for index, batch in enumerate(global_batches):
        if index >= start:
            yield {key: column[dp_index * rows:(dp_index + 1) * rows] for key, column in batch.items()}


class ArraySource:
    """Blocks held in memory, in order (single-process runs and tests)."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray | None = None, segments: np.ndarray | None = None):
        self.tokens = tokens  # (N, T+1)
        self.columns = {"tokens": tokens}
        for name, column in (("loss_mask", loss_mask), ("segments", segments)):
            if column is not None:
                if column.shape != tokens.shape:
                    raise ValueError(f"ArraySource: {name} has shape {column.shape}, tokens {tokens.shape}")
                self.columns[name] = column  # (N, T+1)

    def batches(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> Iterator[dict[str, np.ndarray]]:
        return dp_slices(self._global_batches(rows * dp), start, rows, dp_index)

    def _global_batches(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        ids = np.arange(len(self.tokens))
        for first in range(0, len(self.tokens) - rows + 1, rows):
            yield {**{name: column[first:first + rows] for name, column in self.columns.items()},
                   "id": ids[first:first + rows]}


SFT_COLUMNS = ("loss_mask", "segments")
"""Optional per-token columns of a batch, after 'tokens'."""


@dataclass
class MicroBatch:
    """One micro-batch of this rank: the token blocks and, for SFT, what is scored and how."""

    tokens: torch.Tensor
    """(mb, T+1) ids."""
    loss_mask: torch.Tensor | None = None
    """(mb, T+1) bool, SFT: whether token i is a scored target."""
    segments: torch.Tensor | None = None
    """(mb, T+1), packed SFT rows: which sample each token belongs to."""
    loss_scale: float | None = None
    """SFT: grad_accum * dp / the global batch's scored count (micro_batch_loss_scale)."""


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0
    """Global batches already consumed in this epoch."""


class StepBatches:
    def __init__(self, source: BlockSource | None, cfg: RaytronConfig, topology: Topology, split: str = "training"):
        self.source = source
        self.split = split
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
        self._columns: tuple[str, ...] | None = None

    def seek(self, position: DataPosition) -> None:
        self.position = DataPosition(position.epoch, position.batch)
        self._iterator = None

    def _readers_all_have(self, have: bool) -> bool:
        """Whether every DP reader holds a batch. The readers (PP and TP rank 0 of each DP index) form
        one data-parallel group; a streaming source can run dry in one group before the others, and
        then every group must start the next epoch together."""
        group = self.topology.data_host
        if group.size == 1:
            return have
        flag = torch.tensor([int(have)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.group)
        return bool(flag.item())

    def _next_local_batch(self) -> dict[str, np.ndarray]:
        rows = self.micro * self.accum
        while True:
            if self._iterator is None:
                self._iterator = iter(self.source.batches(self.position.epoch, self.position.batch, rows,
                                                          self.topology.dp_index, self.topology.layout.dp))
            batch = next(self._iterator, None)
            if self._readers_all_have(batch is not None):
                self.position.batch += 1
                return batch
            if self.position.batch == 0:
                raise ValueError(f"the {self.split} data has fewer than {rows * self.topology.layout.dp} blocks: "
                                 "one global batch cannot be filled")
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._iterator = None

    def _agree_columns(self, batch: dict[str, np.ndarray] | None) -> tuple[str, ...]:
        """The columns the reader's batches carry ('tokens' and any SFT ones), told to its peers once."""
        if self._columns is None:
            present = torch.tensor([int(batch is not None and name in batch) for name in SFT_COLUMNS])
            group = self.topology.data_source
            if group.size > 1:
                dist.broadcast(present, src=group.ranks[0], group=group.group)
            self._columns = ("tokens",) + tuple(name for name, flag in zip(SFT_COLUMNS, present.tolist()) if flag)
        return self._columns

    def _loss_scale(self, loss_mask: torch.Tensor) -> float:
        """micro_batch_loss_scale from the global batch's scored targets (every DP group's, summed)."""
        scored = loss_mask[:, 1:].sum()  # this DP group's scored targets
        group = self.topology.data_host
        if group.size > 1:
            dist.all_reduce(scored, group=group.group)
        return micro_batch_loss_scale(int(scored), self.accum, self.topology.layout.dp)

    def next(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next step: grad_accum of (micro, T+1) token ids and SFT columns."""
        started = time.perf_counter()
        batch = self._next_local_batch() if self.is_reader else None
        columns = self._agree_columns(batch)
        local = torch.empty(len(columns), self.micro * self.accum, self.block_len, dtype=torch.long)  # (C, rows, T+1)
        if batch is not None:
            for index, name in enumerate(columns):
                # numpy copies into the tensor's memory: torch.as_tensor of a read-only Arrow-backed array warns
                local[index].numpy()[...] = batch[name]
            self.last_ids = batch["id"].tolist() if "id" in batch else []
        group = self.topology.data_source
        if group.size > 1:
            dist.broadcast(local, src=group.ranks[0], group=group.group)
        step = dict(zip(columns, local))  # name -> (rows, T+1)
        scale = None
        if "loss_mask" in step:
            step["loss_mask"] = step["loss_mask"].bool()
            scale = self._loss_scale(step["loss_mask"])
        self.wait_seconds = time.perf_counter() - started
        parts = {name: column.split(self.micro) for name, column in step.items()}  # name -> accum x (micro, T+1)
        return [MicroBatch(**{name: split[index] for name, split in parts.items()}, loss_scale=scale)
                for index in range(self.accum)]
