"""``raytron export``: a training checkpoint -> a Hugging Face folder -> an MLflow model version.

The folder is the export: what `transformers` loads, the tokenizer, and ``raytron.json``
(the run's full config and where the weights came from). Registration logs the folder to
the training run (the run id in the checkpoint's meta.json; a new run of the config's name
when the checkpoint has none) and registers a version of ``tracking.registered_model_name``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from tokenizers import Tokenizer

from raytron.config import RaytronConfig
from raytron.data.tokenizer import special_token_ids
from raytron.export.consolidate import TOKENIZER_FILE, ConsolidatedCheckpoint, consolidate_checkpoint, local_checkpoint
from raytron.export.huggingface import export_huggingface
from raytron.tracking.mlflow_run import (CONFIG_HASH_TAG, DATA_MANIFEST_TAG, RunTracker, register_model_version,
                                         resolve_tracking_uri)

LINEAGE_FILE = "raytron.json"
CHECKPOINT_STEP_TAG = "raytron.checkpoint_step"
BASE_MODEL_TAG = "raytron.base_model"
"""On a version fine-tuned from another model: the run's model.init_from (folder, s3://, models:/ or checkpoint)."""
NO_MANIFEST = "none"
"""Data manifest hash of runs whose data had no manifest."""


class RegistrationError(RuntimeError):
    pass


@dataclass
class ExportResult:
    folder: Path
    """The Hugging Face folder."""
    lineage: dict
    """What ``raytron.json`` records besides the config: run id, config hash, step, data manifest."""
    model_version: ModelVersion | None = None
    """The registered version; None with register=False."""


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, register: bool = True) -> ExportResult:
    """Consolidate ``checkpoint`` (local folder or s3:// URL, any dp/pp/tp), write the Hugging Face
    folder to ``out_dir`` and, when ``register``, register it in MLflow (failures raise RegistrationError)."""
    with local_checkpoint(checkpoint) as folder:
        consolidated = consolidate_checkpoint(folder)
        tokenizer = folder / TOKENIZER_FILE
        tokenizer_path = tokenizer if tokenizer.is_file() else None
        eos = special_token_ids(Tokenizer.from_file(str(tokenizer))).eos if tokenizer_path else None
        out = export_huggingface(consolidated.state, out_dir, tokenizer_path, cfg=consolidated.config.model,
                                 eos_token_id=eos, model_files=folder)
    lineage = _lineage(consolidated, str(checkpoint))
    (out / LINEAGE_FILE).write_text(json.dumps({"config": consolidated.meta.config, "lineage": lineage}, indent=2)
                                    + "\n")
    result = ExportResult(out, lineage)
    if register:
        result.model_version = _register(consolidated, out, lineage)
    return result


def _lineage(consolidated: ConsolidatedCheckpoint, checkpoint: str) -> dict:
    meta = consolidated.meta
    return {"checkpoint": checkpoint, "checkpoint_step": meta.step, "mlflow_run_id": meta.mlflow_run_id,
            "config_hash": consolidated.config.digest(), "padded_vocab_size": meta.padded_vocab_size,
            "data_manifest_hash": meta.extra.get("data_manifest_hash", NO_MANIFEST),
            # the model it started from (model.init_from), None when trained from scratch
            "base_model": consolidated.config.model.init_from}


def _register(consolidated: ConsolidatedCheckpoint, folder: Path, lineage: dict) -> ModelVersion:
    cfg = consolidated.config
    name = cfg.tracking.registered_model_name
    tags = {CONFIG_HASH_TAG: lineage["config_hash"], DATA_MANIFEST_TAG: lineage["data_manifest_hash"],
            CHECKPOINT_STEP_TAG: str(lineage["checkpoint_step"])}
    if lineage["base_model"]:
        tags[BASE_MODEL_TAG] = lineage["base_model"]
    try:
        if lineage["mlflow_run_id"] is not None:
            return register_model_version(lineage["mlflow_run_id"], folder, name, tags, tracking_cfg=cfg.tracking)
        return _register_in_new_run(cfg, folder, name, tags)
    except Exception as error:  # whatever MLflow raised, say what was being done and where
        raise RegistrationError(f"{folder} was written, but registering it as {name} at "
                                f"{resolve_tracking_uri(cfg.tracking)} failed: {error}") from error


def _register_in_new_run(cfg: RaytronConfig, folder: Path, name: str, tags: dict[str, str]) -> ModelVersion:
    """An untracked training run (no MLflow run id in its checkpoint): the export gets a run of its own."""
    tracker = RunTracker.start(cfg)
    if tracker.run_id is None:
        raise RegistrationError("no MLflow run could be started (the warning above says why)")
    try:
        version = register_model_version(tracker, folder, name, tags)
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return version
