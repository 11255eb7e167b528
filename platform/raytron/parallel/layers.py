"""Megatron-style tensor-parallel layers. Each allocates only its own shard.

Sharded parameters carry ``tp_split = (dim, parts)``: the full tensor is ``parts`` segments
along ``dim`` (gate|up: 2 equal ones; q|k|v: their sizes, k and v smaller under GQA), each cut
into ``tp`` slices, and a rank holds its slice of every segment, concatenated. ``raytron.parallel.sharding`` uses it to move
between full (TP=1) and sharded state dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytron.parallel.mappings import copy_to_tp, reduce_from_tp
from raytron.parallel.sharding import Parts, segment_sizes
from raytron.parallel.topology import ParallelGroup


def _divide(total: int, ways: int, what: str) -> int:
    if total % ways:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({ways})")
    return total // ways


def _sharded(shape: tuple[int, ...], dim: int, parts: Parts = 1) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape))
    param.tp_split = (dim, parts)
    # DeepSpeed's grad-norm counts params without this flag once per TP group, not once per rank
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split: output stays sharded (B, T, out/tp)."""

    def __init__(self, in_features: int, out_features: int, group: ParallelGroup, bias: bool = True,
                 parts: Parts = 1):
        super().__init__()
        self.group = group
        if not isinstance(parts, int):
            parts = tuple(parts)
            if sum(parts) != out_features:
                raise ValueError(f"column-parallel part sizes {parts} do not add up to {out_features} output features")
        local_out = sum(_divide(size, group.size, "column-parallel output features of each part")
                        for size in segment_sizes(parts, out_features))
        self.weight = _sharded((local_out, in_features), 0, parts)
        self.bias = _sharded((local_out,), 0, parts) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split: input is sharded, output summed and full."""

    def __init__(self, in_features: int, out_features: int, group: ParallelGroup, bias: bool = True):
        super().__init__()
        self.group = group
        self.weight = _sharded((out_features, _divide(in_features, group.size, "row-parallel input features")), 1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # replicated, added once after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tp(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with vocabulary rows split; ids outside a rank's range contribute zeros to the sum."""

    def __init__(self, num_embeddings: int, dim: int, group: ParallelGroup):
        super().__init__()
        self.group = group
        rows = _divide(num_embeddings, group.size, "padded vocabulary")
        self.vocab_start = group.rank * rows
        self.weight = _sharded((rows, dim), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start  # (B, T)
        outside = (local < 0) | (local >= self.weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, h)
        return reduce_from_tp(hidden.masked_fill(outside[..., None], 0.0), self.group)
