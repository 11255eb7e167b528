"""Log-probabilities of chosen and top tokens, and of a prompt's own tokens (``echo``).

What the numbers are: log-softmax at temperature 1 of the model's logits over the true
vocabulary (the tokenizer's tokens; rows that pad the embedding are excluded), whatever the
request samples with: they describe the model, not the sampler. A prompt's tokens are scored
batched in prefill: one forward pass gives the logits at every position, and token ``t`` is
scored by the logits after token ``t - 1`` (the first token has none: null).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from raytron.model.generation import mask_padded_vocab
from raytron.model.gpt import GPT
from raytron.model.kv_cache import KVCache


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None
    """None for a prompt's first token (nothing precedes it)."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position, most likely first."""


def log_softmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V') logits -> (..., vocab_size) log-probabilities at temperature 1 over the true vocabulary."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


def chosen_logprobs(logprobs: torch.Tensor, tokens: list[int], top_k: list[int]) -> list[TokenLogprob]:
    """logprobs (B, V) of one step, the token each row chose, and how many top tokens each row wants."""
    widest = max(top_k, default=0)
    values, ids = torch.topk(logprobs, widest, dim=-1) if widest else (None, None)  # each (B, k)
    picked = logprobs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()  # (B,)
    entries = []
    for row, (token, k) in enumerate(zip(tokens, top_k)):
        top = tuple(zip(ids[row, :k].tolist(), values[row, :k].tolist())) if k else ()
        entries.append(TokenLogprob(token, picked[row], top))
    return entries


@torch.no_grad()
def prefill_scoring(model: GPT, prompts: list[list[int]], cache: KVCache, slots: torch.Tensor, vocab_size: int,
                    top_k: list[int]) -> tuple[torch.Tensor, list[list[TokenLogprob]]]:
    """Prefill right-padded ``prompts`` into ``cache`` rows ``slots`` keeping the logits at every
    position: the logits after each prompt's last token (B, V') for sampling, and each prompt's
    token log-probabilities."""
    device = model.embed.tokens.weight.device
    tokens = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True).to(device)  # (B, T) right-padded
    batch, longest = tokens.shape
    positions = torch.arange(longest, device=device).expand(batch, longest)  # (B, T)
    logits = model.layers.gather_logits(model(tokens, positions, cache, slots)).float().cpu()  # (B, T, V')
    logprobs = log_softmax(logits, vocab_size)  # (B, T, V)
    scored = []
    for row, (prompt, k) in enumerate(zip(prompts, top_k)):
        # position t - 1 predicts token t
        entries = chosen_logprobs(logprobs[row, : len(prompt) - 1], prompt[1:], [k] * (len(prompt) - 1))
        scored.append([TokenLogprob(prompt[0], None)] + entries)
    last = logits[torch.arange(batch), torch.tensor([len(p) - 1 for p in prompts])]  # (B, V')
    return mask_padded_vocab(last, model.cfg.vocab_size), scored
