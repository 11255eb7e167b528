"""A training checkpoint of any (dp, pp, tp) layout -> one full (TP=1, PP=1) GPT state dict.

Reads only ``model/pp{P}-tp{T}.safetensors`` (one file per pipeline stage and TP rank,
written by DP replica 0 under the serial GPT's names) and ``meta.json``; the DeepSpeed
engine state is not needed. Sharded tensors are concatenated back with the TP split their
file records; replicated ones are taken from TP rank 0. A name held by several stages (the
tied token embedding lives on the first and the last) must be equal everywhere.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import torch
from safetensors import safe_open

from raytron.config import RaytronConfig, build_config
from raytron.model.gpt import GPT
from raytron.parallel.sharding import unshard
from raytron.storage import filesystem_for, is_remote
from raytron.train.checkpoint import META_FILE, MODEL_DIR, MODEL_FILES, TOKENIZER_FILE, CheckpointMeta, shard_file

EXPORT_INPUTS = (MODEL_DIR, META_FILE, *MODEL_FILES)
"""What export reads from a checkpoint; the rest (engine, optimizer, RNG) stays where it is."""


class CheckpointError(ValueError):
    pass


@dataclass
class ConsolidatedCheckpoint:
    config: RaytronConfig
    """The training run's config (``parallel`` still says how it was trained)."""
    meta: CheckpointMeta
    state: dict[str, torch.Tensor]
    """Full tensors under the serial GPT's names: loads into ``new_model()`` with strict=True."""

    def new_model(self) -> GPT:
        """The TP=1 GPT holding these weights, in eval mode."""
        with torch.device("meta"):  # no throwaway init: the tensors are assigned in place
            model = GPT(self.config.model, padded_vocab=self.meta.padded_vocab_size)
        model.load_state_dict(self.state, strict=True, assign=True)
        return model.eval()


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | Path) -> Iterator[Path]:
    """The checkpoint as a local folder: a local path as it is, an s3:// URL downloaded (only
    EXPORT_INPUTS) into a temporary folder that is removed on exit."""
    if not is_remote(str(checkpoint)):
        yield Path(checkpoint)
        return
    fs, root = filesystem_for(str(checkpoint))
    with tempfile.TemporaryDirectory(prefix="raytron-checkpoint-") as tmp:
        for name in EXPORT_INPUTS:
            source, destination = f"{root}/{name}", Path(tmp, name)
            kind = fs.get_file_info(source).type
            if kind == pafs.FileType.Directory:
                destination.mkdir()  # copy_files fills a folder but does not create it
            if kind != pafs.FileType.NotFound:  # the tokenizer and the other model files are optional
                pafs.copy_files(source, str(destination), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def consolidate_checkpoint(checkpoint: str | Path) -> ConsolidatedCheckpoint:
    """Gather every (pp, tp) shard of a checkpoint (local folder or s3:// URL) into full tensors,
    checked name by name and shape by shape against the TP=1 GPT of the run's config."""
    with local_checkpoint(checkpoint) as folder:
        if not (folder / META_FILE).is_file():
            raise CheckpointError(f"{checkpoint}: no {META_FILE}; not a raytron checkpoint (or not a complete one)")
        meta = CheckpointMeta.read(folder)
        config = build_config(meta.config, f"{checkpoint}/{META_FILE}")
        state, origins = _gather_stages(folder, config, str(checkpoint))
    _check_against_model(state, origins, config, meta.padded_vocab_size, str(checkpoint))
    return ConsolidatedCheckpoint(config, meta, state)


def _gather_stages(folder: Path, config: RaytronConfig,
                   checkpoint: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Full tensors of every stage, and for each name the files it came from (for error messages)."""
    state: dict[str, torch.Tensor] = {}
    origins: dict[str, list[str]] = {}
    layout = [[shard_file(pp_index, tp_index) for tp_index in range(config.parallel.tp)]
              for pp_index in range(config.parallel.pp)]
    missing = [file for files in layout for file in files if not (folder / file).is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint}: missing shard file(s) {', '.join(missing)}; a checkpoint trained "
                              f"with pp={config.parallel.pp}, tp={config.parallel.tp} has one per (pp, tp)")
    for pp_index, files in enumerate(layout):
        stage = f"{MODEL_DIR}/pp{pp_index}-tp*.safetensors"
        for name, tensor in _unshard_stage(folder, files, checkpoint).items():
            if name in state and not torch.equal(state[name], tensor):
                raise CheckpointError(f"{checkpoint}: {name} differs between {origins[name][0]} and {stage} "
                                      "(a tied weight out of sync?)")
            state.setdefault(name, tensor)
            origins.setdefault(name, []).append(stage)
    return state, origins


def _unshard_stage(folder: Path, files: list[str], checkpoint: str) -> dict[str, torch.Tensor]:
    """One pipeline stage's full tensors from its TP ranks' files (given in TP rank order)."""
    shards, splits = [], {}
    for file in files:
        with safe_open(folder / file, framework="pt") as reader:
            metadata = reader.metadata() or {}
            if "tp_split" not in metadata:
                raise CheckpointError(f"{checkpoint}: {file} has no tp_split metadata; not written by raytron")
            if int(metadata["tp"]) != len(files):
                raise CheckpointError(f"{checkpoint}: {file} was written with tp={metadata.get('tp')}, "
                                      f"the config says tp={len(files)}")
            # each entry is itself JSON: name -> "[dim, parts]"
            splits = {name: tuple(split) for name, split in json.loads(metadata["tp_split"]).items()}
            shards.append({name: reader.get_tensor(name) for name in reader.keys()})
    names = shards[0].keys()
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != names:
            raise CheckpointError(f"{checkpoint}: {file} holds {sorted(shard.keys() ^ names)} "
                                  f"where {files[0]} does not, or the reverse")
    return {name: unshard([shard[name] for shard in shards], splits[name]) if name in splits else shards[0][name]
            for name in names}


def _check_against_model(state: dict[str, torch.Tensor], origins: dict[str, list[str]], config: RaytronConfig,
                         padded_vocab: int, checkpoint: str) -> None:
    with torch.device("meta"):
        expected = GPT(config.model, padded_vocab=padded_vocab).state_dict()
    problems = [f"{name}: missing (expected shape {tuple(tensor.shape)} in one of the {MODEL_DIR}/ files)"
                for name, tensor in expected.items() if name not in state]
    problems += [f"{name}: shape {tuple(state[name].shape)} in {', '.join(origins[name])}, "
                 f"the model expects {tuple(tensor.shape)}"
                 for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems += [f"{name}: in {', '.join(origins[name])} but not a parameter of the model"
                 for name in state if name not in expected]
    if problems:
        raise CheckpointError(f"{checkpoint} does not match its config's model:\n"
                              + "\n".join(f"  - {problem}" for problem in problems))
