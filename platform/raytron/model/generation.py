"""Batched KV-cache generation for prompts of different lengths.

Prefill runs all prompts right-padded in one forward pass; each sequence keeps its own
position, so padding never enters attention (keys beyond a query's position are masked)
and a prompt gets the same tokens alone or in a batch. Decode then feeds one token per
sequence per step until every sequence has hit EOS, a stop string or its token limit.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from raytron.model.gpt import GPT
from raytron.model.kv_cache import KVCache
from raytron.model.sampling import SamplingParams, choose_tokens


@dataclass
class Completion:
    tokens: list[int]
    """Generated token ids (prompt excluded; EOS excluded)."""
    finish_reason: Literal["stop", "length"]
    """'stop' on EOS (any of the EOS set) or a stop string, 'length' at max_new_tokens."""
    text: str | None = None
    """Decoded text, cut before a stop string (only when a decoder is given)."""


class SequenceState:
    """Progress of one sequence through generation (also the serving engine's per-request state)."""

    def __init__(self, prompt_len: int, params: SamplingParams):
        self.params = params
        self.generator = params.generator()
        self.position = prompt_len  # where the next token goes
        self.tokens: list[int] = []
        self.text: str | None = None
        """Decoded text of ``tokens`` (only when a decoder is given)."""
        self.done: Completion | None = None

    def accept(self, token: int, eos_id: int | Collection[int] | None,
               decode: Callable[[list[int]], str] | None) -> None:
        """``eos_id``: one id or the set (e.g. Llama-3-Instruct ends turns with <|eot_id|>, texts with
        <|end_of_text|>: generation_config.json lists both); any of them ends the sequence."""
        if is_eos(token, eos_id):
            self.done = Completion(self.tokens, "stop", self.text)
            return
        self.tokens.append(token)
        self.position += 1
        self.text = decode(self.tokens) if decode else None
        if self.text is not None and self.params.stop:
            cut = min((self.text.find(s) for s in self.params.stop if s in self.text), default=-1)
            if cut >= 0:
                self.done = Completion(self.tokens, "stop", self.text[:cut])
                return
        if len(self.tokens) >= self.params.max_new_tokens:
            self.done = Completion(self.tokens, "length", self.text)


def is_eos(token: int, eos_id: int | Collection[int] | None) -> bool:
    if eos_id is None:
        return False
    return token == eos_id if isinstance(eos_id, int) else token in eos_id


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Rows added to pad the embedding are never valid tokens."""
    logits[..., vocab_size:] = float("-inf")
    return logits


def prefill(model: GPT, prompts: list[list[int]], cache: KVCache, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Run right-padded ``prompts`` through the model into ``cache`` (rows ``slots``, default the
    first len(prompts)) and return the logits after each prompt's last token, (B, V)."""
    device = model.embed.tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)  # (B, T) right-padded
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    positions = torch.arange(longest, device=device).expand(batch, longest)  # (B, T)
    last_index = torch.tensor([len(p) - 1 for p in prompts], device=device)  # (B,)
    logits = model(tokens, positions, cache, slots, logits_at=last_index)  # (B, 1, V/tp)
    return mask_padded_vocab(model.layers.gather_logits(logits)[:, 0], model.cfg.vocab_size)  # (B, V)


def decode_step(model: GPT, tokens: list[int], positions: list[int], cache: KVCache,
                slots: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per sequence at its own position; logits for the next token, (B, V)."""
    device = model.embed.tokens.weight.device
    step_tokens = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
    step_positions = torch.tensor(positions, device=device)[:, None]  # (B, 1)
    logits = model(step_tokens, step_positions, cache, slots)  # (B, 1, V/tp)
    return mask_padded_vocab(model.layers.gather_logits(logits)[:, -1], model.cfg.vocab_size)  # (B, V)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             eos_id: int | Collection[int] | None = None, decode: Callable[[list[int]], str] | None = None) -> list[Completion]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"params: expected one per prompt ({len(prompts)}), got {len(params)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    max_len = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
    if max_len > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the context window "
                         f"({model.cfg.max_position_embeddings})")
    model.eval()
    sequences = [SequenceState(len(p), sp) for p, sp in zip(prompts, params)]
    cache = model.new_cache(len(prompts), max_len)
    next_logits = prefill(model, prompts, cache)  # (B, V)
    while True:
        chosen = choose_tokens(next_logits, params, [s.generator for s in sequences]).tolist()
        for sequence, token in zip(sequences, chosen):
            if sequence.done is None:
                sequence.accept(token, eos_id, decode)
        if all(s.done is not None for s in sequences):
            return [s.done for s in sequences]
        # finished sequences keep a slot but stay at their position, so their writes stay in bounds
        next_logits = decode_step(model, [s.tokens[-1] if s.tokens else 0 for s in sequences],
                                  [min(s.position - 1, max_len - 1) for s in sequences], cache)
