"""``raytron train``: connect to Ray, bring the data, open the MLflow run, fit, optionally export."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from raytron.config import RaytronConfig
from raytron.data.manifest import fingerprint
from raytron.data.prepare import identity, prepare
from raytron.data.sources import list_sources
from raytron.data.tokenizer_source import resolve_tokenizer
from raytron.export.from_checkpoint import export_checkpoint
from raytron.parallel.hf_import import check_init_from
from raytron.storage import checkpoint_url, join_url, read_bytes
from raytron.train.batches import BlockSource
from raytron.train.checkpoint import TOKENIZER_FILE
from raytron.tracking.mlflow_run import DATA_MANIFEST_TAG, RunTracker
from raytron.train.cluster import connect
from raytron.train.ray_trainer import TrainingResult, TrainingStopped, fit, latest_checkpoint_meta, resolve_run_name
from raytron.train.shard_source import PreparedShards
from raytron.train.stream_source import StreamingCorpus

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: BlockSource
    validation: BlockSource | None
    tokenizer_json: str
    manifest_hash: str


def prepared_training_data(cfg: RaytronConfig, workdir: Path) -> TrainingData:
    """Prepare data.source (or reuse its prepared shards) and read the splits from the shards."""
    prepared = prepare(cfg, workdir)
    manifest, data = prepared.manifest, cfg.data
    if manifest.vocab_size > cfg.model.vocab_size:  # a smaller tokenizer leaves rows unused, which is fine
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} but the tokenizer of {prepared.url} "
                         f"has {manifest.vocab_size} tokens, more than the embedding has rows")

    evaluated = cfg.train.eval_every and cfg.data.validation_fraction
    for split in ("train", "validation") if evaluated else ("train",):
        require_one_global_batch(cfg, split, manifest.splits[split].rows if split in manifest.splits else 0)

    def source(split: str) -> PreparedShards | None:
        info = manifest.splits.get(split)
        if info is None or info.rows == 0:
            return None
        return PreparedShards([(shard.url, shard.rows) for shard in info.shards], data.shuffle_seed,
                              cfg.train.seq_len + 1, data.endpoint_url, data.region)
    tokenizer_json = read_bytes(join_url(prepared.url, TOKENIZER_FILE), data.endpoint_url, data.region).decode()
    return TrainingData(source("train"), source("validation"), tokenizer_json, manifest.fingerprint)


def require_one_global_batch(cfg: RaytronConfig, split: str, rows: int) -> None:
    """Fail before any worker starts when a split cannot fill one step's blocks: the step (or, for
    validation, the evaluation at the last step) would otherwise fail only after training."""
    train, dp, needed = cfg.train, cfg.parallel.dp, cfg.global_batch_size
    if rows < needed:
        knob = ("data.validation_fraction (or set train.eval_every=0)" if split == "validation"
                else "the corpus")
        raise ValueError(f"the {split} split holds {rows} blocks of train.seq_len+1={train.seq_len + 1} tokens, "
                         f"fewer than one global batch of {needed} (train.micro_batch_size {train.micro_batch_size} "
                         f"x train.grad_accum_steps {train.grad_accum_steps} x parallel.dp {dp}): "
                         f"raise {knob} or lower those")


def streaming_training_data(cfg: RaytronConfig, workdir: Path) -> TrainingData:
    """The raw files, tokenized and packed by each DP reader as it trains (no prepared shards)."""
    files = list_sources(cfg, workdir)
    tokenizer = resolve_tokenizer(cfg, files)
    validation = StreamingCorpus(cfg, files, "validation", tokenizer) if cfg.data.validation_fraction else None
    return TrainingData(StreamingCorpus(cfg, files, "train", tokenizer), validation, tokenizer.json,
                        fingerprint({"mode": "streaming", **identity(cfg, files, tokenizer)}))


def training_data(cfg: RaytronConfig, workdir: Path) -> TrainingData:
    if cfg.data.mode == "streaming":
        return streaming_training_data(cfg, workdir)
    return prepared_training_data(cfg, workdir)


def run_training(cfg: RaytronConfig, resume: bool = False, workdir: str | Path = ".raytron") -> TrainingResult:
    check_init_from(cfg)  # a bad model.init_from fails here, before Ray, data or workers
    connect(cfg)
    data = training_data(cfg, Path(workdir).absolute())
    name = resolve_run_name(cfg, cfg.train.storage_path, resume)
    previous = latest_checkpoint_meta(cfg.train.storage_path, name) if resume else None
    trained_on = (previous or {}).get("extra", {}).get("data_manifest_hash", data.manifest_hash)
    if trained_on != data.manifest_hash:
        # the saved data position indexes the old data: resuming on other data would repeat or skip blocks
        raise TrainingStopped(f"--resume: the data changed since run {name}'s checkpoint (data fingerprint "
                              f"{trained_on[:12]} then, {data.manifest_hash[:12]} now); start a new run")
    # a resumed training run continues its MLflow run
    tracker = RunTracker.start(cfg, run_id=(previous or {}).get("mlflow_run_id"))
    tracker.set_tags({DATA_MANIFEST_TAG: data.manifest_hash})
    try:
        result = fit(cfg, data.train, data.validation, resume=resume, tokenizer_json=data.tokenizer_json,
                     mlflow_run_id=tracker.run_id, run_name=name, data_manifest_hash=data.manifest_hash)
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
