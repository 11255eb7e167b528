"""Load a Hugging Face folder's weights into this rank's part of the model, reading only that part.

A rank holds some pipeline stage's parameters, each maybe a TP shard (``tp_split``). For every
parameter the rule table (``raytron.model.hf_mapping``) says which of their tensors it is made of;
this rank's rows of each segment are read with safetensors' ``get_slice``, so no file is read in
full and the whole model never exists in one process. Vocabulary rows past their tensor are our
padding: zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from raytron.config import ModelConfig
from raytron.model.hf_mapping import Rule, rules_for
from raytron.parallel.sharding import segment_sizes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightFilesError(ValueError):
    """Weights missing from, or shaped unlike, what config.json describes; names file and tensor."""


def weight_files(folder: Path) -> dict[str, Path]:
    """Their tensor name -> the file holding it (sharded index or one file); every file must exist."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(path.name) for path in files.values() if not path.is_file()})
        if missing:
            raise WeightFilesError(f"{folder}: {INDEX_FILE} lists {', '.join(missing)}, which do not exist")
        return files
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as reader:
            return {name: folder / SINGLE_FILE for name in reader.keys()}
    raise WeightFilesError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (weights of a Hugging Face folder)")


def check_shapes(folder: Path, cfg: ModelConfig) -> None:
    """Every tensor the rules need is there with the shape config.json implies (reads headers only)."""
    files = weight_files(folder)
    problems = []
    for rule in rules_for(cfg):
        width = _expected_width(rule, cfg)
        for name, rows in zip(rule.theirs, rule.sizes):
            if name not in files:
                problems.append(f"{name}: missing from the weight files")
                continue
            with safe_open(files[name], framework="pt") as reader:
                shape = tuple(reader.get_slice(name).get_shape())
            expected = (rows,) if width is None else (rows, width)
            expected = expected[::-1] if rule.transpose else expected
            if shape != expected:
                problems.append(f"{name} in {files[name].name}: shape {shape}, config.json implies {expected}")
    if problems:
        raise WeightFilesError(f"{folder} does not match its config.json:\n" + "\n".join(f"  - {p}" for p in problems))


def _expected_width(rule: Rule, cfg: ModelConfig) -> int | None:
    """Columns (our dim 1) of a rule's tensors, None for vectors."""
    if not rule.ours.endswith("weight") or ".norm" in rule.ours:
        return None
    if rule.ours.endswith("attn.proj.weight"):
        return cfg.qkv_sizes[0]
    if rule.ours.endswith("mlp.down.weight"):
        return cfg.ffn_size
    return cfg.hidden_size


@dataclass
class LoadStats:
    bytes_read: int = 0
    """Bytes of tensor data this rank read."""
    tensors: int = 0
    files: set[str] = field(default_factory=set)


class ShardedReader:
    """Reads row/column ranges of their tensors, our orientation, opening each file once."""

    def __init__(self, folder: Path):
        self.files = weight_files(folder)
        self.readers: dict[Path, object] = {}
        self.stats = LoadStats()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.__exit__(None, None, None)
        self.readers.clear()

    def _slice(self, name: str):
        path = self.files[name]
        if path not in self.readers:
            self.readers[path] = safe_open(path, framework="pt").__enter__()
            self.stats.files.add(path.name)
        return self.readers[path].get_slice(name)

    def rows(self, rule: Rule, start: int, stop: int, columns: tuple[int, int] | None) -> torch.Tensor:
        """Our rows [start, stop) of a rule's concatenated tensors (zeros past the end), optionally
        only our columns [a, b)."""
        pieces, offset = [], 0
        for name, size in zip(rule.theirs, rule.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                pieces.append(self._read(name, lo - offset, hi - offset, columns, rule.transpose))
            offset += size
        if stop > offset:  # vocabulary padding; torch.cat promotes, copy_ casts to the parameter's dtype
            pieces.append(torch.zeros(stop - max(start, offset), *self._width(rule, columns)))
        return torch.cat(pieces, dim=0)

    def _width(self, rule: Rule, columns: tuple[int, int] | None) -> tuple[int, ...]:
        """Our trailing dims of a rule's tensors (only ``columns`` when given)."""
        shape = list(self._slice(rule.theirs[0]).get_shape())
        width = shape[:1] if rule.transpose else shape[1:]
        return tuple(width) if columns is None else (columns[1] - columns[0],)

    def _read(self, name: str, lo: int, hi: int, columns: tuple[int, int] | None, transpose: bool) -> torch.Tensor:
        part = self._slice(name)
        if len(part.get_shape()) == 1:
            tensor = part[lo:hi]
        elif transpose:  # theirs is (in, out): our rows are their columns
            tensor = (part[:, lo:hi] if columns is None else part[columns[0]:columns[1], lo:hi]).t()
        else:
            tensor = part[lo:hi] if columns is None else part[lo:hi, columns[0]:columns[1]]
        self.stats.bytes_read += tensor.numel() * tensor.element_size()
        self.stats.tensors += 1
        return tensor


def _local_ranges(full: int, split: tuple | None, dim: int, rank: int, size: int) -> list[tuple[int, int]]:
    """This rank's [start, stop) ranges along ``dim`` of a tensor ``full`` long there."""
    if split is None or split[0] != dim:
        return [(0, full)]
    ranges, offset = [], 0
    for segment in segment_sizes(split[1], full):
        local = segment // size
        ranges.append((offset + rank * local, offset + (rank + 1) * local))
        offset += segment
    return ranges


@torch.no_grad()
def load_hf_weights(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig, folder: str | Path,
                    full_shape, tp_rank: int, tp_size: int) -> LoadStats:
    """Fill each parameter (named as in the serial GPT) with its part of the folder's weights.
    ``full_shape(param)`` gives the TP=1 shape (the LayerFactory's)."""
    rules = {rule.ours: rule for rule in rules_for(cfg)}
    reader = ShardedReader(Path(folder))
    try:
        for name, param in named_parameters:
            rule = rules[name]
            split = getattr(param, "tp_split", None)
            shape = full_shape(param)
            row_ranges = _local_ranges(shape[0], split, 0, tp_rank, tp_size)
            columns = _local_ranges(shape[1], split, 1, tp_rank, tp_size)[0] if len(shape) > 1 else None
            columns = None if columns == (0, shape[1] if len(shape) > 1 else 0) else columns
            local = torch.cat([reader.rows(rule, start, stop, columns) for start, stop in row_ranges], dim=0)
            if local.shape != param.shape:
                raise WeightFilesError(f"{folder}: {rule.theirs} give {tuple(local.shape)} for {name}, "
                                       f"this rank holds {tuple(param.shape)}")
            param.copy_(local)
    finally:
        reader.close()
    return reader.stats
