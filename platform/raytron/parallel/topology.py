"""The (dp, pp, tp) process layout and its process groups.

Rank order is tp fastest, then dp, then pp: rank = (pp_index * dp + dp_index) * tp + tp_index.
Ray Train numbers workers node by node, so TP groups (the chattiest) stay inside a node.
This matches DeepSpeed's ``PipeModelDataParallelTopology`` axes ('pipe', 'data', 'model').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Pure rank arithmetic for a (dp, pp, tp) layout; no process groups."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """rank -> (dp_index, pp_index, tp_index)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return (rank // self.tp) % self.dp, rank // (self.tp * self.dp), rank % self.tp

    def rank_of(self, dp_index: int, pp_index: int, tp_index: int) -> int:
        return (pp_index * self.dp + dp_index) * self.tp + tp_index

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that must see the same batches: one group per DP index (all its PP and TP peers)."""
        return [[self.rank_of(d, p, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]


@dataclass(frozen=True)
class ParallelGroup:
    """One process group as seen from a member: the group, this rank's index in it, its size."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    layout: Layout
    rank: int
    tensor: ParallelGroup
    data: ParallelGroup
    pipeline: ParallelGroup
    data_source: ParallelGroup
    """This DP index's group (its PP and TP peers): batches are read once and broadcast on it (gloo)."""
    data_host: ParallelGroup
    """The ranks of ``data`` again, on gloo: host-side agreement among the DP readers."""

    @property
    def dp_index(self) -> int:
        return self.layout.coordinates(self.rank)[0]

    @property
    def pp_index(self) -> int:
        return self.layout.coordinates(self.rank)[1]

    @property
    def tp_index(self) -> int:
        return self.layout.coordinates(self.rank)[2]

    @classmethod
    def single(cls) -> "Topology":
        """The one-process topology (no torch.distributed needed)."""
        solo = ParallelGroup(None, 0, 1, (0,))
        return cls(Layout(), 0, solo, solo, solo, solo, solo)

    @classmethod
    def from_world(cls, dp: int, pp: int, tp: int) -> "Topology":
        """Create every process group of the layout; all ranks must call this, in the same order."""
        layout = Layout(dp, pp, tp)
        world = dist.get_world_size()
        if layout.world_size != world:
            raise ValueError(f"parallel layout dp*pp*tp = {dp}*{pp}*{tp} = {layout.world_size} "
                             f"does not match the torch.distributed world size {world}")
        rank = dist.get_rank()
        mine = {}
        # batches are host tensors: their groups use gloo whatever the backend of the world (nccl on GPUs)
        for kind, groups, backend in (("tensor", layout.tp_groups(), None), ("data", layout.dp_groups(), None),
                                      ("pipeline", layout.pp_groups(), None),
                                      ("data_source", layout.data_groups(), "gloo"),
                                      ("data_host", layout.dp_groups(), "gloo")):
            for ranks in groups:
                group = dist.new_group(ranks, backend=backend)  # collective: every rank creates every group
                if rank in ranks:
                    mine[kind] = ParallelGroup(group, ranks.index(rank), len(ranks), tuple(ranks))
        return cls(layout, rank, **mine)
