"""Cross-entropy over vocab-sharded logits without gathering the full vocabulary.

Each rank holds logits for its vocab slice; only per-token scalars (max, sum of exp,
target logit) are all-reduced. The backward is softmax - one_hot on the local slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raytron.parallel.topology import ParallelGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group: ParallelGroup, vocab_start: int):
        # logits (N, V/tp), targets (N,) -> per-token loss (N,)
        logits32 = logits.float()
        row_max = logits32.max(dim=-1).values  # (N,)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group.group)
        shifted = logits32 - row_max[:, None]  # (N, V/tp)

        local_targets = targets - vocab_start
        elsewhere = (local_targets < 0) | (local_targets >= logits.shape[-1])  # target on another rank
        local_targets = local_targets.masked_fill(elsewhere, 0)
        target_logit = shifted.gather(1, local_targets[:, None]).squeeze(1).masked_fill(elsewhere, 0.0)  # (N,)
        dist.all_reduce(target_logit, group=group.group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # (N,)
        dist.all_reduce(sum_exp, group=group.group)

        softmax = exp / sum_exp[:, None]  # (N, V/tp)
        ctx.save_for_backward(softmax, local_targets, elsewhere)
        ctx.input_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, elsewhere = ctx.saved_tensors
        grad = softmax.clone()  # (N, V/tp)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_targets] -= (~elsewhere).float()
        return (grad * grad_loss[:, None]).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: ParallelGroup,
                                 vocab_start: int) -> torch.Tensor:
    """Mean loss of logits (B, T, V/tp) against targets (B, T)."""
    per_token = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), group, vocab_start)
    return per_token.mean()


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, group: ParallelGroup,
                    vocab_start: int) -> torch.Tensor:
    """Sum of the losses of the scored targets: logits (B, T, V/tp), targets and loss_mask (B, T).

    Unscored positions contribute neither loss nor gradient (their upstream gradient is 0), so
    prompt tokens and padding cost nothing; the caller divides by the global batch's scored count."""
    per_token = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), group, vocab_start)  # (B*T,)
    return (per_token * loss_mask.flatten().to(per_token.dtype)).sum()


def micro_batch_loss_scale(global_scored: int, grad_accum: int, dp: int) -> float:
    """Factor for a micro-batch's masked loss sum so that the engine's gradient is
    sum over the global batch's scored tokens / their count, whatever the micro / accum / dp split.

    DeepSpeed divides each micro-batch's loss by grad_accum and averages gradients over the DP ranks,
    i.e. divides by grad_accum * dp; a plain per-micro-batch mean would weight a micro-batch with few
    scored tokens as much as one with many."""
    if global_scored <= 0:
        raise ValueError("the global batch has no scored tokens (every sample's loss_mask is empty)")
    return grad_accum * dp / global_scored
