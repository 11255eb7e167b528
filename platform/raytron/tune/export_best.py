"""``tune.export_best``: the best trial's final checkpoint -> Hugging Face folder -> a registered model version
whose tags name the sweep, the trial and the runs (the export's own lineage tags come on top)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from raytron.config import RaytronConfig
from raytron.export.from_checkpoint import ExportResult, export_checkpoint
from raytron.storage import join_url, list_dirs
from raytron.tracking.mlflow_run import resolve_tracking_uri
from raytron.tune.space import sweep_name
from raytron.tune.tracking import SWEEP_TAG, TRIAL_TAG

PARENT_RUN_TAG = "raytron.tune.parent_run_id"


class ExportBestError(RuntimeError):
    pass


def export_best_trial(cfg: RaytronConfig, experiment_url: str, best: dict[str, Any], parent_run_id: str | None,
                      workdir: Path) -> ExportResult:
    trial_id, sweep = best["trial_id"], sweep_name(cfg)
    run_url = join_url(experiment_url, trial_id)
    checkpoints = [name for name in list_dirs(run_url) if name.startswith("checkpoint_")]
    if not checkpoints:
        raise ExportBestError(f"tune.export_best: the best trial {trial_id} left no checkpoint under {run_url}")
    result = export_checkpoint(join_url(run_url, checkpoints[-1]), workdir / "exports" / f"{sweep}-{trial_id}")
    version = result.model_version
    if version is not None:  # the version is registered in the trial's child run; these name the sweep too
        client = MlflowClient(resolve_tracking_uri(cfg.tracking))
        for key, value in {SWEEP_TAG: sweep, TRIAL_TAG: trial_id, PARENT_RUN_TAG: parent_run_id or ""}.items():
            client.set_model_version_tag(version.name, version.version, key, value)
    return result
