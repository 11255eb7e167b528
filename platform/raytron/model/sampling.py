"""Next-token choice per sequence: greedy, temperature, top-k, top-p, each with its own seed, after
OpenAI's and vLLM's logit adjustments.

Every row carries its own parameters and its own ``torch.Generator``, so a request samples
the same tokens whether it runs alone or inside a full batch.

The adjustments, in this order, on the model's logits of one sequence (``adjusted_logits``):
``logit_bias`` is added; ``repetition_penalty`` divides the positive and multiplies the negative
logits of tokens in the prompt or the output (CTRL, as vLLM does); ``frequency_penalty`` times a
token's count in the output and ``presence_penalty`` once if it occurs there are subtracted
(OpenAI's definition); while fewer than ``min_tokens`` are generated, the end tokens (EOS and
``stop_token_ids``) are impossible. Temperature, top-k and top-p then act on the result; greedy
takes its argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token the output already holds (OpenAI's)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output holds it (OpenAI's)."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output: positive logits divided by it, negative ones multiplied
    (vLLM's); 1 leaves them."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (OpenAI's logit_bias)."""
    min_tokens: int = 0
    """EOS and stop_token_ids are impossible until this many tokens are generated (vLLM's)."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop at any of these tokens as at EOS; the token is not part of the output (vLLM's)."""
    ignore_eos: bool = False
    """Generate on past EOS, until max_new_tokens or a stop (vLLM's)."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def end_ids(self, eos_id: int | None) -> set[int]:
        """Tokens that end the sequence: EOS (unless ignored) and stop_token_ids."""
        ends = set(self.stop_token_ids)
        if eos_id is not None and not self.ignore_eos:
            ends.add(eos_id)
        return ends

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


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int],
                    eos_id: int | None) -> torch.Tensor:
    """One row of logits (V,) -> the row after logit_bias, the penalties and min_tokens (module
    docstring), as a new tensor."""
    logits = logits.float().clone()  # (V,)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(biases)
    if params.repetition_penalty != 1.0:
        seen = sorted(set(prompt) | set(output))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=logits.numel()).float()  # (V,)
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    if len(output) < params.min_tokens:
        logits[sorted(params.end_ids(eos_id))] = float("-inf")
    return logits


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  histories: list[tuple[Sequence[int], Sequence[int]]] | None = None,
                  eos_id: int | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), each row by its own params and generator; ``histories``
    (each row's prompt and output so far) and ``eos_id`` feed the adjustments of ``adjusted_logits``."""
    # sampled on the CPU whatever the model's device: the per-request generators are CPU ones,
    # and a seed then gives the same tokens for the same logits on any device
    logits = logits.float().cpu()  # (B, V)
    choices = logits.argmax(-1)  # (B,) greedy default
    for row, (p, generator) in enumerate(zip(params, generators)):
        row_logits = logits[row]  # (V,)
        if p.adjusts_logits:
            if histories is None:
                raise ValueError("choose_tokens: penalties, logit_bias and min_tokens need the histories")
            row_logits = adjusted_logits(row_logits, p, *histories[row], eos_id)
        if p.temperature == 0:
            choices[row] = row_logits.argmax()
            continue
        probs = filter_logits(row_logits, p.temperature, p.top_k, p.top_p).softmax(-1)
        choices[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return choices
