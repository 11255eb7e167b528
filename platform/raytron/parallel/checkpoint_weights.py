"""``model.init_from: <raytron checkpoint>``: its weights, not its optimizer state or data position
(that is ``--resume``), into any (pp, tp) of the run, whatever (pp, tp) wrote it.

The checkpoint's ``model/pp{P}-tp{T}.safetensors`` hold each stage's TP shards under the serial
GPT's names, with their TP split in the metadata. For each of this rank's parameters only that
tensor is read, from the TP shards of the stage that holds it, joined to the full tensor and cut to
this rank's part. The vocabulary padding follows tp, so it may differ between the two runs: padded
rows past the run's size are cut (they lie past the true vocabulary), missing ones are zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn

from raytron.config import ModelConfig
from raytron.model.gpt import GPT
from raytron.model.layer_factory import LayerFactory
from raytron.parallel.checkpoint_layout import META_FILE, shard_file
from raytron.parallel.hf_load import LoadStats, WeightFilesError
from raytron.parallel.sharding import unshard

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


class CheckpointTensors:
    """Full tensors by name from a checkpoint's shard files, reading one tensor at a time."""

    def __init__(self, folder: Path):
        parallel = read_meta(folder)["config"]["parallel"]
        pp, tp = parallel.get("pp", 1), parallel.get("tp", 1)
        missing = [shard_file(p, t) for p in range(pp) for t in range(tp) if not (folder / shard_file(p, t)).is_file()]
        if missing:
            raise WeightFilesError(f"{folder}: missing {', '.join(missing)} (written with pp={pp}, tp={tp})")
        self.stats = LoadStats()
        self.where: dict[str, list[Path]] = {}  # name -> its stage's TP shard files, in TP rank order
        self.splits: dict[str, tuple] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for p in reversed(range(pp)):  # a tied embedding lives on the first and last stage: read the first's
            files = [folder / shard_file(p, t) for t in range(tp)]
            with safe_open(files[0], framework="pt") as reader:
                splits = json.loads((reader.metadata() or {}).get("tp_split", "{}"))
                for name in reader.keys():
                    self.where[name] = files
                    shape = list(reader.get_slice(name).get_shape())
                    if name in splits:
                        self.splits[name] = tuple(splits[name])
                        shape[self.splits[name][0]] *= tp
                    self.shapes[name] = tuple(shape)

    def full(self, name: str) -> torch.Tensor:
        files = self.where[name]
        shards = []
        for path in files if name in self.splits else files[:1]:
            with safe_open(path, framework="pt") as reader:
                shards.append(reader.get_tensor(name))
            self.stats.bytes_read += shards[-1].numel() * shards[-1].element_size()
            self.stats.tensors += 1
            self.stats.files.add(path.name)
        return unshard(shards, self.splits[name]) if name in self.splits else shards[0]


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
            problems.append(f"{name} in {tensors.where[name][0].name}: full shape {tensors.shapes[name]}, "
                            f"the model expects {tuple(tensor.shape)}")
    if problems:
        raise WeightFilesError(f"{folder} does not match the run's model:\n" + "\n".join(f"  - {p}" for p in problems))


@torch.no_grad()
def load_checkpoint_weights(named_parameters: Iterable[tuple[str, nn.Parameter]], folder: Path,
                            layers: LayerFactory) -> LoadStats:
    """Fill each parameter (serial GPT names) with its part of the checkpoint's tensor."""
    tensors = CheckpointTensors(folder)
    for name, param in named_parameters:
        full = tensors.full(name)
        rows = layers.full_shape(param)[0]
        if name in VOCAB_ROWS and full.shape[0] != rows:  # (V_pad, h): another tp, another padding
            full = full[:rows] if full.shape[0] > rows else torch.cat([full, full.new_zeros(rows - full.shape[0],
                                                                                          *full.shape[1:])])
        param.copy_(layers.local_shard(param, full))
    return tensors.stats
