"""The sharded Hugging Face loader reads only a rank's slices, holds no memory map of the weight
files, and fills the same values through its paths: straight into the parameter, through a cast
(bf16 files into fp32 parameters) and through GPT-2's transposed Conv1D weights.

TP ranks are built in this process (a ParallelGroup without a process group: building and loading
need only its rank and size); tests/distributed/test_hf_parallel_import.py runs them for real.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytron.config import build_config
from raytron.model.gpt import GPT
from raytron.parallel import safetensors_ranges
from raytron.parallel.hf_import import imported_fields, load_huggingface_model
from raytron.parallel.hf_load import WeightFilesError, load_hf_weights, weight_files
from raytron.parallel.safetensors_ranges import read_header
from raytron.parallel.sharding import shard_of
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import ParallelGroup
from tests.hf_models import save_tiny

TP = 2


@pytest.fixture(scope="module", params=["llama-untied", "gpt2"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, folder)
    return folder


def source_bytes(folder: Path) -> int:
    """Bytes of tensor data in the folder's files (from their headers: nothing read, nothing mapped)."""
    entries = [entry for path in set(weight_files(folder).values()) for entry in read_header(path).values()]
    return sum(math.prod(entry.shape) * entry.dtype.itemsize for entry in entries)


def tp_rank_model(folder: Path, rank: int):
    layers = TensorParallelLayers(types.SimpleNamespace(tensor=ParallelGroup(None, rank, TP, tuple(range(TP)))), 0)
    cfg = build_config({"model": {**imported_fields(folder, 16), "init_from": str(folder)},
                        "parallel": {"tp": TP}}).model
    return cfg, layers, GPT(cfg, layers)


def mapped_weight_files(folder: Path) -> list[str]:
    """Lines of /proc/self/maps that map one of the folder's files."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]


def test_each_tp_rank_reads_only_its_slices_and_never_maps_the_files(folder):
    total = source_bytes(folder)
    serial = load_huggingface_model(folder, seq_len=16).state_dict()
    read, replicated = [], 0
    for rank in range(TP):
        cfg, layers, model = tp_rank_model(folder, rank)
        mapped = []

        def watched():  # the loader asks for the next parameter only after filling the last one
            for name, param in model.named_parameters():
                mapped.extend(mapped_weight_files(folder))
                yield name, param

        stats = load_hf_weights(watched(), cfg, folder, layers.full_shape, rank, TP)
        assert mapped == [] and mapped_weight_files(folder) == []
        held = 0
        for name, param in model.named_parameters():
            split, full = getattr(param, "tp_split", None), serial[name]
            rows = layers.full_shape(param)[0]
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])  # tp pads vocab further
            assert torch.equal(param, full if split is None else shard_of(full, split, rank, TP)), name
            held += param.numel() * param.element_size()
            replicated += 0 if split else param.numel() * param.element_size()
        assert stats.bytes_read <= held  # vocabulary padding is zeros, not read
        assert stats.bytes_read < 0.8 * total
        read.append(stats.bytes_read)
    # every source byte is read by exactly one rank, except replicated tensors, which every rank reads
    assert sum(read) == total + replicated * (TP - 1) // TP


def test_a_bf16_folder_loads_into_fp32_parameters_through_small_chunks(folder, tmp_path, monkeypatch):
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for item in folder.iterdir():
        if item.suffix == ".safetensors":
            save_file({name: t.to(torch.bfloat16) for name, t in load_file(item).items()}, bf16 / item.name)
        else:
            (bf16 / item.name).write_bytes(item.read_bytes())
    monkeypatch.setattr(safetensors_ranges, "CHUNK_BYTES", 256)  # many chunks per tensor
    ours = load_huggingface_model(bf16, seq_len=16).state_dict()
    monkeypatch.undo()
    expected = load_huggingface_model(folder, seq_len=16).state_dict()
    for name, tensor in expected.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], tensor.to(torch.bfloat16).float()), name


def test_a_tensor_shaped_unlike_the_config_is_refused_before_reading(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    victim = None
    for item in sorted(folder.iterdir()):
        tensors = load_file(item) if item.suffix == ".safetensors" else {}
        first_matrix = [n for n, t in tensors.items() if ".0." in n and t.dim() == 2][:1]
        if victim is None and first_matrix:
            name = first_matrix[0]
            tensors[name] = tensors[name][:-1].contiguous()  # one row short: a range would run into the next tensor
            save_file(tensors, broken / item.name)
            victim = f"{name} in {item.name}"
        else:
            (broken / item.name).write_bytes(item.read_bytes())
    cfg, layers, model = tp_rank_model(broken, 0)
    with pytest.raises(WeightFilesError, match=rf"{victim} has shape .*the model expects"):
        load_hf_weights(model.named_parameters(), cfg, broken, layers.full_shape, 0, TP)
