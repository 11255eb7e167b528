"""Our GPT's parameter names <-> Hugging Face's, one table read in both directions.

Every rule says how one of our tensors is made of one or more of theirs: fused q|k|v and gate|up
are theirs concatenated along our rows (q|k|v by their sizes: GQA makes k and v smaller); GPT-2's
Conv1D keeps weights as (in, out), so those are transposed; vocabulary rows are padded on our side
(zeros) and cut on theirs. Export (``to_huggingface_state``), import of whole tensors
(``from_huggingface_state``) and the sharded loader (``raytron.parallel.hf_load``) all read
``rules_for``; nothing else knows their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from raytron.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    ours: str
    """Our parameter name (the serial GPT's)."""
    theirs: tuple[str, ...]
    """Hugging Face names; several when ours is fused (concatenated along our rows, in this order)."""
    sizes: tuple[int, ...]
    """Rows (our dim 0) each of ``theirs`` contributes; for a vocab rule, the true vocabulary."""
    transpose: bool = False
    """GPT-2 Conv1D stores weights as (in, out); ours are nn.Linear (out, in)."""
    vocab: bool = False
    """Rows are the vocabulary: ours has padded rows beyond ``sizes`` (zeros on import, cut on export)."""


def _gpt2_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    h, f = cfg.hidden_size, cfg.ffn_size
    theirs, ours = f"transformer.h.{i}", f"blocks.{i}"
    table = [(f"{ours}.norm1", f"{theirs}.ln_1", h, False), (f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", sum(cfg.qkv_sizes), True),
             (f"{ours}.attn.proj", f"{theirs}.attn.c_proj", h, True), (f"{ours}.norm2", f"{theirs}.ln_2", h, False),
             (f"{ours}.mlp.up", f"{theirs}.mlp.c_fc", f, True), (f"{ours}.mlp.down", f"{theirs}.mlp.c_proj", h, True)]
    return [Rule(f"{mine}.{kind}", (f"{hf}.{kind}",), (rows,), transpose and kind == "weight")
            for mine, hf, rows, transpose in table for kind in ("weight", "bias")]


def _llama_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    h, f = cfg.hidden_size, cfg.ffn_size
    theirs, ours = f"model.layers.{i}", f"blocks.{i}"
    qkv = tuple(f"{theirs}.self_attn.{p}_proj" for p in "qkv")
    rules = [
        Rule(f"{ours}.norm1.weight", (f"{theirs}.input_layernorm.weight",), (h,)),
        Rule(f"{ours}.attn.qkv.weight", tuple(f"{name}.weight" for name in qkv), cfg.qkv_sizes),
        Rule(f"{ours}.attn.proj.weight", (f"{theirs}.self_attn.o_proj.weight",), (h,)),
        Rule(f"{ours}.norm2.weight", (f"{theirs}.post_attention_layernorm.weight",), (h,)),
        Rule(f"{ours}.mlp.up.weight", (f"{theirs}.mlp.gate_proj.weight", f"{theirs}.mlp.up_proj.weight"), (f, f)),
        Rule(f"{ours}.mlp.down.weight", (f"{theirs}.mlp.down_proj.weight",), (h,)),
    ]
    if cfg.qkv_bias:
        rules.append(Rule(f"{ours}.attn.qkv.bias", tuple(f"{name}.bias" for name in qkv), cfg.qkv_sizes))
    return rules


def rules_for(cfg: ModelConfig) -> list[Rule]:
    """Every rule of this model, blocks expanded; the output head only when it is not tied."""
    vocab, h = (cfg.vocab_size,), cfg.hidden_size
    if cfg.flavour == "gpt":
        rules = [Rule("embed.tokens.weight", ("transformer.wte.weight",), vocab, vocab=True),
                 Rule("embed.positions.weight", ("transformer.wpe.weight",), (cfg.max_position_embeddings,))]
        rules += [rule for i in range(cfg.num_layers) for rule in _gpt2_rules(cfg, i)]
        rules += [Rule(f"head.norm.{kind}", (f"transformer.ln_f.{kind}",), (h,)) for kind in ("weight", "bias")]
    else:
        rules = [Rule("embed.tokens.weight", ("model.embed_tokens.weight",), vocab, vocab=True)]
        rules += [rule for i in range(cfg.num_layers) for rule in _llama_rules(cfg, i)]
        rules.append(Rule("head.norm.weight", ("model.norm.weight",), (h,)))
    if not cfg.tied:  # a tied head has no tensor of its own: transformers re-ties lm_head on load
        rules.append(Rule("head.output.weight", ("lm_head.weight",), vocab, vocab=True))
    return rules


def to_huggingface_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full (TP=1) state dict -> Hugging Face tensors; padded vocabulary rows are cut."""
    theirs = {}
    for rule in rules_for(cfg):
        tensor = state[rule.ours].detach()
        if rule.vocab:
            tensor = tensor[: rule.sizes[0]]
        for name, part in zip(rule.theirs, tensor.split(rule.sizes, dim=0)):
            part = part.t() if rule.transpose else part
            # own, contiguous storage: safetensors refuses views and shared memory
            theirs[name] = part.clone(memory_format=torch.contiguous_format)
    return theirs


def from_huggingface_state(theirs: Mapping[str, torch.Tensor], cfg: ModelConfig,
                           padded_vocab: int) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> full state dict; vocabulary rows padded with zeros to ``padded_vocab``."""
    state = {}
    for rule in rules_for(cfg):
        tensor = torch.cat([theirs[name].t() if rule.transpose else theirs[name] for name in rule.theirs], dim=0)
        if rule.vocab and tensor.shape[0] < padded_vocab:
            padding = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, padding])
        state[rule.ours] = tensor.contiguous()
    return state
