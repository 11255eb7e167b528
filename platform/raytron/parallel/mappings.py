"""Conjugate communication for tensor parallelism (the forward of one is the backward of the other).

copy_to_tp      forward: identity           backward: all-reduce
reduce_from_tp  forward: all-reduce         backward: identity
gather_from_tp  forward: all-gather last    backward: keep own slice
Every function takes its group explicitly and is a no-op for a group of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raytron.parallel.topology import ParallelGroup


def _all_reduce(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    x = x.clone()  # never modify a tensor autograd may have saved
    dist.all_reduce(x, group=group.group)
    return x


def _all_gather_last_dim(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(pieces, x.contiguous(), group=group.group)
    return torch.cat(pieces, dim=-1)


def _own_slice_last_dim(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    return x.chunk(group.size, dim=-1)[group.rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last_dim(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    return x if group.size == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    return x if group.size == 1 else _GatherFromTP.apply(x, group)
