"""Imported Hugging Face models at tp=2 and pp=2 on real gloo processes: each rank reads only its
slices, holds exactly its shard of the serial import, and the logits equal transformers'."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from raytron.config import build_config
from raytron.parallel.hf_import import imported_fields, load_huggingface_model, load_init_from
from raytron.parallel.hf_load import weight_files
from raytron.parallel.pipeline import build_pipeline, gpt_name
from raytron.parallel.sharding import shard_of
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import Topology
from tests.distributed.gloo import run_on_gloo
from tests.hf_models import KINDS, VOCAB, save_tiny

TOL = 1e-5
BATCH, LENGTH = 2, 24


def _source_bytes(folder) -> int:
    return sum(t.numel() * t.element_size() for p in set(weight_files(folder).values()) for t in load_file(p).values())


def _check_tp2(folder, tokens, reference, serial_state) -> None:
    topology = Topology.from_world(dp=1, pp=1, tp=2)
    layers = TensorParallelLayers(topology, seed=0)
    model = load_huggingface_model(folder, seq_len=LENGTH, layers=layers, tp_rank=topology.tp_index)
    for name, param in model.named_parameters():  # exactly this rank's slice of the serial import
        split, full = getattr(param, "tp_split", None), serial_state[name]
        rows = layers.full_shape(param)[0]
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])  # tp pads vocab further
        expected = full if split is None else shard_of(full, split, topology.tp_index, 2)
        assert torch.equal(param, expected), name
    with torch.no_grad():
        logits = layers.gather_logits(model(tokens))[..., :VOCAB]  # (B, T, V)
    torch.testing.assert_close(logits, reference, atol=TOL, rtol=0)


def _check_pp2(folder, tokens, reference, serial_state) -> None:
    import deepspeed

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # PipelineModule requires it
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the group run_on_gloo started
    cfg = build_config({"model": {**imported_fields(folder, LENGTH), "init_from": str(folder)},
                        "train": {"seq_len": LENGTH}, "parallel": {"pp": 2}})
    topology = Topology.from_world(dp=1, pp=2, tp=1)
    layers = TensorParallelLayers(topology, seed=0)
    module = build_pipeline(cfg.model, topology, layers, cfg.padded_vocab_size, seed=0)
    named = [(gpt_name(name, cfg.model.num_layers), param) for name, param in module.named_parameters()]
    stats = load_init_from(named, cfg, layers, topology.tp_index)
    for name, param in named:
        assert torch.equal(param, serial_state[name]), name
    held = {name for name, _ in named}
    assert all(f"blocks.{topology.pp_index}." in name for name in held if name.startswith("blocks."))
    # read no more than this stage holds: never the whole model
    assert stats.bytes_read <= sum(p.numel() * p.element_size() for _, p in named)
    assert stats.bytes_read < 0.8 * _source_bytes(folder)
    module.eval()
    with torch.no_grad():
        if topology.pp_index == 0:
            dist.send(module(tokens).contiguous(), dst=1)
        else:
            hidden = torch.empty(BATCH, LENGTH, cfg.model.hidden_size)
            dist.recv(hidden, src=0)
            torch.testing.assert_close(module(hidden)[..., :VOCAB], reference, atol=TOL, rtol=0)


def _check_layouts(cases) -> None:
    for kind, folder, tokens, reference in cases:
        serial_state = load_huggingface_model(folder, seq_len=LENGTH).state_dict()
        try:
            _check_tp2(folder, tokens, reference, serial_state)
            _check_pp2(folder, tokens, reference, serial_state)
        except AssertionError as error:
            raise AssertionError(f"{kind}: {error}") from error


def test_tp2_and_pp2_import_match_transformers(tmp_path):
    """Every kind in one pair of processes: starting them (torch, transformers, DeepSpeed) is the cost."""
    cases = []
    for kind in sorted(KINDS):
        theirs = save_tiny(kind, tmp_path / kind)
        tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))  # (B, T)
        with torch.no_grad():
            cases.append((kind, tmp_path / kind, tokens, theirs(tokens).logits))  # logits (B, T, V)
    run_on_gloo(2, _check_layouts, cases)
