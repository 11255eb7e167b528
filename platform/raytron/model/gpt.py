"""GPT decoder in two flavours, built from a LayerFactory.

``gpt``: MT-NLG / GPT-3 — learned absolute positions, pre-LayerNorm, GELU MLP, biases,
tied input/output embedding. ``llama``: RoPE (optionally scaled), RMSNorm, SwiGLU, no biases
(or q/k/v biases, as Qwen2), untied head. Either can tie or untie its head; attention may
group query heads over fewer key/value heads (GQA) and have a head width of its own.

The model is split into ``Embedding``, ``Block`` and ``Head`` so pipeline stages can be
cut between blocks. With ``SerialLayers`` it is plain PyTorch; with tensor-parallel layers
each rank holds ``num_heads / tp`` heads and a ``1 / tp`` slice of the MLP and vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raytron.config import ModelConfig
from raytron.model.init import initialize_parameters
from raytron.model.kv_cache import KVCache
from raytron.model.layer_factory import LayerFactory, SerialLayers
from raytron.model.loss import micro_batch_loss
from raytron.model.rope import apply_rope, rope_cos_sin
from raytron.model.segments import segment_causal_mask, segment_positions


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.flavour == "gpt":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)


def mask_padded_rows(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Logits (B, T, V_local) of this rank's vocab slice from ``vocab_start``: the rows that only pad
    the embedding (ids >= vocab_size) get -inf, so they never win sampling and the loss's softmax
    leaves them out (their gradient is zero)."""
    limit = vocab_size - vocab_start
    if limit >= logits.shape[-1]:
        return logits
    padded = torch.arange(logits.shape[-1], device=logits.device) >= limit  # (V_local,)
    return logits.masked_fill(padded, float("-inf"))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, padded_vocab: int):
        super().__init__()
        self.tokens = layers.embedding(padded_vocab, cfg.hidden_size)
        # Position table is small and replicated on every TP rank.
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.flavour == "gpt" else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(tokens)  # (B, T, h)
        if self.positions is not None:
            hidden = hidden + self.positions(positions)
        return self.dropout(hidden)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: ``num_kv_heads`` key/value heads, each
    shared by num_heads / num_kv_heads query heads. The fused qkv is split by sizes (q, k, v)."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory, layer_index: int):
        super().__init__()
        self.local_heads = cfg.num_heads // layers.tp_size
        self.local_kv_heads = cfg.kv_heads // layers.tp_size
        self.head_dim = cfg.head_dim
        self.layer_index = layer_index
        self.use_rope = cfg.flavour == "llama"
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.dropout = cfg.attention_dropout
        self.sharded_rng = layers.sharded_rng
        bias = cfg.flavour == "gpt"
        sizes = cfg.qkv_sizes
        self.qkv = layers.column(cfg.hidden_size, sum(sizes), bias=bias or cfg.qkv_bias, parts=sizes)
        self.proj = layers.row(sizes[0], cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                slots: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (B, 1, T, T), True where a query may attend: packed rows' block-diagonal causal mask
        (training only; without it the plain causal kernel runs)."""
        batch, length, _ = x.shape
        q_size, kv_size = self.local_heads * self.head_dim, self.local_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)  # (B, T, q/tp), (B, T, kv/tp) x2
        q = q.view(batch, length, self.local_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(batch, length, self.local_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(batch, length, self.local_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.use_rope:
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype, self.rope_scaling)  # (B, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        grouped = self.local_kv_heads != self.local_heads
        with self.sharded_rng():
            if cache is None and mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=grouped)
            elif cache is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=grouped)
            else:
                span = int(positions.max()) + 1
                k, v = cache.update(self.layer_index, slots, positions, k, v, span)  # (B, nkv, S, hd)
                key_positions = torch.arange(span, device=x.device)
                mask = key_positions[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=grouped)
        out = out.transpose(1, 2).reshape(batch, length, q_size)  # (B, T, nh*hd/tp)
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.gated = cfg.flavour == "llama"
        bias = not self.gated
        parts = 2 if self.gated else 1
        # llama fuses gate|up into one column-parallel matmul
        self.up = layers.column(cfg.hidden_size, parts * cfg.ffn_size, bias=bias, parts=parts)
        self.down = layers.row(cfg.ffn_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)  # (B, T, parts * f/tp)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(up, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, layer_index: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layers, layer_index)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg, layers)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), positions, cache, slots, mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Head(nn.Module):
    """Final norm and output projection; ``tied`` heads project with the token embedding."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory, padded_vocab: int):
        super().__init__()
        self.norm = make_norm(cfg)
        self.layers = layers
        self.vocab_size = cfg.vocab_size
        self.output = None if cfg.tied else layers.column(cfg.hidden_size, padded_vocab, bias=False)

    def forward(self, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        logits = self.layers.tied_logits(x, tied_weight) if self.output is None else self.output(x)  # (B, T, V/tp)
        return mask_padded_rows(logits, self.vocab_size, self.layers.vocab_start(logits.shape[-1]))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None, padded_vocab: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.layers = layers or SerialLayers()
        self.padded_vocab = padded_vocab or cfg.padded_vocab(self.layers.tp_size)
        self.embed = Embedding(cfg, self.layers, self.padded_vocab)
        self.blocks = nn.ModuleList(Block(cfg, self.layers, i) for i in range(cfg.num_layers))
        self.head = Head(cfg, self.layers, self.padded_vocab)
        self.activation_checkpointing = False
        """Recompute each block in backward instead of keeping its activations (training only)."""

    @property
    def tied(self) -> bool:
        return self.head.output is None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V/tp). ``positions`` (B, T) default 0..T-1;
        with a ``cache`` keys/values are stored and read per slot. ``logits_at`` (B,) picks one
        index per row and returns only its logits, (B, 1, V/tp): a prefill needs just the last
        prompt position, and the head over every position costs B·T·V. ``segments`` (B, T) packs
        samples in a row (training): each attends only within its segment, positions restart per segment."""
        mask = None
        if segments is not None:
            if cache is not None:
                raise ValueError("packed segments are for training: they cannot be combined with a KV cache")
            mask = segment_causal_mask(segments)  # (B, 1, T, T)
            if positions is None:
                positions = segment_positions(segments)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens, positions)  # (B, T, h)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, positions, None, None, mask, use_reentrant=False)
            else:
                x = block(x, positions, cache, slots, mask)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, h)
        return self.head(x, self.embed.tokens.weight if self.tied else None)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A micro-batch's training loss: labels are targets (B, T), or SFT's (targets, loss_mask, scale)."""
        return micro_batch_loss(self.layers, logits, labels)

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        weight = self.embed.tokens.weight
        local_kv_heads = self.cfg.kv_heads // self.layers.tp_size
        return KVCache(self.cfg.num_layers, slots, local_kv_heads, max_len, self.cfg.head_dim, weight.dtype,
                       weight.device)

    def reset_parameters(self, seed: int) -> None:
        initialize_parameters(self.named_parameters(), self.cfg, seed, self.layers)


class InputMajorLinear(nn.Module):
    """A TP=1 linear for inference with its weight stored (in, out), applied as x @ W.

    On CPU with MKL, ``x @ W.T`` (nn.Linear's (out, in) layout) is 1.4-2.3x slower than ``x @ W``
    on the same numbers when x has 4-16 rows, which is what a decode step of a small batch
    multiplies (bench/README.md, "Model"). Weights are frozen: this is a serving copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (B*T, in)
        out = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], out.shape[-1])  # (B, T, out)


def to_decode_layout(model: GPT) -> GPT:
    """Swap the block linears and the output head of a TP=1 model for InputMajorLinear, in place, for
    generation only (parameter names change; a tied head gets its own (h, V) copy of the embedding)."""
    if model.layers.tp_size != 1:
        raise ValueError(f"model: the decode layout is for TP=1 models, got tp={model.layers.tp_size}")
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "down")):
            linear = getattr(parent, name)
            setattr(parent, name, InputMajorLinear(linear.weight, linear.bias))
    head_weight = model.embed.tokens.weight if model.tied else model.head.output.weight  # (V, h)
    model.head.output = InputMajorLinear(head_weight, None)
    return model.eval()


def build_model(cfg: ModelConfig, seed: int = 0, layers: LayerFactory | None = None,
                padded_vocab: int | None = None) -> GPT:
    model = GPT(cfg, layers, padded_vocab)
    model.reset_parameters(seed)
    return model


def count_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Exact parameter count of the TP=1 model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(cfg, padded_vocab=cfg.padded_vocab(tp))
    return sum(p.numel() for p in model.parameters())
