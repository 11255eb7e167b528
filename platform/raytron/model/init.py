"""Megatron initialisation that does not depend on the parallel layout.

Every parameter is drawn in full from its own generator, seeded from the run seed and
the parameter's name, then cut to the local shard. So a serial, a TP=n and a pipelined
model start from identical weights, and parity between layouts needs no weight copying.
The full tensor exists only transiently, one parameter at a time (as Megatron's CPU init).
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch
from torch import nn

from raytron.config import ModelConfig
from raytron.model.layer_factory import LayerFactory

SCALED_OUTPUTS = ("attn.proj.weight", "mlp.down.weight")


def parameter_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def initialize_parameters(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig,
                          seed: int, layers: LayerFactory) -> None:
    """N(0, init_std) weights, output projections N(0, init_std / sqrt(2 L)), zero biases, unit norms;
    nothing with ``cfg.init_from`` (``parallel.hf_import.load_init_from`` fills them).
    ``named_parameters`` use the serial GPT's names (pipeline stages translate theirs)."""
    if cfg.init_from is not None:  # every parameter is overwritten by the import: drawing them is wasted time
        return
    scaled_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, param in named_parameters:
        if name.endswith("bias"):
            param.zero_()
        elif "norm" in name:
            param.fill_(1.0)
        else:
            std = scaled_std if name.endswith(SCALED_OUTPUTS) else cfg.init_std
            full = torch.empty(layers.full_shape(param)).normal_(0.0, std, generator=parameter_generator(seed, name))
            param.copy_(layers.local_shard(param, full))
