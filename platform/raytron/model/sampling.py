"""Next-token choice per sequence: greedy, temperature, top-k, top-p, each with its own seed.

Every row carries its own parameters and its own ``torch.Generator``, so a request samples
the same tokens whether it runs alone or inside a full batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    """Generate at most this many tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Per-request seed; None draws from torch's global generator."""
    stop: tuple[str, ...] = ()
    """Stop when the generated text contains one of these strings (text is cut before it)."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row of logits (V,) -> temperature-scaled logits with filtered tokens at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), each row by its own params and generator."""
    # sampled on the CPU whatever the model's device: the per-request generators are CPU ones,
    # and a seed then gives the same tokens for the same logits on any device
    logits = logits.float().cpu()  # (B, V)
    choices = logits.argmax(-1)  # (B,) greedy default
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        probs = filter_logits(logits[row], p.temperature, p.top_k, p.top_p).softmax(-1)
        choices[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return choices
