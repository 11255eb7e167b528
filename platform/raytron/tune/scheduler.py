"""The sweep's trial scheduler: FIFO, or ASHA counting optimizer steps.

ASHA counts ``time_attr="step"``, the step each report carries, not Tune's report count:
``Tuner.restore`` drops the scheduler's state and restarts ``training_iteration``, while the step a
resumed trial reports continues from its checkpoint.

A trial's last report is never answered with STOP (Ray's ASHA stops every trial that reaches ``max_t``,
and a cut at a rung on the last step is no saving). A STOP makes Tune kill the trial actor, and with it
the trial's Ray Train controller while it is still shutting down: its final MLflow metrics may be lost and
its workers' placement group outlives it until Ray Train's cleaner notices (which needs the State API).
A trial left to finish returns from ``fit`` with its placement group released.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from raytron.config import RaytronConfig
from raytron.tune.space import planned_steps


class StepASHA(ASHAScheduler):
    """ASHA over optimizer steps that lets a trial's last step through."""

    def __init__(self, default_steps: int, **asha: Any):
        super().__init__(time_attr="step", **asha)
        self.default_steps = default_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        if result.get("step", 0) >= planned_steps(trial.config, self.default_steps):
            return TrialScheduler.CONTINUE  # the trial function returns by itself right after this report
        return action


def scheduler_for(cfg: RaytronConfig, max_steps: int) -> TrialScheduler:
    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    return StepASHA(cfg.train.steps, max_t=max_steps, grace_period=t.grace_period,
                    reduction_factor=t.reduction_factor)
