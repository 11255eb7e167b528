"""The DeepSpeed engine around the GPT: pipelined (pp > 1) or not, tensor-parallel or not.

Both kinds expose the same three calls to the loop: ``train_step`` and ``eval_loss`` on a
list of micro-batches (MicroBatch, or bare token blocks (mb, T+1)), and ``gpt_state`` (this
rank's shards under the serial GPT's names, for export). An SFT micro-batch's loss is its masked
sum scaled so that both the gradient and the reported loss are the global batch's masked mean
(raytron.model.loss); pretraining's is the mean over its tokens, as before.
"""

from __future__ import annotations

import functools
import math

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_
from torch import nn

from raytron.config import RaytronConfig
from raytron.model.gpt import build_model
from raytron.parallel.deepspeed_config import deepspeed_config
from raytron.parallel.deepspeed_mpu import TopologyMPU
from raytron.parallel.hf_import import load_init_from
from raytron.parallel.pipeline import build_pipeline, gpt_name
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import Topology
from raytron.train.batches import MicroBatch
from raytron.train.schedule import lr_multiplier


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm gains (every 1-D parameter)."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _count_replicated_once(module: nn.Module, topology: Topology) -> None:
    """DeepSpeed's gradient norm counts a parameter on every rank when it is flagged model-parallel,
    and an unflagged one only on model-parallel rank 0 -- with pipelining that group spans the
    stages, so later stages' norms and biases would be left out. Flag the TP-replicated
    parameters on the first rank of each TP group: every parameter then counts exactly once."""
    for param in module.parameters():
        if not hasattr(param, "tp_split"):
            param.tensor_model_parallel = topology.tp_index == 0


class TrainingEngine:
    def __init__(self, cfg: RaytronConfig, topology: Topology):
        self.cfg = cfg
        self.topology = topology
        self.pipelined = cfg.parallel.pp > 1
        train = cfg.train
        # replicated-activation dropout must match across a TP group, and differ across DP replicas
        torch.manual_seed(train.seed + 1009 * topology.dp_index)
        layers = self.layers = TensorParallelLayers(topology, train.seed)
        if self.pipelined:
            # PipelineModule broadcasts the tied embedding in place from the first stage as it is built; with
            # grad mode on, autograd records that c10d op (it has no autograd kernel) and warns in every backward
            with torch.no_grad():
                module = build_pipeline(cfg.model, topology, layers, cfg.padded_vocab_size, train.seed,
                                        train.activation_checkpointing)
            mpu = None  # the PipelineModule brings its own grid
        else:
            module = build_model(cfg.model, train.seed, layers, cfg.padded_vocab_size)
            module.activation_checkpointing = train.activation_checkpointing
            mpu = TopologyMPU(topology)
        if cfg.model.init_from:
            named = (((gpt_name(name, cfg.model.num_layers), param) for name, param in module.named_parameters())
                     if self.pipelined else module.named_parameters())
            load_init_from(named, cfg, layers, topology.tp_index)
        _count_replicated_once(module, topology)
        optimizer = torch.optim.AdamW(_param_groups(module, train.weight_decay), lr=train.lr, betas=train.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, train=train))
        self._zero0_grad_norm: float | None = None
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    mpu=mpu, config=deepspeed_config(cfg))
        if not self.pipelined and topology.data.size == 1 and cfg.parallel.zero_stage == 0:
            # Without data-parallel peers DeepSpeed's gradient all-reduce is an identity that still
            # flattens, reduces and copies back every gradient (2% of a CPU step of the bench model).
            self.engine.enable_backward_allreduce = False
        if train.compile:
            self.engine.compile()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _pairs(self, micro_batches: list[MicroBatch | torch.Tensor]):
        """(inputs, labels) per micro-batch, as the pipeline takes them: inputs are tokens (mb, T), or
        (tokens, segments (mb, T)) for packed rows; labels are targets (mb, T), or SFT's
        (targets, loss_mask (mb, T), scale ())."""
        for batch in micro_batches:
            batch = batch if isinstance(batch, MicroBatch) else MicroBatch(batch)
            block = batch.tokens.to(self.device)
            inputs, labels = block[:, :-1], block[:, 1:]
            if batch.segments is not None:
                inputs = (inputs, batch.segments[:, :-1].to(self.device))
            if batch.loss_mask is not None:
                labels = (labels, batch.loss_mask[:, 1:].to(self.device), torch.tensor(batch.loss_scale))
            yield inputs, labels

    def _loss(self, inputs, labels) -> torch.Tensor:
        """The non-pipelined model's loss of one micro-batch."""
        tokens, segments = inputs if isinstance(inputs, tuple) else (inputs, None)
        logits = self.engine(tokens) if segments is None else self.engine(tokens, segments=segments)
        return self.engine.module.loss(logits, labels)

    def train_step(self, micro_batches: list[MicroBatch | torch.Tensor]) -> float:
        """One optimizer step over grad_accum micro-batches; returns the loss averaged over DP
        (SFT: the global batch's masked mean)."""
        if self.pipelined:
            return float(self.engine.train_batch(self._pairs(micro_batches)))
        losses = []
        for inputs, labels in self._pairs(micro_batches):
            loss = self._loss(inputs, labels)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                self._measure_grad_norm()
            self.engine.step()
            losses.append(loss.detach())
        return self._mean_over_dp(torch.stack(losses).mean())

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch | torch.Tensor]) -> float:
        if self.pipelined:
            loss = self.engine.eval_batch(self._pairs(micro_batches), num_micro_batches=len(micro_batches))
            return float(loss)
        self.engine.eval()
        losses = [self._loss(inputs, labels) for inputs, labels in self._pairs(micro_batches)]
        self.engine.train()
        return self._mean_over_dp(torch.stack(losses).mean())

    def _mean_over_dp(self, loss: torch.Tensor) -> float:
        group = self.topology.data
        if group.size > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=group.group)
            loss /= group.size
        return float(loss)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def _measure_grad_norm(self) -> None:
        """At ZeRO 0 DeepSpeed's plain-optimizer path computes the norm only to clip, and drops it (and with
        clipping off never computes it), so runs reported no grad norm. Measure it here, on the reduced
        gradients before the step clips them, with the function DeepSpeed clips with (max_norm inf: no clip)."""
        if self.engine.zero_optimization() or self.engine.bfloat16_enabled() or self.engine.fp16_enabled():
            return  # those optimizers keep their own norm
        self._zero0_grad_norm = float(clip_grad_norm_(self.engine.module.parameters(), math.inf, mpu=self.engine.mpu))

    @property
    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._zero0_grad_norm
        return None if norm is None else float(norm)

    def _gpt_named_parameters(self):
        """(serial GPT name, parameter) of this rank's module: pipeline stages translate their names."""
        rename = functools.partial(gpt_name, num_layers=self.cfg.model.num_layers) if self.pipelined else str
        return ((rename(name), param) for name, param in self.engine.module.named_parameters())

    def gpt_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters (TP shards of its pipeline stage), named as in the serial GPT."""
        return {name: param.detach().float().cpu() for name, param in self._gpt_named_parameters()}

    def tp_splits(self) -> dict[str, tuple[int, int]]:
        """GPT name -> (dim, parts) for every sharded parameter on this rank."""
        return {name: param.tp_split for name, param in self._gpt_named_parameters() if hasattr(param, "tp_split")}

    def rng_states(self) -> dict:
        """Default and sharded RNG states of this rank (dropout must resume where it left off)."""
        return {"default": torch.get_rng_state(), "sharded": self.layers.rng.state,
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}

    def set_rng_states(self, states: dict) -> None:
        torch.set_rng_state(states["default"])
        self.layers.rng.state = states["sharded"]
        if states["cuda"] is not None:
            torch.cuda.set_rng_state(states["cuda"])
