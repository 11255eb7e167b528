"""TP-consistent randomness.

Dropout on replicated activations (embeddings, block outputs) must draw the same mask on
every TP rank, so it uses the default generator, seeded identically across a TP group.
Randomness on sharded activations (attention-probability dropout over local heads) must
differ per TP rank: it runs inside ``ShardedRNG``, which swaps in a
per-rank generator state and swaps it back out, as Megatron's RNG tracker does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SHARDED_SEED_OFFSET = 2718


def _get_states() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_states(states: tuple) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class ShardedRNG:
    """``state`` is saved and restored with checkpoints."""

    def __init__(self, seed: int, tp_index: int):
        saved = _get_states()
        torch.manual_seed(seed + SHARDED_SEED_OFFSET + tp_index)
        self.state = _get_states()
        _set_states(saved)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        outside = _get_states()
        _set_states(self.state)
        try:
            yield
        finally:
            self.state = _get_states()
            _set_states(outside)
