"""What one checkpoint holds, written by every rank into its own folder.

  deepspeed/          engine state: module, optimizer (ZeRO shards), lr scheduler (DeepSpeed's format)
  rng/rank-XXXXX.pt   every rank's RNG states (DeepSpeed does not save them)
  model/pp{P}-tp{T}.safetensors
                      the (pp, tp) shard of the weights under the serial GPT's names, with
                      each tensor's TP split in the metadata: what export consolidates
  meta.json           step, data position, config, MLflow run id (rank 0)
  tokenizer.json      when the run has one (rank 0), else an imported model's
  tokenizer_config.json, generation_config.json
                      an imported model's (model.init_from; rank 0): special and added tokens, chat
                      template, bos/eos, the EOS list. They travel on to export and serving.

Under Ray Train each worker reports its folder and Ray merges them into one checkpoint,
registered only when every worker has reported: a half-written one never becomes latest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from raytron.parallel.checkpoint_layout import (ENGINE_DIR, META_FILE, MODEL_DIR, MODEL_FILES, RNG_DIR,  # noqa: F401
                                                TOKENIZER_FILE, shard_file)
from raytron.parallel.init_source import local_folder
from raytron.train.batches import DataPosition, StepBatches

if TYPE_CHECKING:  # the engine imports DeepSpeed, which export and the driver do not need
    from raytron.train.engine import TrainingEngine

ENGINE_TAG = "state"


@dataclass
class CheckpointMeta:
    step: int
    data: DataPosition
    config: dict
    padded_vocab_size: int
    mlflow_run_id: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "CheckpointMeta":
        raw = json.loads((folder / META_FILE).read_text())
        raw["data"] = DataPosition(**raw["data"])
        return cls(**raw)


def save_checkpoint(folder: Path, engine: TrainingEngine, meta: CheckpointMeta,
                    tokenizer_json: str | None = None) -> Path:
    """Write this rank's part of the checkpoint for ``meta.step`` into ``folder``."""
    topology = engine.topology
    folder.mkdir(parents=True, exist_ok=True)
    engine.engine.save_checkpoint(str(folder / ENGINE_DIR), tag=ENGINE_TAG)
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(engine.rng_states(), folder / RNG_DIR / f"rank-{topology.rank:05d}.pt")
    if topology.dp_index == 0:
        (folder / MODEL_DIR).mkdir(exist_ok=True)
        splits = {name: list(split) for name, split in engine.tp_splits().items()}
        save_file(engine.gpt_state(), folder / shard_file(topology.pp_index, topology.tp_index),
                  metadata={"tp_split": json.dumps(splits), "tp": str(topology.layout.tp)})
    if topology.rank == 0:
        (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        if engine.cfg.model.init_from:
            copy_model_files(local_folder(engine.cfg.model.init_from, engine.cfg.tracking), folder)
        if tokenizer_json:  # the run's own tokenizer wins over the imported one
            (folder / TOKENIZER_FILE).write_text(tokenizer_json)
    return folder


def copy_model_files(source: Path, folder: Path) -> list[str]:
    """Copy those of MODEL_FILES that ``source`` has into ``folder``; returns their names."""
    copied = [name for name in MODEL_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    return copied


def load_checkpoint(folder: Path, engine: TrainingEngine, batches: StepBatches) -> CheckpointMeta:
    """Restore engine, RNG and data position from a complete checkpoint folder."""
    meta = CheckpointMeta.read(folder)
    engine.engine.load_checkpoint(str(folder / ENGINE_DIR), tag=ENGINE_TAG)
    engine.set_rng_states(torch.load(folder / "rng" / f"rank-{engine.topology.rank:05d}.pt", weights_only=False))
    batches.seek(meta.data)
    return meta
