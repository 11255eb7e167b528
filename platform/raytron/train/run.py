"""``raytron train``: connect to Ray, bring the data, open the MLflow run, fit, optionally export."""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from raytron.config import RaytronConfig
from raytron.data.demo_data import demo_data
from raytron.export.from_checkpoint import export_checkpoint
from raytron.storage import checkpoint_url
from raytron.tracking.mlflow_run import RunTracker
from raytron.train.cluster import connect
from raytron.train.ray_trainer import TrainingResult, fit, latest_checkpoint_meta, resolve_run_name

log = logging.getLogger(__name__)

def training_datasets(cfg: RaytronConfig, workdir: Path):
    """(train, validation, tokenizer path) as Ray Datasets of packed blocks."""
    if cfg.data.source != "demo":
        raise NotImplementedError(
            f"data.source: {cfg.data.source!r} needs `raytron prepare` (data pipeline issue); use 'demo' for now")
    data = demo_data(workdir, cfg.data.demo_corpus_bytes, cfg.model.vocab_size, cfg.train.seq_len,
                     cfg.data.validation_fraction)
    if data.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} but the tokenizer has {data.vocab_size} tokens")

    # per-step iteration would redraw a bar per dataset on every step: noise, not progress
    ray.data.DataContext.get_current().enable_progress_bars = False

    def as_dataset(blocks):
        return ray.data.from_items([{"tokens": row, "id": index} for index, row in enumerate(blocks)])
    return as_dataset(data.train_blocks), as_dataset(data.validation_blocks), str(data.tokenizer_path)


def run_training(cfg: RaytronConfig, resume: bool = False, workdir: str | Path = ".raytron") -> TrainingResult:
    connect(cfg)
    train_ds, validation_ds, tokenizer_path = training_datasets(cfg, Path(workdir).absolute())
    name = resolve_run_name(cfg, cfg.train.storage_path, resume)
    previous = latest_checkpoint_meta(cfg.train.storage_path, name) if resume else None
    # a resumed training run continues its MLflow run
    tracker = RunTracker.start(cfg, run_id=(previous or {}).get("mlflow_run_id"))
    try:
        result = fit(cfg, train_ds, validation_ds, resume=resume, tokenizer_path=tokenizer_path,
                     mlflow_run_id=tracker.run_id, run_name=name)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    if tracker.errors:
        log.warning("%d MLflow calls failed during this run (training was not affected)", tracker.errors)
    if cfg.train.export and result.checkpoint is not None:
        result.export = export_checkpoint(checkpoint_url(cfg.train.storage_path, result.checkpoint.path),
                                          Path(workdir).absolute() / "exports" / result.run_name)
    return result
