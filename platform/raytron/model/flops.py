"""Model FLOPs per token and model FLOPs utilisation (MFU).

Counting follows Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training
on GPU Clusters Using Megatron-LM", arXiv 2104.04473, eq. 3): only matmuls count, a
multiply-add is 2 FLOPs, attention is counted over the full sequence (no causal
discount), and backward costs twice the forward. With activation recomputation eq. 3
also counts the extra forward (c = 4 below), as the paper's reported FLOP/s do; PaLM
later called that "hardware FLOPs", and c = 3 the strict model FLOPs.

Forward FLOPs per token, h = hidden, s = seq_len, f = ffn size, V = padded vocab:

    per block   8 h^2          qkv (h x 3h) and output projection (h x h)
              + 4 s h          scores q.k^T and the weighted sum of values
              + 2 h f m        MLP: m = 2 matmuls (gpt: up, down) or 3 (llama: gate, up, down)
    logits      2 h V          final projection onto the vocabulary

Training multiplies the blocks by c = 3 (forward + backward) or c = 4 when activation
recomputation runs each block's forward again in backward; the logits layer is never
recomputed, so it always gets 3.

Reduction to eq. 3 (gpt, f = 4h, so the MLP is 2 h 4h 2 = 16 h^2, block = 24 h^2 + 4 s h):

    c = 4:  4 l (24 h^2 + 4 s h) + 3 (2 h V)
          = 96 l h^2 (1 + s/(6h) + V/(16 l h))          == eq. 3 divided by B s tokens
    c = 3:  72 l h^2 (1 + s/(6h) + V/(12 l h))          (the V term changes with c)
"""

from __future__ import annotations

import torch

from raytron.config import ModelConfig, RaytronConfig

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s.
# Matched as substrings of torch.cuda.get_device_name(); more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
)


def mlp_matmuls(model: ModelConfig) -> int:
    """h x f matmuls per MLP: SwiGLU has gate and up, GELU only up; both have down."""
    return 3 if model.flavour == "llama" else 2


def block_forward_flops(model: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one transformer block."""
    h, f = model.hidden_size, model.ffn_size
    q, k, v = model.qkv_sizes  # each h x h without GQA or an own head size
    projections = 2 * (h * (q + k + v) + q * h)  # qkv + output projection
    attention = 2 * 2 * seq_len * q  # q.k^T and probs.v, full (non-causal) sequence
    mlp = 2 * h * f * mlp_matmuls(model)
    return projections + attention + mlp


def logits_forward_flops(model: ModelConfig, padded_vocab: int) -> int:
    """Forward FLOPs per token of the output projection onto the (padded) vocabulary."""
    return 2 * model.hidden_size * padded_vocab


def training_flops_per_token(model: ModelConfig, seq_len: int, padded_vocab: int, recompute: bool) -> int:
    """Forward + backward (+ recomputed block forward) FLOPs per trained token."""
    block_passes = 4 if recompute else 3
    return (block_passes * model.num_layers * block_forward_flops(model, seq_len)
            + 3 * logits_forward_flops(model, padded_vocab))


def flops_per_token(cfg: RaytronConfig) -> int:
    """Training FLOPs per token of a run, from its model, seq_len, vocab and recomputation."""
    return training_flops_per_token(cfg.model, cfg.train.seq_len, cfg.padded_vocab_size,
                                    cfg.train.activation_checkpointing)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]. ``peak_flops`` is the summed peak of the devices
    that produced ``tokens_per_second`` (per-device peak x device count)."""
    return tokens_per_second * flops_per_token / peak_flops


def peak_bf16_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, by name (default: the current CUDA device);
    None when unknown or when there is no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for marker, flops in PEAK_BF16_FLOPS:
        if marker in device_name:
            return flops
    return None
