"""Load a Hugging Face folder's weights into this rank's part of the model, reading only that part.

A rank holds some pipeline stage's parameters, each maybe a TP shard (``tp_split``). For every
parameter the rule table (``raytron.model.hf_mapping``) says which of their tensors it is made of;
this rank's rows (and columns) of each segment are read from the files straight into the parameter
(``safetensors_ranges``: ``pread``, no memory map), so no file is read in full, the whole model
never exists in one process, and the load holds no copy beyond the parameters (a bounded chunk
when the file's dtype differs or GPT-2's transposed Conv1D weights are read). Vocabulary rows past
their tensor are our padding: zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from raytron.config import ModelConfig
from raytron.model.hf_mapping import Rule, rules_for
from raytron.parallel.safetensors_ranges import RangeReader, WeightFilesError, read_header
from raytron.parallel.sharding import local_ranges

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

__all__ = ["INDEX_FILE", "SINGLE_FILE", "LoadStats", "WeightFilesError", "check_shapes", "load_hf_weights",
           "weight_files"]


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
        return {name: folder / SINGLE_FILE for name in read_header(folder / SINGLE_FILE)}
    raise WeightFilesError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (weights of a Hugging Face folder)")


def check_shapes(folder: Path, cfg: ModelConfig) -> None:
    """Every tensor the rules need is there with the shape config.json implies (reads headers only)."""
    reader = RangeReader(weight_files(folder))
    problems = []
    for rule in rules_for(cfg):
        width = _expected_width(rule, cfg)
        for name, rows in zip(rule.theirs, rule.sizes):
            if name not in reader.files:
                problems.append(f"{name}: missing from the weight files")
                continue
            shape, expected = reader.entry(name).shape, _their_shape(rule, rows, width)
            if shape != expected:
                problems.append(f"{name} in {reader.files[name].name}: shape {shape}, config.json implies {expected}")
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


def _their_shape(rule: Rule, rows: int, width: int | None) -> tuple[int, ...]:
    """The shape one of a rule's tensors has in the file, given our rows and columns of it."""
    shape = (rows,) if width is None else (rows, width)
    return shape[::-1] if rule.transpose else shape


@dataclass
class LoadStats:
    bytes_read: int = 0
    """Bytes of tensor data this rank read."""
    tensors: int = 0
    files: set[str] = field(default_factory=set)


class _ParameterFiller:
    """Fills parameters from one folder's files, counting what it reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.reader = RangeReader(weight_files(folder))
        self.stats = LoadStats()

    def fill(self, rule: Rule, rows: tuple[int, int], columns: tuple[int, int] | None, width: int | None,
             dest: torch.Tensor) -> None:
        """Our full rows [start, stop) of a rule's concatenated tensors (zeros past their end) into
        ``dest`` (stop - start rows); only our columns [a, b) of them when given."""
        (start, stop), offset = rows, 0
        for name, size in zip(rule.theirs, rule.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                self._check(rule, name, size, width)
                self._read(name, (lo - offset, hi - offset), columns, rule.transpose, dest[lo - start:hi - start])
            offset += size
        if stop > offset:  # vocabulary padding
            dest[max(start, offset) - start:].zero_()

    def _check(self, rule: Rule, name: str, rows: int, width: int | None) -> None:
        """The file's tensor has the shape the model expects: a range past its end would read its neighbour."""
        if name not in self.reader.files:
            raise WeightFilesError(f"{self.folder}: {name} is missing from the weight files")
        shape, expected = self.reader.entry(name).shape, _their_shape(rule, rows, width)
        if shape != expected:
            raise WeightFilesError(f"{self.folder}: {name} in {self.reader.files[name].name} has shape {shape}, "
                                   f"the model expects {expected}")

    def _read(self, name: str, rows: tuple[int, int], columns: tuple[int, int] | None, transpose: bool,
              dest: torch.Tensor) -> None:
        """Our rows and columns of tensor ``name`` (ours: (out, in), theirs maybe (in, out)) into ``dest``."""
        self.stats.tensors += 1
        self.stats.files.add(self.reader.files[name].name)
        self.reader.read_into(name, rows, columns, dest, transpose)
        self.stats.bytes_read = self.reader.bytes_read


@torch.no_grad()
def load_hf_weights(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig, folder: str | Path,
                    full_shape, tp_rank: int, tp_size: int) -> LoadStats:
    """Fill each parameter (named as in the serial GPT) with its part of the folder's weights.
    ``full_shape(param)`` gives the TP=1 shape (the LayerFactory's)."""
    rules = {rule.ours: rule for rule in rules_for(cfg)}
    filler = _ParameterFiller(Path(folder))
    try:
        for name, param in named_parameters:
            split = getattr(param, "tp_split", None)
            shape = full_shape(param)
            row_ranges = local_ranges(shape[0], split, 0, tp_rank, tp_size)
            columns = local_ranges(shape[1], split, 1, tp_rank, tp_size)[0] if len(shape) > 1 else None
            local = (sum(stop - start for start, stop in row_ranges),) + (() if columns is None else
                                                                           (columns[1] - columns[0],))
            if local != tuple(param.shape):
                raise WeightFilesError(f"{folder}: {name} would get {local} at tp rank {tp_rank} of {tp_size}, "
                                       f"this rank holds {tuple(param.shape)}")
            done = 0
            for start, stop in row_ranges:  # a fused parameter holds this rank's part of each segment
                filler.fill(rules[name], (start, stop), columns, shape[1] if len(shape) > 1 else None,
                            param.data[done:done + stop - start])
                done += stop - start
    finally:
        filler.reader.close()
    return filler.stats
