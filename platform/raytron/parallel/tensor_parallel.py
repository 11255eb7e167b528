"""The LayerFactory that makes the GPT tensor-parallel over a topology's TP group."""

from __future__ import annotations

from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from raytron.model.layer_factory import serial_masked_loss_sum
from raytron.parallel.cross_entropy import masked_loss_sum, vocab_parallel_cross_entropy
from raytron.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from raytron.parallel.mappings import copy_to_tp, gather_from_tp
from raytron.parallel.rng import ShardedRNG
from raytron.parallel.sharding import shard_of
from raytron.parallel.topology import Topology


class TensorParallelLayers:
    def __init__(self, topology: Topology, seed: int):
        self.group = topology.tensor
        self.tp_size = self.group.size
        self.rng = ShardedRNG(seed, self.group.rank)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, dim, self.group)

    def column(self, in_features: int, out_features: int, *, bias: bool,
               parts: int | tuple[int, ...] = 1) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, self.group, bias=bias, parts=parts)

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.group, bias=bias)

    def tied_logits(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(hidden, self.group), embedding_weight)  # (B, T, V/tp)

    def vocab_start(self, local_rows: int) -> int:
        return self.group.rank * local_rows

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:  # nothing to reduce: torch's fused kernel is about twice as fast
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        vocab_start = self.vocab_start(logits.shape[-1])
        return vocab_parallel_cross_entropy(logits, targets, self.group, vocab_start)

    def masked_loss_sum(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return serial_masked_loss_sum(logits, targets, loss_mask)
        return masked_loss_sum(logits, targets, loss_mask, self.group, self.vocab_start(logits.shape[-1]))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(logits, self.group)

    def sharded_rng(self) -> ContextManager:
        return self.rng()

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        split = getattr(param, "tp_split", None)
        if split is None:
            return tuple(param.shape)
        shape = list(param.shape)
        shape[split[0]] *= self.tp_size
        return tuple(shape)

    def local_shard(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        split = getattr(param, "tp_split", None)
        return full if split is None else shard_of(full, split, self.group.rank, self.tp_size)
