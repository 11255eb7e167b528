"""Packed rows: several samples side by side in one row, told apart by a segment id per token.

A token attends only to earlier tokens of its own segment (a block-diagonal causal mask), and
positions restart at 0 where a segment starts, so each sample is computed as if it were alone
in its row. Padding is a segment of its own (id 0 in the SFT shards), never scored.
"""

from __future__ import annotations

import torch


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """segments (B, T) -> positions (B, T): the index of each token within its run of equal ids."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): a segment begins here
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where the current segment began
    return index - start_index


def segment_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments (B, T) -> attention mask (B, 1, T, T), True where query i may attend to key j:
    j <= i and both tokens in the same segment. Every row keeps its diagonal, so no softmax is empty."""
    length = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    return (same & causal)[:, None]
