"""The masked loss on real gloo ranks: the vocab-parallel sum (tp=2) equals torch's cross-entropy with an
ignore index on the full logits (value and gradient), and sum / global scored count gives the same loss
and gradients as (micro 4, accum 1), (micro 1, accum 4) and dp=2 (gradients averaged over 2 ranks)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from tests.distributed.gloo import run_on_gloo

VOCAB, HIDDEN, BATCH, SEQ = 16, 8, 4, 6


def _problem():
    """A global batch: hidden states (B, T, H), targets (B, T), a ragged loss mask (B, T), a head (V, H)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[0, 4:] = True  # few scored tokens in one sample, many in another: a per-micro mean would differ
    mask[1, 1:] = True
    mask[2, 5:] = True
    mask[3, 2:4] = True
    head = torch.randn(VOCAB, HIDDEN, generator=generator)
    return hidden, targets, mask, head


def _reference():
    hidden, targets, mask, head = _problem()
    head = head.clone().requires_grad_()
    ignored = targets.masked_fill(~mask, -100)
    loss = F.cross_entropy((hidden @ head.T).flatten(0, 1), ignored.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), head.grad


def _split_run(out: str, micro: int, accum: int, dp: int, tp: int) -> None:
    """This rank's share of the global batch through masked_loss_sum * micro_batch_loss_scale, the
    gradient divided by accum and averaged over dp as DeepSpeed does; rank 0 saves loss and gradient."""
    import torch.distributed as dist

    from raytron.parallel.cross_entropy import masked_loss_sum, micro_batch_loss_scale
    from raytron.parallel.topology import Topology

    topology = Topology.from_world(dp, 1, tp)
    hidden, targets, mask, head = _problem()
    rows = VOCAB // tp
    vocab_start = topology.tensor.rank * rows
    local_head = head[vocab_start:vocab_start + rows].clone().requires_grad_()  # (V/tp, H)
    scale = micro_batch_loss_scale(int(mask.sum()), accum, dp)
    share = slice(topology.data.rank * micro * accum, (topology.data.rank + 1) * micro * accum)
    total = torch.zeros(())
    for step in range(accum):
        rows_of_micro = slice(share.start + step * micro, share.start + (step + 1) * micro)
        logits = hidden[rows_of_micro] @ local_head.T  # (micro, T, V/tp)
        loss = masked_loss_sum(logits, targets[rows_of_micro], mask[rows_of_micro], topology.tensor,
                               vocab_start) * scale
        (loss / accum).backward()
        total += loss.detach() / accum
    if dp > 1:
        for value in (local_head.grad, total):
            dist.all_reduce(value, group=topology.data.group)
            value /= dp
    gathered = [torch.empty_like(local_head.grad) for _ in range(tp)]
    dist.all_gather(gathered, local_head.grad, group=topology.tensor.group)
    if dist.get_rank() == 0:
        np.savez(os.path.join(out, f"m{micro}a{accum}d{dp}t{tp}.npz"), loss=total.numpy(),
                 grad=torch.cat(gathered).numpy())


def test_masked_loss_is_the_same_for_every_split(tmp_path):
    loss, grad = _reference()
    for micro, accum, dp, tp in [(4, 1, 1, 2), (1, 4, 1, 2), (2, 1, 2, 1), (1, 2, 2, 1)]:
        run_on_gloo(dp * tp, _split_run, str(tmp_path), micro, accum, dp, tp)
        result = np.load(tmp_path / f"m{micro}a{accum}d{dp}t{tp}.npz")
        np.testing.assert_allclose(result["loss"], loss.numpy(), rtol=1e-5, err_msg=f"{micro=} {accum=} {dp=}")
        np.testing.assert_allclose(result["grad"], grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{micro=} {accum=} {dp=} {tp=}")
