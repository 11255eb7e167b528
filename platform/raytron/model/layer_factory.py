"""Where the model gets its matmul layers from.

The model is written once against this interface; ``SerialLayers`` gives plain
PyTorch layers, ``raytron.parallel.TensorParallelLayers`` gives Megatron-style
sharded ones. Everything distribution-specific sits behind these few methods.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LayerFactory(Protocol):
    tp_size: int
    """How many ways heads, MLP width and vocab are split."""

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding: ids (B, T) -> (B, T, dim), replicated output."""

    def column(self, in_features: int, out_features: int, *, bias: bool,
               parts: int | tuple[int, ...] = 1) -> nn.Module:
        """Linear whose output features are split across ranks. ``parts`` segments of the output
        (fused gate|up: a count of equal ones; q|k|v: their sizes) are each split, so a rank holds
        its slice of every part."""

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """Linear whose input features are split across ranks; output is full and replicated."""

    def tied_logits(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """(B, T, h) x embedding (V_local, h) -> logits (B, T, V_local)."""

    def vocab_start(self, local_rows: int) -> int:
        """First vocabulary id of this rank's logits/embedding rows, given how many it holds."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of (possibly vocab-sharded) logits (B, T, V_local) vs targets (B, T)."""

    def masked_loss_sum(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Sum of the token cross-entropies where loss_mask (B, T) is True; the others get no gradient."""

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V_local) -> (B, T, V), for sampling."""

    def sharded_rng(self) -> ContextManager:
        """RNG context for randomness on sharded activations (attention dropout)."""

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Shape of the full (TP=1) tensor this parameter is a shard of."""

    def local_shard(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor."""


def serial_masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of the scored targets: logits (B, T, V), targets and loss_mask (B, T)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*T,)
    return (per_token * loss_mask.flatten().to(per_token.dtype)).sum()


class SerialLayers:
    """Plain single-device layers."""

    tp_size = 1

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def column(self, in_features: int, out_features: int, *, bias: bool,
               parts: int | tuple[int, ...] = 1) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def tied_logits(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, embedding_weight)

    def vocab_start(self, local_rows: int) -> int:
        return 0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def masked_loss_sum(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        return serial_masked_loss_sum(logits, targets, loss_mask)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def sharded_rng(self) -> ContextManager:
        return contextlib.nullcontext()

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def local_shard(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return full
