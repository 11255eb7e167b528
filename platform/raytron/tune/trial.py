"""One Tune trial: the same training `raytron train` runs, for one point of the search space.

Under Ray 2.60 (Train V2) a trial is a function that builds and fits a TorchTrainer; Tune cannot take the
trainer itself. Ray Train's ``TuneReportCallback`` forwards rank 0's reports (every log and checkpoint
step, each carrying ``step``) to Tune, where the scheduler sees them. The trial's Ray Train run is named by
its Tune trial id under ``<train.storage_path>/<tune.name>``, so after ``Tuner.restore`` reruns this
function, Ray Train finds the trial's checkpoints and continues from the latest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raytron.train.ray_trainer import fit
from raytron.train.run import TrainingData
from raytron.tune.space import trial_config, trial_overrides
from raytron.tune.tracking import ERROR_TAG, open_child_run

ERROR_TAG_CHARS = 4000


@dataclass
class SweepContext:
    """What every trial shares (travels to the trial actors through ``tune.with_parameters``)."""

    base: dict[str, Any]
    """The sweep's resolved config."""
    sweep: str
    experiment_url: str
    """<train.storage_path>/<tune.name>: the Tune experiment, and the trials' Ray Train runs inside it."""
    data: TrainingData
    """Prepared once by the driver; every trial reads the same shards."""
    parent_run_id: str | None


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(context.base, {**trial_overrides(config), "name": f"{context.sweep}-{trial_id}",
                                      "train.storage_path": context.experiment_url}, f"trial {trial_id}")
    tracker = open_child_run(cfg, context.parent_run_id, context.sweep, trial_id) if context.parent_run_id else None
    data = context.data
    try:
        fit(cfg, data.train, data.validation, tokenizer_json=data.tokenizer_json,
            mlflow_run_id=tracker.run_id if tracker else None, run_name=trial_id,
            data_manifest_hash=data.manifest_hash, callbacks=[TuneReportCallback()])
    except Exception as error:
        # the driver's ChildRunStatus callback sets the run's status; the error text is only known here
        if tracker is not None:
            tracker.set_tags({ERROR_TAG: str(error)[:ERROR_TAG_CHARS]})
        raise
