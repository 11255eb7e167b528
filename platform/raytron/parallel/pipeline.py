"""The GPT as a DeepSpeed ``PipelineModule``: one ``LayerSpec`` per block, 1F1B over micro-batches.

Stages, in order:  tokens | positions+dropout | block x L | final norm | logits
Packed SFT rows enter as (tokens, segments) and the segment ids (B, T) travel with the hidden
states up to the final norm: each stage derives the positions and the block-diagonal mask from
them (cheaper to send than a (B, T, T) mask; DeepSpeed sends no gradient for integer tensors).
Without segments a stage passes one tensor, as in pretraining.
For a tied head (the ``gpt`` default) the first and last entries are one ``TiedLayerSpec``
(the token embedding, used as the output projection on the last stage); an untied one
(the ``llama`` default) has its own output layer. Parameter names are translated to the serial GPT's so checkpoints, init and
export speak one naming.
"""

from __future__ import annotations

import functools
import re

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from raytron.config import ModelConfig
from raytron.model.gpt import Block, make_norm, mask_padded_rows
from raytron.model.init import initialize_parameters
from raytron.model.layer_factory import LayerFactory
from raytron.model.loss import micro_batch_loss
from raytron.model.segments import segment_causal_mask, segment_positions
from raytron.parallel.topology import Topology

TIED_KEY = "embed"


Activations = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""hidden (B, T, h), or (hidden, segments (B, T)) for packed rows."""


def _unpack(x: Activations) -> tuple[torch.Tensor, torch.Tensor | None]:
    return x if isinstance(x, tuple) else (x, None)


def _pack(hidden: torch.Tensor, segments: torch.Tensor | None) -> Activations:
    return hidden if segments is None else (hidden, segments)


def _positions_of(hidden: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    if segments is not None:
        return segment_positions(segments)  # (B, T), restarting per segment
    return torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], hidden.shape[1])  # (B, T)


class TokenStage(nn.Module):
    def __init__(self, layers: LayerFactory, padded_vocab: int, hidden: int, vocab_size: int):
        super().__init__()
        self.layers = layers
        self.vocab_size = vocab_size
        self.tokens = layers.embedding(padded_vocab, hidden)

    def forward(self, inputs: Activations) -> Activations:
        tokens, segments = _unpack(inputs)
        return _pack(self.tokens(tokens), segments)  # (B, T, h)[, (B, T)]


def tied_logits(stage: TokenStage, hidden: torch.Tensor) -> torch.Tensor:
    logits = stage.layers.tied_logits(hidden, stage.tokens.weight)  # (B, T, V/tp)
    return mask_padded_rows(logits, stage.vocab_size, stage.layers.vocab_start(logits.shape[-1]))


class PositionStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.flavour == "gpt" else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Activations) -> Activations:
        hidden, segments = _unpack(x)
        if self.positions is not None:
            hidden = hidden + self.positions(_positions_of(hidden, segments))
        return _pack(self.dropout(hidden), segments)


class BlockStage(Block):
    def forward(self, x: Activations) -> Activations:
        hidden, segments = _unpack(x)
        mask = None if segments is None else segment_causal_mask(segments)  # (B, 1, T, T)
        return _pack(super().forward(hidden, _positions_of(hidden, segments), mask=mask), segments)


class NormStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward(self, x: Activations) -> torch.Tensor:
        return self.norm(_unpack(x)[0])  # the segments end here: the head is per token


class OutputStage(nn.Module):
    def __init__(self, layers: LayerFactory, hidden: int, padded_vocab: int, vocab_size: int):
        super().__init__()
        self.layers = layers
        self.vocab_size = vocab_size
        self.output = layers.column(hidden, padded_vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.output(x)  # (B, T, V/tp)
        return mask_padded_rows(logits, self.vocab_size, self.layers.vocab_start(logits.shape[-1]))


def layer_specs(cfg: ModelConfig, layers: LayerFactory, padded_vocab: int) -> list[LayerSpec]:
    tokens = (TokenStage, layers, padded_vocab, cfg.hidden_size, cfg.vocab_size)
    tied = cfg.tied
    specs = [TiedLayerSpec(TIED_KEY, *tokens, tied_weight_attr="tokens.weight") if tied else LayerSpec(*tokens),
             LayerSpec(PositionStage, cfg)]
    specs += [LayerSpec(BlockStage, cfg, layers, i) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(NormStage, cfg))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, *tokens, forward_fn=tied_logits, tied_weight_attr="tokens.weight"))
    else:
        specs.append(LayerSpec(OutputStage, layers, cfg.hidden_size, padded_vocab, cfg.vocab_size))
    return specs


def gpt_name(pipeline_name: str, num_layers: int) -> str:
    """Pipeline parameter name -> the serial GPT's name (e.g. '3.attn.qkv.weight' -> 'blocks.1.attn.qkv.weight')."""
    if pipeline_name.startswith(f"tied_modules.{TIED_KEY}."):
        return "embed." + pipeline_name.split(".", 2)[2]
    index, rest = re.fullmatch(r"(\d+)\.(.+)", pipeline_name).groups()
    index = int(index)
    if index <= 1:  # token embedding (untied flavour) and the position stage
        return f"embed.{rest}"
    if index < num_layers + 2:
        return f"blocks.{index - 2}.{rest}"
    return f"head.{rest}"


def build_pipeline(cfg: ModelConfig, topology: Topology, layers: LayerFactory, padded_vocab: int,
                   seed: int, activation_checkpointing: bool = False) -> PipelineModule:
    """The pipelined GPT on this rank's stage, initialised exactly as the serial model would be."""
    layout = topology.layout
    module = PipelineModule(
        layers=layer_specs(cfg, layers, padded_vocab),
        topology=PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp),
        loss_fn=functools.partial(micro_batch_loss, layers),
        # blocks are balanced across stages; embedding and head ride on the first and last
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # only blocks: a reentrant checkpoint of the embedding (integer input) would cut its gradient
        checkpointable_layers=["BlockStage"],
    )
    named = ((gpt_name(name, cfg.num_layers), param) for name, param in module.named_parameters())
    initialize_parameters(named, cfg, seed, layers)
    return module
