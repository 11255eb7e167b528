"""Key/value cache with a slot per sequence and per-sequence positions.

Each sequence writes its keys/values at its own positions, so prompts of different
lengths share one batch and sequences can join or leave between decode steps
(continuous batching): attention masks keys beyond each query's position.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, slots, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, slots: torch.Tensor | None, positions: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at ``positions`` (B, T) of ``slots`` (B,) (None: the first B slots)
        and return the first ``length`` cached positions of those slots, each (B, H, length, D)."""
        batch = k.shape[0]
        layer_keys, layer_values = self.keys[layer], self.values[layer]  # (S, H, L, D)
        rows = torch.arange(batch, device=k.device) if slots is None else slots
        # Advanced indices on dims 0 and 2 put (B, T) first: targets are (B, T, H, D).
        layer_keys[rows[:, None], :, positions] = k.transpose(1, 2)
        layer_values[rows[:, None], :, positions] = v.transpose(1, 2)
        if slots is None:
            return layer_keys[:batch, :, :length], layer_values[:batch, :, :length]
        return layer_keys[slots, :, :length], layer_values[slots, :, :length]
