"""Packed SFT rows in the serial model: a packed row's logits equal each sample's logits run alone
(learned positions and RoPE, GQA), and the masked loss ignores unscored targets (no loss, no gradient)."""

from __future__ import annotations

import pytest
import torch

from raytron.config import ModelConfig
from raytron.model.gpt import build_model
from raytron.model.segments import segment_causal_mask, segment_positions
from raytron.parallel.cross_entropy import micro_batch_loss_scale

LENGTHS = (5, 7, 3)  # three samples packed in a row of 16: 15 tokens and one pad
ROW = 16


def tiny(flavour: str, **overrides) -> ModelConfig:
    return ModelConfig(flavour=flavour, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                       max_position_embeddings=32, **overrides)


def packed_row(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """tokens (1, ROW), segments (1, ROW) (1, 1, ..., 3, 0 on the pad), and the samples alone."""
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, vocab, (length,), generator=generator) for length in LENGTHS]
    pad = ROW - sum(LENGTHS)
    tokens = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((length,), index + 1) for index, length in enumerate(LENGTHS)]
                         + [torch.zeros(pad, dtype=torch.long)])[None]
    return tokens, segments, samples


def test_positions_restart_and_the_mask_is_block_diagonal_causal():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    mask = segment_causal_mask(segments)[0, 0]  # (T, T)
    assert mask[2].tolist() == [True, True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]
    assert mask[6].tolist() == [False, False, False, False, False, True, True]


@pytest.mark.parametrize("flavour,overrides", [("gpt", {}), ("llama", {"num_kv_heads": 2})])
def test_packed_row_logits_equal_each_sample_alone(flavour, overrides):
    cfg = tiny(flavour, **overrides)
    model = build_model(cfg, seed=1).eval()
    tokens, segments, samples = packed_row(cfg.vocab_size)
    with torch.no_grad():
        packed = model(tokens, segments=segments)[0]  # (ROW, V)
        start = 0
        for sample in samples:
            alone = model(sample[None])[0]  # (len, V)
            torch.testing.assert_close(packed[start:start + len(sample)], alone, atol=1e-5, rtol=0)
            start += len(sample)
        # without segments the later samples see the earlier ones: the mask is what separates them
        plain = model(tokens)[0]
        assert not torch.allclose(plain[LENGTHS[0]:sum(LENGTHS)], packed[LENGTHS[0]:sum(LENGTHS)], atol=1e-3)
        # one segment over the whole row is the plain causal model (the fast path agrees with the mask)
        torch.testing.assert_close(model(tokens, segments=torch.ones_like(tokens))[0], plain, atol=1e-5, rtol=0)


def test_unscored_targets_change_neither_loss_nor_gradient():
    """Changing a prompt target token (loss_mask False) leaves the loss and every gradient as they were;
    changing a scored one does not."""
    cfg = tiny("llama")
    model = build_model(cfg, seed=2)
    tokens, segments, _ = packed_row(cfg.vocab_size, seed=3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (1, T)
    loss_mask = torch.zeros_like(targets, dtype=torch.bool)
    loss_mask[0, 2:4] = True  # the first sample's answer
    loss_mask[0, 8:11] = True  # the second's
    scale = torch.tensor(micro_batch_loss_scale(int(loss_mask.sum()), 1, 1))

    def loss_and_grads(targets: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model.loss(model(inputs, segments=segments[:, :-1]), (targets, loss_mask, scale))
        loss.backward()
        return loss.item(), [param.grad.clone() for param in model.parameters()]

    loss, grads = loss_and_grads(targets)
    prompt_changed = targets.clone()
    prompt_changed[0, 0] = (targets[0, 0] + 1) % cfg.vocab_size  # unscored
    same_loss, same_grads = loss_and_grads(prompt_changed)
    assert same_loss == loss
    for grad, same in zip(grads, same_grads):
        assert torch.equal(grad, same)
    answer_changed = targets.clone()
    answer_changed[0, 9] = (targets[0, 9] + 1) % cfg.vocab_size  # scored
    assert loss_and_grads(answer_changed)[0] != loss
    # the masked loss is the mean cross-entropy over the scored targets alone
    logits = model(inputs, segments=segments[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[loss_mask], targets[loss_mask])
    assert loss == pytest.approx(expected.item(), abs=1e-6)
