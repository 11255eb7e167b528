"""A micro-batch's training loss, for pretraining and for supervised fine-tuning.

Pretraining scores every target: the mean token cross-entropy. SFT scores only the targets its
loss mask marks, and the loss of the step must be their sum over the *global* batch divided by
their count, whatever the micro-batch / grad-accumulation / dp split. The engines divide each
micro-batch's loss by grad_accum and average over dp, so a micro-batch's SFT loss is its masked
sum times ``scale`` = grad_accum * dp / global scored count (raytron.parallel.cross_entropy
.micro_batch_loss_scale); then both the gradient and the engines' reported mean are the global
masked mean.
"""

from __future__ import annotations

import torch

from raytron.model.layer_factory import LayerFactory


def micro_batch_loss(layers: LayerFactory, logits: torch.Tensor,
                     labels: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """logits (B, T, V/tp); labels: targets (B, T) (pretraining: mean loss), or SFT's
    (targets (B, T), loss_mask (B, T) bool, scale ()) -> masked sum x scale."""
    if isinstance(labels, torch.Tensor):
        return layers.loss(logits, labels)
    targets, loss_mask, scale = labels
    return layers.masked_loss_sum(logits, targets, loss_mask) * scale
