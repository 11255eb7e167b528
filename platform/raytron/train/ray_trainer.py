"""Ray Train wiring: a TorchTrainer of dp x pp x tp workers, each running the training loop."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.data import Dataset
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution import context as train_context_module

from raytron.config import RaytronConfig, build_config
from raytron.export.from_checkpoint import ExportResult
from raytron.parallel.topology import Topology
from raytron.storage import check_writable, filesystem_for, is_remote, list_dirs
from raytron.train.batches import BlockSource
from raytron.train.checkpoint import META_FILE
from raytron.train.cluster import ensure_resources, reporting_scale_up, worker_resources
from raytron.train.fault_injection import ENV_VAR as FAULT_ENV_VAR
from raytron.tracking.metric_sender import BackgroundMetricSender
from raytron.tracking.mlflow_run import RunTracker, resolve_tracking_uri
from raytron.train.placement import ARTIFACT as PLACEMENT_ARTIFACT
from raytron.train.placement import PlacementError, gather_placement
from raytron.train.ray_data_actors import start_ray_data_actors_here
from raytron.train.progress import ProgressLine
from raytron.train.prometheus import TrainingGauges
from raytron.train.ray_session import RayDatasetSource, RaySession

progress_log = logging.getLogger("raytron.progress")
"""Rank 0's progress lines. Through a logger, not print: Ray Train patches print in its workers to log
*and*, whenever sys.stdout is wrapped (as in a `ray job submit` driver's workers), print again, so a
printed line reached the console twice; Train's root-logger handlers give it once, to the console and
its worker log file."""


class TrainingStopped(RuntimeError):
    pass


@dataclass
class TrainingResult:
    run_name: str
    metrics: dict
    """The last step's metrics (rank 0)."""
    checkpoint: ray.train.Checkpoint | None
    storage_path: str
    export: ExportResult | None = None
    """The ExportResult when train.export is on."""


def _worker(payload: dict) -> dict:
    # imported here, in the worker: the driver never needs DeepSpeed (~2 s of CPU at start-up)
    import deepspeed

    from raytron.train.loop import NonFiniteLoss, train

    cfg = build_config(payload["config"])
    # Ray Train logs every report's repr at INFO from every worker; rank 0's progress line says it once, readably
    logging.getLogger(train_context_module.__file__).setLevel(logging.WARNING)
    context = ray.train.get_context()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # PipelineModule requires it
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.resources.gpus_per_worker > 0 else "gloo")
    topology = Topology.from_world(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp)
    rank = context.get_world_rank()
    placement = gather_placement(topology.layout, ray.get_runtime_context().get_node_id())
    if rank == 0 and payload.get("mlflow_run_id"):
        RunTracker.attach(payload["tracking_uri"], payload["mlflow_run_id"]).log_dict(placement.to_dict(),
                                                                                      PLACEMENT_ARTIFACT)
    try:
        placement.require_tp_within_nodes()
    except PlacementError as error:
        return {"stopped": str(error)}  # every rank sees the same placement and stops; a retry would not help
    session = RaySession(rank, _rank_zero_publisher(payload, cfg) if rank == 0 else None, payload.get("fault"))
    try:
        return train(cfg, topology, session, _source(payload, "train"), _source(payload, "validation"),
                     payload.get("tokenizer_json"), payload.get("mlflow_run_id"), payload.get("data_manifest_hash"))
    except NonFiniteLoss as error:
        # returned, not raised: a retry from the last checkpoint would only meet it again
        return {"stopped": str(error)}


def _source(payload: dict, split: str) -> BlockSource | None:
    """A split's BlockSource: given as one (prepared shards), or a Ray Dataset handed to Ray Train."""
    if split in payload["sources"]:
        return payload["sources"][split]
    if split in payload["datasets"]:
        return RayDatasetSource(ray.train.get_dataset_shard(split))
    return None


def _rank_zero_publisher(payload: dict, cfg: RaytronConfig):
    """Rank 0 alone sends metrics to MLflow (the driver's run) and Prometheus. The gauges are set every
    step; MLflow gets every step's metrics in one request per log/checkpoint step (and the last), sent
    from a background thread so no step waits on the tracking server; the last step waits for them."""
    gauges = TrainingGauges(payload["run_name"])
    progress = ProgressLine(cfg.train.steps, f"[{payload['run_name']}] ")
    sender = None
    if payload.get("mlflow_run_id"):
        sender = BackgroundMetricSender(RunTracker.attach(payload["tracking_uri"], payload["mlflow_run_id"]))
    pending: list[tuple[dict, int, int]] = []

    def publish(metrics: dict, step: int) -> None:
        gauges.publish(metrics)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            progress_log.info(progress.line(metrics))
        if sender is None:
            return
        pending.append((metrics, step, int(time.time() * 1000)))
        if step == cfg.train.steps or "checkpoint_time_s" in metrics or step % cfg.train.log_every == 0:
            sender.send(pending)
            pending.clear()
        if step == cfg.train.steps:
            sender.drain()
    return publish


def resolve_run_name(cfg: RaytronConfig, storage: str, resume: bool) -> str:
    """A fresh run gets a new timestamped name; --resume picks the newest run of this config's name."""
    if resume:
        previous = [name for name in list_dirs(storage) if name.startswith(f"{cfg.name}-")]
        if not previous:
            raise TrainingStopped(f"--resume: no earlier run named {cfg.name}-* under {storage}")
        return previous[-1]
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_checkpoint_meta(storage: str, run_name: str) -> dict | None:
    """meta.json of a run's newest checkpoint (read before workers start: it names the MLflow run)."""
    run_url = f"{storage.rstrip('/')}/{run_name}"
    checkpoints = [name for name in list_dirs(run_url) if name.startswith("checkpoint_")]
    if not checkpoints:
        return None
    filesystem, run_path = filesystem_for(run_url)
    with filesystem.open_input_stream(f"{run_path}/{checkpoints[-1]}/{META_FILE}") as stream:
        return json.loads(stream.read())


def fit(cfg: RaytronConfig, train_data: Dataset | BlockSource, validation_data: Dataset | BlockSource | None = None,
        resume: bool = False, tokenizer_json: str | None = None, mlflow_run_id: str | None = None,
        run_name: str | None = None, data_manifest_hash: str | None = None,
        callbacks: list | None = None) -> TrainingResult:
    """Train on an already connected Ray cluster. Each split is a Ray Dataset of packed blocks (read whole by
    every DP reader, in order) or a BlockSource that splits by DP group itself (prepared shards, streaming).
    ``run_name`` pins the run folder (tests, Tune); ``callbacks`` are Ray Train callbacks (Tune's
    TuneReportCallback for a trial)."""
    capacity = ensure_resources(cfg)
    storage = cfg.train.storage_path
    check_writable(storage)
    name = run_name or resolve_run_name(cfg, storage, resume)
    filesystem, storage_inside = filesystem_for(storage)
    splits = {"train": train_data, "validation": validation_data}
    datasets = {name: data for name, data in splits.items() if isinstance(data, Dataset)}
    sources = {name: data for name, data in splits.items() if data is not None and name not in datasets}
    use_gpu = cfg.resources.gpus_per_worker > 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "datasets": list(datasets), "sources": sources,
                           "tokenizer_json": tokenizer_json, "mlflow_run_id": mlflow_run_id,
                           "data_manifest_hash": data_manifest_hash,
                           "tracking_uri": resolve_tracking_uri(cfg.tracking), "run_name": name,
                           "fault": os.environ.get(FAULT_ENV_VAR)},
        scaling_config=ScalingConfig(
            num_workers=cfg.world_size, use_gpu=use_gpu, resources_per_worker=worker_resources(cfg),
            accelerator_type=cfg.resources.accelerator_type),
        run_config=RunConfig(
            name=name, storage_path=storage_inside,
            storage_filesystem=filesystem if is_remote(storage) else None,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets=datasets,
        # every DP reader walks a Ray Dataset whole and keeps its slice of each global batch
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    start_ray_data_actors_here()  # else a worker starts them on its autoscaled node, which then never scales down
    with reporting_scale_up(cfg, capacity):
        result = trainer.fit()
    metrics = result.return_value or {}
    if "stopped" in metrics:
        raise TrainingStopped(metrics["stopped"])
    return TrainingResult(name, metrics, result.checkpoint, storage)
