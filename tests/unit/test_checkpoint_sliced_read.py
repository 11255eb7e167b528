"""A raytron checkpoint as model.init_from is read in byte ranges: each rank gets exactly its part of every
tensor (the same as importing the source Hugging Face folder at that tp), from whichever of the writer's TP
shards hold it, whatever tp wrote the checkpoint and whatever tp reads it; at tp=2 a rank reads about half
of what tp=1 reads, and the shard files are never memory-mapped.

Checkpoints are written in the layout train/checkpoint.py writes (model/pp0-tp{T}.safetensors with the
tp_split metadata, meta.json), from TP ranks built in this process as in test_hf_sharded_read.py (no
process group: building and loading need only rank and size); tests/integration/test_init_from_sources.py
reads a real engine's tp=2 checkpoint into pp=2.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from raytron.config import build_config
from raytron.model.gpt import GPT
from raytron.parallel.checkpoint_layout import META_FILE, shard_file
from raytron.parallel.checkpoint_weights import load_checkpoint_weights, source_pieces
from raytron.model.layer_factory import SerialLayers
from raytron.parallel.hf_import import imported_fields, load_huggingface_model
from raytron.parallel.hf_load import load_hf_weights
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import ParallelGroup
from tests.hf_models import GQA, save_tiny
from tests.unit.test_hf_sharded_read import mapped_weight_files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A GQA Llama (the fused q|k|v is cut per segment) of 300 tokens: tp=1 and tp=2 pad the vocabulary
    differently (384 and 512 rows)."""
    folder = tmp_path_factory.mktemp("llama")
    save_tiny("llama-untied", folder)
    return folder


@pytest.fixture(scope="module")
def unpadded_folder(tmp_path_factory):
    """The same shape with 512 tokens: no padding at tp=1 or tp=2, so bytes read add up exactly."""
    folder = tmp_path_factory.mktemp("llama-512")
    LlamaForCausalLM(LlamaConfig(**{**GQA, "vocab_size": 512}, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def rank_model(folder: Path, rank: int, tp: int):
    """(config, layers, model) of TP rank ``rank`` of ``tp`` holding the folder's weights (the HF import: what a
    checkpoint written from it must give back)."""
    layers = TensorParallelLayers(types.SimpleNamespace(tensor=ParallelGroup(None, rank, tp, tuple(range(tp)))), 0)
    cfg = build_config({"model": {**imported_fields(folder, 16), "init_from": str(folder)}, "parallel": {"tp": tp}})
    model = GPT(cfg.model, layers)
    load_hf_weights(model.named_parameters(), cfg.model, folder, layers.full_shape, rank, tp)
    return cfg, layers, model


def write_checkpoint(folder: Path, tp: int, out: Path) -> Path:
    """The folder's weights as a checkpoint written at tp (pp=1)."""
    (out / "model").mkdir(parents=True)
    for rank in range(tp):
        cfg, _, model = rank_model(folder, rank, tp)
        named = dict(model.named_parameters())
        splits = {name: list(param.tp_split) for name, param in named.items() if hasattr(param, "tp_split")}
        save_file({name: param.detach().contiguous() for name, param in named.items()}, out / shard_file(0, rank),
                  metadata={"tp_split": json.dumps(splits), "tp": str(tp)})
    (out / META_FILE).write_text(json.dumps({"config": cfg.to_dict()}))
    return out


def load(folder: Path, checkpoint: Path, rank: int, tp: int):
    """(stats, model, the HF import at that rank) of TP rank ``rank`` of ``tp`` loaded from the checkpoint."""
    _, layers, reference = rank_model(folder, rank, tp)
    _, _, model = rank_model(folder, rank, tp)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # every element must be written
    mapped = []

    def watched():  # the loader asks for the next parameter only after filling the last one
        for name, param in model.named_parameters():
            mapped.extend(mapped_weight_files(checkpoint))
            yield name, param

    stats = load_checkpoint_weights(watched(), checkpoint, layers.full_shape, rank, tp)
    assert mapped == [] and mapped_weight_files(checkpoint) == []
    return stats, model, reference


@pytest.mark.parametrize("written", [1, 2])
def test_each_rank_gets_exactly_its_part_from_the_writers_shards(folder, tmp_path, written):
    checkpoint = write_checkpoint(folder, written, tmp_path / "checkpoint")
    for tp in (1, 2):
        for rank in range(tp):
            _, model, reference = load(folder, checkpoint, rank, tp)
            expected = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                assert torch.equal(param, expected[name]), (f"written at tp={written}", f"rank {rank} of {tp}", name)
    # a serial model (no tp_split on its parameters) takes the cut from the writer's metadata
    serial = load_huggingface_model(folder, seq_len=16)
    stats = load_checkpoint_weights(serial.named_parameters(), checkpoint, SerialLayers().full_shape, 0, 1)
    expected = load_huggingface_model(folder, seq_len=16).state_dict()
    assert all(torch.equal(param, expected[name]) for name, param in serial.named_parameters())
    assert stats.files == {Path(shard_file(0, rank)).name for rank in range(written)}


@pytest.mark.parametrize("written", [1, 2])
def test_a_tp2_rank_reads_half_of_what_tp1_reads(unpadded_folder, tmp_path, written):
    checkpoint = write_checkpoint(unpadded_folder, written, tmp_path / "checkpoint")
    whole, model, _ = load(unpadded_folder, checkpoint, 0, 1)
    replicated = sum(p.numel() * p.element_size() for p in model.parameters() if not hasattr(p, "tp_split")
                     or p.tp_split is None)
    assert whole.bytes_read == sum(p.numel() * p.element_size() for p in model.parameters())
    for rank in range(2):
        stats, _, _ = load(unpadded_folder, checkpoint, rank, 2)
        # the sharded tensors' half, and the (small) replicated norms whole
        assert stats.bytes_read == (whole.bytes_read - replicated) // 2 + replicated, (written, rank)
        assert 0.49 < stats.bytes_read / whole.bytes_read < 0.51


def test_source_pieces_cut_segments_at_the_writers_shard_boundaries():
    # q|k|v of sizes 8|4|4 written by 2 ranks: rank 0 holds q[0:4] k[0:2] v[0:2], rank 1 the rest
    assert list(source_pieces(0, 16, (8, 4, 4), 16, 2)) == [(0, 0, 4), (1, 0, 4), (0, 4, 6), (1, 4, 6),
                                                             (0, 6, 8), (1, 6, 8)]
    assert list(source_pieces(2, 6, 1, 8, 2)) == [(0, 2, 4), (1, 0, 2)]  # a range across the boundary
    assert list(source_pieces(8, 12, (8, 4, 4), 16, 1)) == [(0, 8, 12)]  # one writer: its own offsets
