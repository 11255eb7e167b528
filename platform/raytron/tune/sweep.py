"""``raytron tune``: validate every trial, connect, prepare the data once, run the trials through Ray Tune,
rank them, log the sweep to MLflow and optionally export the best (the scheduler: tune/scheduler.py).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from raytron.config import ConfigError, RaytronConfig
from raytron.export.from_checkpoint import ExportResult, RegistrationError
from raytron.storage import StorageError, filesystem_for, is_remote, join_url
from raytron.train.cluster import ResourceError, connect
from raytron.train.ray_data_actors import start_ray_data_actors_here
from raytron.train.run import training_data
from raytron.tracking.mlflow_run import resolve_tracking_uri
from raytron.tune.capacity import TRIAL_ACTOR_CPUS, concurrent_trials, require_hostable
from raytron.tune.export_best import ExportBestError, export_best_trial
from raytron.tune.layouts import layout_sweep
from raytron.tune.scheduler import scheduler_for
from raytron.tune.space import param_space, planned_steps, sweep_name, trial_overrides, validate_sweep
from raytron.tune.state import SweepState, SweepStateError, read_sweep_state, write_sweep_state
from raytron.tune.tracking import ChildRunStatus, best_value, find_child_run, log_sweep_results, open_parent_run
from raytron.tune.trial import SweepContext, run_trial

log = logging.getLogger(__name__)

REPORTED_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_worker", "tflops_per_worker",
                    "mfu", "step_time_s", "data_wait_share", "val_loss", "val_perplexity")
"""What the training loop reports (train/metrics.py, train/loop.py): a sweep can rank by these."""
EVERY_REPORT_METRICS = ("loss", "lr", "tokens_per_s", "tokens_per_s_per_worker", "tflops_per_worker",
                        "step_time_s", "data_wait_share")
"""Present in every report; the others (validation only on eval steps, MFU only on GPUs) are not."""


EXPERIMENT_STATE_PERIOD_S = "2"
"""How often Tune saves the experiment's state (its default, "auto", can wait minutes): a driver killed between
two saves resumes from the older one and reruns what finished since (a finished Ray Train run returns at once)."""


class SweepError(RuntimeError):
    pass


EXPECTED_ERRORS = (SweepError, SweepStateError, ResourceError, StorageError, ExportBestError, RegistrationError)
"""What `raytron tune` reports as one line (a bad config raises ConfigError, which the CLI reports too)."""


@dataclass
class SweepResult:
    name: str
    experiment_url: str
    rows: list[dict[str, Any]]
    """One per trial, best first: trial_id, the swept values, status, step, the best metric, run_id."""
    best: dict[str, Any] | None
    parent_run_id: str | None
    tracking_uri: str
    export: ExportResult | None = field(default=None)


def absolute_storage(url: str) -> str:
    """Trial actors and Train workers change into their trial folders: a relative path would move with them."""
    return url if is_remote(url) else str(Path(url).expanduser().absolute())


def check_metric(cfg: RaytronConfig) -> None:
    if cfg.tune.metric not in REPORTED_METRICS:
        raise ConfigError(f"tune.metric: {cfg.tune.metric!r} is not reported by training "
                          f"(one of {', '.join(REPORTED_METRICS)})")
    if cfg.tune.metric not in EVERY_REPORT_METRICS:
        # Tune would otherwise fail every report that lacks it (the steps between evaluations)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


def run_sweep(cfg: RaytronConfig, resume: bool = False, workdir: str | Path = ".raytron") -> SweepResult:
    layouts = []
    if cfg.tune.layouts == "auto":
        cfg, layouts = layout_sweep(cfg)
    check_metric(cfg)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)
    configs = validate_sweep(cfg, layouts)  # before anything starts: an impossible point fails here
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"storage_path": absolute_storage(cfg.train.storage_path)})})
    name, storage = sweep_name(cfg), cfg.train.storage_path
    experiment_url = join_url(storage, name)
    # a local cluster started here is sized for the trials that run at once, not for one trial
    at_once = cfg.tune.max_concurrent_trials or 1
    connect(cfg.model_copy(update={"resources": cfg.resources.model_copy(
        update={"cpus_per_worker": cfg.resources.cpus_per_worker * at_once})}))
    require_hostable(configs)
    filesystem, storage_inside = filesystem_for(storage)
    filesystem = filesystem if is_remote(storage) else None
    experiment_path = experiment_url if is_remote(storage) else str(Path(storage_inside) / name)
    exists = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if exists and not resume:
        raise SweepError(f"a sweep named {name} exists at {experiment_url}: pass --resume to continue it, "
                         "or set tune.name to start another")
    if resume and not exists:
        raise SweepError(f"--resume: no sweep named {name} at {experiment_url}")
    previous = read_sweep_state(cfg, experiment_url) if resume else None
    if previous is not None and previous.workdir != str(Path(workdir).absolute()):
        log.info("--resume: reading the data from the first driver's workdir %s", previous.workdir)
    workdir = Path(previous.workdir) if previous is not None else Path(workdir).absolute()
    data = training_data(cfg, workdir)  # once, for every trial
    if previous is not None and previous.data_fingerprint != data.manifest_hash:
        raise SweepError(f"--resume: the data changed since the sweep started (fingerprint "
                         f"{previous.data_fingerprint[:12]} then, {data.manifest_hash[:12]} now); the trials' "
                         "checkpoints index the old data: start another sweep with a new tune.name")
    parent = open_parent_run(cfg, name, previous.parent_run_id if previous is not None else None)
    if previous is None:  # before Tune writes its experiment: a sweep that can be resumed has its state
        write_sweep_state(cfg, experiment_url, SweepState(parent.run_id, str(workdir), data.manifest_hash))
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    context = SweepContext(cfg.to_dict(), name, experiment_url, data, parent.run_id)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_ACTOR_CPUS})
    if resume:
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
    else:
        callbacks = [ChildRunStatus(tracking_uri, parent.run_id, cfg.train.steps)] if parent.run_id else []
        limit = cfg.tune.max_concurrent_trials or concurrent_trials(configs, ray.cluster_resources())
        log.info("up to %d trials at once", limit)
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg, layouts),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                        scheduler=scheduler_for(cfg, max(c.train.steps for c in configs)),
                                        max_concurrent_trials=limit),
            run_config=tune.RunConfig(name=name, storage_path=storage_inside, storage_filesystem=filesystem,
                                      callbacks=callbacks, failure_config=tune.FailureConfig(max_failures=0)))
    start_ray_data_actors_here()  # before trial actors, which may sit on autoscaled nodes, start them there
    try:
        grid = tuner.fit()
    except BaseException:
        parent.finish("FAILED")
        raise
    if grid.num_terminated + grid.num_errors < len(grid):  # Tune returns early on SIGINT, trials unfinished
        parent.finish("KILLED")
        raise SweepError(f"sweep {name} interrupted with trials unfinished: pass --resume to continue it")
    rows = ranked_rows(grid, cfg, tracking_uri, parent.run_id)
    best = rows[0] if rows and rows[0][cfg.tune.metric] is not None else None
    log_sweep_results(parent, rows, cfg.tune.metric, best)
    result = SweepResult(name, experiment_url, rows, best, parent.run_id, tracking_uri)
    if cfg.tune.export_best and best is not None:
        result.export = export_best_trial(cfg, experiment_url, best, parent.run_id, workdir)
    parent.finish("FINISHED")
    return result


def ranked_rows(grid, cfg: RaytronConfig, tracking_uri: str, parent_run_id: str | None) -> list[dict[str, Any]]:
    """A row per trial, the best metric over all its reports, best trial first (trials without one last)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = list(history[metric]) if history is not None and metric in history else []
        steps = list(history["step"]) if history is not None and "step" in history else []
        best = best_value(values, mode)
        at = steps[values.index(best)] if best is not None else None
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        overrides = trial_overrides(result.config)
        last_step = int(max(steps)) if steps else 0
        finished = last_step >= planned_steps(result.config, cfg.train.steps)
        status = "FAILED" if result.error else ("FINISHED" if finished else "KILLED")
        rows.append({"trial_id": trial_id, **overrides, "status": status, "step": last_step, metric: best,
                     "best_step": None if at is None or math.isnan(at) else int(at),
                     "run_id": find_child_run(tracking_uri, parent_run_id, trial_id) if parent_run_id else None})
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda row: (row[metric] is None, sign * (row[metric] or 0.0)))
