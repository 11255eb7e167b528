"""Rotary position embedding in the 'rotate half' layout (the one Hugging Face Llama uses), with
the frequency scalings Hugging Face checkpoints ask for (``linear``, ``llama3``)."""

from __future__ import annotations

import math

import torch

from raytron.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in fp32, scaled as transformers' rope_type does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than the old context / low_freq_factor are divided by factor, those
    # shorter than old context / high_freq_factor kept, the band between interpolated smoothly
    old_context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelength >= old_context / scaling.high_freq_factor) & (wavelength <= old_context / scaling.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, hd); frequencies computed in fp32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # (hd/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd) rotated by cos/sin (B, T, hd)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
