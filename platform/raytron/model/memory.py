"""Memory per rank for model state: weights + gradients + Adam state.

Bytes per parameter (Rajbhandari et al. 2019, "ZeRO", section 3.1):

    precision      weights  grads  optimizer (Adam)             total
    fp32              4       4     8  (m, v)                     16
    bf16 / fp16       2       2    12  (fp32 master, m, v)        16

ZeRO partitions across the ``dp`` data-parallel ranks: stage 1 the optimizer state,
stage 2 also the gradients, stage 3 also the weights. A partitioned part costs
``ceil(P / dp) x bytes`` per rank, where P is the parameters one rank owns:

    P = (sum of TP-sharded params of its stage) / tp + (sum of replicated params of its stage)

Parameters are counted exactly from the TP=1 model built on the meta device. Stages:
blocks are split evenly (num_layers / pp each), the embedding (tokens + positions) sits
on stage 0, the head (final norm + output) on the last stage; the tied gpt head keeps
its own copy of the token embedding there when pp > 1, as DeepSpeed's TiedLayerSpec does.
TP shards the matmul weights, the column-parallel biases (qkv, up), the token embedding
and the output head; norms, row-parallel biases and the position table are replicated.
Activations, buffers and framework workspace are not included.
"""

from __future__ import annotations

import math

import torch

from raytron.config import RaytronConfig
from raytron.model.gpt import GPT

# (weights, grads, optimizer) bytes per parameter
BYTES_PER_PARAMETER = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}

TP_SHARDED = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.up.weight", "mlp.up.bias",
              "mlp.down.weight", "embed.tokens.weight", "head.output.weight")


def _stage_of(name: str, layers_per_stage: int, pp: int) -> int:
    if name.startswith("embed."):
        return 0
    if name.startswith("head."):
        return pp - 1
    return int(name.split(".")[1]) // layers_per_stage  # blocks.<i>.…


def parameters_per_stage(cfg: RaytronConfig) -> list[int]:
    """Parameters held by one rank of each pipeline stage (after TP sharding)."""
    pp, tp = cfg.parallel.pp, cfg.parallel.tp
    with torch.device("meta"):
        model = GPT(cfg.model, padded_vocab=cfg.padded_vocab_size)
    named = dict(model.named_parameters())
    placed = [(name, _stage_of(name, cfg.model.num_layers // pp, pp)) for name in named]
    if model.tied and pp > 1:
        placed.append(("embed.tokens.weight", pp - 1))  # the last stage's tied copy
    stages = [0] * pp
    for name, stage in placed:
        numel = named[name].numel()
        stages[stage] += numel // tp if name.endswith(TP_SHARDED) else numel
    return stages


def over_memory_limit(cfg: RaytronConfig) -> str | None:
    """Why the busiest rank's estimate does not fit ``resources.memory_per_worker_gb``; None when it fits or no
    limit is given. The estimate leaves activations out (they depend on the batch and on recomputation)."""
    limit = cfg.resources.memory_per_worker_gb
    needed = memory_per_rank_bytes(cfg)[0] / 2**30
    if limit is None or needed <= limit:
        return None
    return (f"needs {needed:.3g} GB per rank for weights, grads and optimizer state (`raytron info`), "
            f"resources.memory_per_worker_gb is {limit:g}")


def memory_per_rank_bytes(cfg: RaytronConfig) -> tuple[int, dict[str, int]]:
    """Bytes of weights + grads + optimizer state on the busiest rank, and its breakdown
    (weights, grads, optimizer, parameters_per_rank, stage)."""
    dp, zero = cfg.parallel.dp, cfg.parallel.zero_stage
    weight_bytes, grad_bytes, optimizer_bytes = BYTES_PER_PARAMETER[cfg.train.precision]
    stages = parameters_per_stage(cfg)
    stage = max(range(len(stages)), key=stages.__getitem__)
    params = stages[stage]
    partitioned = math.ceil(params / dp)
    breakdown = {
        "weights": (partitioned if zero >= 3 else params) * weight_bytes,
        "grads": (partitioned if zero >= 2 else params) * grad_bytes,
        "optimizer": (partitioned if zero >= 1 else params) * optimizer_bytes,
        "parameters_per_rank": params,
        "stage": stage,
    }
    return breakdown["weights"] + breakdown["grads"] + breakdown["optimizer"], breakdown
