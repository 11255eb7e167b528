"""A sweep in MLflow: one parent run, one child run per trial (tag ``mlflow.parentRunId``).

Tune's MLflowLoggerCallback is not used: it makes new runs when a sweep is restored and does not nest.
Instead runs are found again by tags: the parent by the id saved beside the Tune experiment
(raytron.tune.state), a child by its parent and its Tune trial id (stable across ``Tuner.restore``). So a
resumed sweep continues the same runs. The trial function opens its child run and the training workers
log every step into it; the driver's ``ChildRunStatus`` callback ends it, because a trial that ASHA stops
is an actor Tune kills: it cannot end its own run.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray.tune import Callback

from raytron.config import RaytronConfig
from raytron.tracking.mlflow_run import RunTracker, resolve_tracking_uri
from raytron.tune.space import planned_steps

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "raytron.tune.sweep"
TRIAL_TAG = "raytron.tune.trial_id"
STOPPED_AT_TAG = "raytron.tune.stopped_at_step"
ERROR_TAG = "raytron.tune.error"
BEST_TRIAL_TAG = "raytron.tune.best_trial_id"
BEST_RUN_TAG = "raytron.tune.best_run_id"
RESULTS_ARTIFACT = "tune_results.json"


def open_parent_run(cfg: RaytronConfig, sweep: str, previous_run_id: str | None) -> RunTracker:
    """The sweep's parent run: a new one, or (on resume) the one the first driver started."""
    tracker = RunTracker.start(cfg.model_copy(update={"name": sweep}), run_id=previous_run_id)
    tune = cfg.tune
    tracker.set_tags({SWEEP_TAG: sweep, "raytron.tune.scheduler": tune.scheduler, "raytron.tune.metric": tune.metric,
                      "raytron.tune.mode": tune.mode,
                      "raytron.tune.search_space": json.dumps(
                          {key: {dist.kind: list(dist.values)} for key, dist in tune.search_space.items()})})
    return tracker


def find_child_run(tracking_uri: str, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], max_results=1,
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                            f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


def open_child_run(cfg: RaytronConfig, parent_run_id: str, sweep: str, trial_id: str) -> RunTracker:
    """The trial's child run (params: the trial's whole flattened config), continued if it exists."""
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    existing = find_child_run(tracking_uri, parent_run_id, trial_id)
    if existing is None:
        client = MlflowClient(tracking_uri)
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        # the tags go in with the run, so a driver killed right after still finds it on resume
        existing = client.create_run(experiment_id, run_name=cfg.name, tags={
            PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id}).info.run_id
    return RunTracker.start(cfg, run_id=existing)


class ChildRunStatus(Callback):
    """Ends each trial's child run: FINISHED at train.steps, KILLED (with the step) when the scheduler stopped it
    earlier, FAILED when it errored. Holds only strings, so Tune can pickle it with the experiment."""

    def __init__(self, tracking_uri: str, parent_run_id: str, default_steps: int):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.default_steps = default_steps

    def _end(self, trial, status: str, tags: dict[str, str]) -> None:
        run_id = find_child_run(self.tracking_uri, self.parent_run_id, trial.trial_id)
        if run_id is None:
            return
        tracker = RunTracker.attach(self.tracking_uri, run_id)
        if tags:
            tracker.set_tags(tags)
        tracker.finish(status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        step = int((trial.last_result or {}).get("step", 0))
        if step < planned_steps(trial.config, self.default_steps):
            self._end(trial, "KILLED", {STOPPED_AT_TAG: str(step)})
        else:
            self._end(trial, "FINISHED", {})

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        step = int((trial.last_result or {}).get("step", 0))
        self._end(trial, "FAILED", {STOPPED_AT_TAG: str(step)})


def best_value(values: list[float], mode: str) -> float | None:
    finite = [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]
    if not finite:
        return None
    return min(finite) if mode == "min" else max(finite)


def log_sweep_results(parent: RunTracker, rows: list[dict[str, Any]], metric: str, best: dict[str, Any] | None) -> None:
    """The results table as an artifact, and the best trial as tags and a metric on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RESULTS_ARTIFACT).write_text(json.dumps(rows, indent=1, default=str) + "\n")
        parent.log_artifacts(tmp)
    if best is not None:
        parent.set_tags({BEST_TRIAL_TAG: best["trial_id"], BEST_RUN_TAG: best.get("run_id") or ""})
        parent.log_metrics({f"best_{metric}": best[metric]}, step=int(best.get("step") or 0))
