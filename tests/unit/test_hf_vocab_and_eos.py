"""The true vocabulary next to the padded one, and the EOS set that stops generation."""

from __future__ import annotations

import torch

from raytron.config import ModelConfig
from raytron.model.generation import generate
from raytron.model.gpt import build_model
from raytron.model.sampling import SamplingParams

VOCAB = 200


def tiny(flavour: str = "llama", **overrides):
    cfg = ModelConfig(flavour=flavour, vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4,
                      max_position_embeddings=64, **overrides)
    return build_model(cfg, seed=1).eval()


def test_padded_rows_never_score_nor_count_in_the_loss():
    for model in (tiny("gpt"), tiny("llama"), tiny("llama", tie_embeddings=True, num_kv_heads=2)):
        assert model.padded_vocab > VOCAB
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        logits = model(tokens)  # (B, T, V_pad)
        assert torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()
        # the loss is cross-entropy over the true vocabulary only
        expected = torch.nn.functional.cross_entropy(logits[:, :-1, :VOCAB].flatten(0, 1), tokens[:, 1:].flatten())
        loss = model.loss(logits[:, :-1], tokens[:, 1:])
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
        loss.backward()
        head = model.embed.tokens.weight if model.tied else model.head.output.weight
        assert not head.grad[VOCAB:].any()  # padded rows learn nothing


def test_any_token_of_the_eos_set_stops_generation():
    model = tiny()
    prompt = [5, 17, 42]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0].tokens
    stop_at = next(i for i, token in enumerate(free) if token not in free[:i] and i >= 2)
    for eos in ({free[stop_at], VOCAB - 1}, [VOCAB - 1, free[stop_at]], free[stop_at]):
        completion = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0), eos_id=eos)[0]
        assert completion.finish_reason == "stop" and completion.tokens == free[:stop_at], eos
    unrelated = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0),
                         eos_id=[t for t in range(VOCAB) if t not in free][:3])[0]
    assert unrelated.finish_reason == "length" and unrelated.tokens == free
