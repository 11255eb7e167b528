"""``model.init_from: <raytron checkpoint>``: its weights, not its optimizer state or data position
(that is ``--resume``), into any (pp, tp) of the run, whatever (pp, tp) wrote it.

The checkpoint's ``model/pp{P}-tp{T}.safetensors`` hold each stage's TP shards under the serial
GPT's names, with their TP split in the metadata. For each of this rank's parameters only the bytes
of its part are read (``safetensors_ranges``: ``pread`` straight into the parameter, no memory map),
from whichever of the writer's TP shards hold them: at tp=2 a rank reads about half of what tp=1
reads, whatever tp wrote the checkpoint. The vocabulary padding follows tp, so it may differ between
the two runs: padded rows past the run's size are never read (they lie past the true vocabulary),
missing ones are zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from raytron.config import ModelConfig
from raytron.model.gpt import GPT
from raytron.parallel.checkpoint_layout import META_FILE, shard_file
from raytron.parallel.hf_load import LoadStats
from raytron.parallel.safetensors_ranges import RangeReader, WeightFilesError, read_header, read_metadata
from raytron.parallel.sharding import Parts, local_ranges, segment_sizes

TRAINING_ONLY_FIELDS = ("hidden_dropout", "attention_dropout", "init_std", "init_from")
"""ModelConfig fields that do not change the weights' meaning: the new run may set its own."""
VOCAB_ROWS = ("embed.tokens.weight", "head.output.weight")


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightFilesError(f"{path}: not readable as JSON: {error}") from None
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise WeightFilesError(f"{path}: no config.model; not a raytron checkpoint's meta.json")
    config.setdefault("parallel", {})
    return meta


def checkpoint_model_fields(folder: Path) -> dict[str, Any]:
    """The ModelConfig fields the checkpoint decides (its architecture, not its dropout)."""
    model = read_meta(folder)["config"]["model"]
    return {key: value for key, value in model.items() if key not in TRAINING_ONLY_FIELDS}


def source_pieces(start: int, stop: int, parts: Parts, full: int, tp: int) -> Iterator[tuple[int, int, int]]:
    """(writer's TP rank, start, stop in its shard) of the pieces that hold full rows [start, stop), in order,
    along the split dim of a tensor ``full`` long there that ``tp`` ranks wrote, each its share of every
    one of the ``parts`` segments (``sharding.shard_of``)."""
    segment_start = local_start = 0
    for segment in segment_sizes(parts, full):
        share, end = segment // tp, min(stop, segment_start + segment)
        at = max(start, segment_start)
        while at < end:
            rank, offset = divmod(at - segment_start, share)
            length = min(end - at, share - offset)
            yield rank, local_start + offset, local_start + offset + length
            at += length
        segment_start += segment
        local_start += share


class CheckpointTensors:
    """A checkpoint's tensors by name: full shapes and TP splits from the shard files' headers, and any
    rank's part of a tensor read as byte ranges of the writer's shards."""

    def __init__(self, folder: Path):
        parallel = read_meta(folder)["config"]["parallel"]
        pp, tp = parallel.get("pp", 1), parallel.get("tp", 1)
        missing = [shard_file(p, t) for p in range(pp) for t in range(tp) if not (folder / shard_file(p, t)).is_file()]
        if missing:
            raise WeightFilesError(f"{folder}: missing {', '.join(missing)} (written with pp={pp}, tp={tp})")
        self.tp = tp
        self.stats = LoadStats()
        self.readers = [RangeReader({}) for _ in range(tp)]  # writer's TP rank -> name -> its stage's file
        self.splits: dict[str, tuple] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for p in reversed(range(pp)):  # a tied embedding lives on the first and last stage: read the first's
            files = [folder / shard_file(p, t) for t in range(tp)]
            splits = json.loads(read_metadata(files[0]).get("tp_split", "{}"))
            for name, entry in read_header(files[0]).items():
                for reader, path in zip(self.readers, files):
                    reader.files[name] = path
                shape = list(entry.shape)
                if name in splits:
                    self.splits[name] = tuple(splits[name])
                    shape[self.splits[name][0]] *= tp
                self.shapes[name] = tuple(shape)

    def file_of(self, name: str) -> Path:
        return self.readers[0].files[name]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def fill(self, name: str, param: nn.Parameter, shape: tuple[int, ...], tp_rank: int, tp_size: int) -> None:
        """This rank's part of tensor ``name`` into ``param``, whose full (TP=1) shape is ``shape``."""
        # a serial model's parameters carry no tp_split: the writer's says how its shards cut the tensor
        split = getattr(param, "tp_split", None) or self.splits.get(name)
        dim, parts = split or (0, 1)
        full = self.shapes[name]
        if len(full) != len(shape) or any(full[d] != shape[d] for d in range(len(shape))
                                          if d != dim or name not in VOCAB_ROWS):  # only vocabulary rows may differ
            raise WeightFilesError(f"{self.file_of(name)}: {name} has full shape {full}, the model expects {shape}")
        ranges = local_ranges(shape[dim], split, dim, tp_rank, tp_size)
        if sum(stop - start for start, stop in ranges) != param.shape[dim]:
            raise WeightFilesError(f"{self.file_of(name)}: {name} would get {ranges} along dim {dim} at tp rank "
                                   f"{tp_rank} of {tp_size}, this rank holds {tuple(param.shape)}")
        written, writers = full[dim], self.tp if name in self.splits else 1
        done = 0
        for start, stop in ranges:
            for rank, first, last in source_pieces(start, min(stop, written), parts, written, writers):
                rows, columns = ((first, last), None) if dim == 0 else ((0, shape[0]), (first, last))
                self.readers[rank].read_into(name, rows, columns, param.data.narrow(dim, done, last - first))
                self.stats.tensors += 1
                self.stats.files.add(self.readers[rank].files[name].name)
                done += last - first
            padding = stop - max(start, written)
            if padding > 0:  # vocabulary rows this tp pads beyond the writer's: zeros
                param.data.narrow(dim, done, padding).zero_()
                done += padding
        self.stats.bytes_read = sum(reader.bytes_read for reader in self.readers)


def check_checkpoint(folder: Path, cfg: ModelConfig) -> None:
    """Before any worker starts: every parameter of the run's model is in the checkpoint with its
    shape (vocabulary rows aside); names the tensor and the file."""
    tensors = CheckpointTensors(folder)
    with torch.device("meta"):
        expected = GPT(cfg, padded_vocab=cfg.padded_vocab(1)).state_dict()
    problems = []
    for name, tensor in expected.items():
        if name not in tensors.shapes:
            problems.append(f"{name}: missing from {folder}/model/")
        elif tensors.shapes[name][name in VOCAB_ROWS:] != tuple(tensor.shape)[name in VOCAB_ROWS:]:
            problems.append(f"{name} in {tensors.file_of(name).name}: full shape {tensors.shapes[name]}, "
                            f"the model expects {tuple(tensor.shape)}")
    if problems:
        raise WeightFilesError(f"{folder} does not match the run's model:\n" + "\n".join(f"  - {p}" for p in problems))


@torch.no_grad()
def load_checkpoint_weights(named_parameters: Iterable[tuple[str, nn.Parameter]], folder: Path, full_shape,
                            tp_rank: int, tp_size: int) -> LoadStats:
    """Fill each parameter (serial GPT names) with its part of the checkpoint's tensor, reading only that
    part. ``full_shape(param)`` gives the TP=1 shape (the LayerFactory's)."""
    tensors = CheckpointTensors(folder)
    try:
        for name, param in named_parameters:
            tensors.fill(name, param, full_shape(param), tp_rank, tp_size)
    finally:
        tensors.close()
    return tensors.stats
