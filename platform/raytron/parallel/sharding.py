"""Move between a full (TP=1) state dict and a tensor-parallel model's shards.

Loading full weights into a TP=n model and gathering them back are what parity tests,
export and resharding a checkpoint to another layout are built on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raytron.parallel.topology import ParallelGroup


Parts = int | tuple[int, ...] | list[int]
"""Segments of a fused tensor along its split dim: a count of equal ones, or their full sizes (GQA q|k|v)."""


def segment_sizes(parts: Parts, total: int) -> list[int]:
    """Full sizes of the segments of a tensor ``total`` long along its split dim."""
    return [total // parts] * parts if isinstance(parts, int) else list(parts)


def local_ranges(full: int, split: tuple[int, Parts] | None, dim: int, rank: int, size: int) -> list[tuple[int, int]]:
    """This rank's [start, stop) ranges along ``dim`` of a tensor ``full`` long there: one per segment when
    ``split`` is along ``dim``, else all of it."""
    if split is None or split[0] != dim:
        return [(0, full)]
    ranges, offset = [], 0
    for segment in segment_sizes(split[1], full):
        local = segment // size
        ranges.append((offset + rank * local, offset + (rank + 1) * local))
        offset += segment
    return ranges


def shard_of(full: torch.Tensor, tp_split: tuple[int, Parts], rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a full tensor: its slice of each of the ``parts`` segments along ``dim``."""
    dim, parts = tp_split
    segments = full.split(segment_sizes(parts, full.shape[dim]), dim=dim)
    return torch.cat([segment.chunk(size, dim=dim)[rank] for segment in segments], dim=dim)


def unshard(shards: list[torch.Tensor], tp_split: tuple[int, Parts]) -> torch.Tensor:
    """Inverse of ``shard_of`` given every rank's shard, in rank order."""
    dim, parts = tp_split
    local_sizes = [s // len(shards) for s in segment_sizes(parts, shards[0].shape[dim] * len(shards))]
    per_rank_segments = [shard.split(local_sizes, dim=dim) for shard in shards]
    return torch.cat([torch.cat([segs[p] for segs in per_rank_segments], dim=dim) for p in range(len(local_sizes))],
                     dim=dim)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: ParallelGroup) -> None:
    """Copy a full state dict into a (possibly) tensor-parallel model: each rank keeps its shard."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing}")
    for name, param in params.items():
        split = getattr(param, "tp_split", None)
        source = full[name] if split is None else shard_of(full[name], split, group.rank, group.size)
        if source.shape != param.shape:
            raise ValueError(f"{name}: full tensor {tuple(full[name].shape)} gives shard {tuple(source.shape)}, "
                             f"model expects {tuple(param.shape)}")
        param.copy_(source)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: ParallelGroup,
                           tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All-gather every sharded parameter (or the matching ``tensors``, e.g. grads) into full tensors."""
    full = {}
    for name, param in model.named_parameters():
        value = param if tensors is None else tensors[name]
        split = getattr(param, "tp_split", None)
        if split is None or group.size == 1:
            full[name] = value.detach().clone()
            continue
        shards = [torch.empty_like(value) for _ in range(group.size)]
        dist.all_gather(shards, value.detach().contiguous(), group=group.group)
        full[name] = unshard(shards, split)
    return full
