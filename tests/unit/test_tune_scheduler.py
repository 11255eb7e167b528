"""The sweep's ASHA counts optimizer steps and never answers a trial's last report with STOP (a STOP kills the trial's
Ray Train controller mid-shutdown), while it still stops weak trials at its rungs."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raytron.config import load_config
from raytron.tune.scheduler import StepASHA, scheduler_for

SMOKE = "jobs/configs/tune_smoke.yaml"  # grace_period 2, reduction_factor 2


def asha(overrides: list[str], max_steps: int):
    scheduler = scheduler_for(load_config(SMOKE, overrides), max_steps)
    scheduler.set_search_properties("loss", "min")
    return scheduler


def trial(**overrides) -> Trial:
    return Trial("run_trial", config={"overrides": overrides}, stub=True)


def test_weak_trial_is_stopped_at_the_rung_in_steps():
    scheduler = asha(["train.steps=8"], 8)
    assert isinstance(scheduler, StepASHA)
    good, weak = trial(**{"train.lr": 3e-3}), trial(**{"train.lr": 1e-5})
    for each in (good, weak):
        scheduler.on_trial_add(None, each)
    assert scheduler.on_trial_result(None, good, {"step": 1, "loss": 6.2}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, {"step": 2, "loss": 6.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, {"step": 2, "loss": 6.3}) == TrialScheduler.STOP


def test_last_step_is_never_a_stop_where_rays_asha_stops():
    ray_asha = ASHAScheduler(time_attr="step", max_t=4, grace_period=2, reduction_factor=2)
    ray_asha.set_search_properties("loss", "min")
    ours = asha(["train.steps=4"], 4)
    for scheduler in (ray_asha, ours):
        first = trial()
        scheduler.on_trial_add(None, first)
        outcomes = [scheduler.on_trial_result(None, first, {"step": step, "loss": 6.0 - step / 10})
                    for step in (2, 4)]
        assert outcomes[0] == TrialScheduler.CONTINUE
        assert outcomes[1] == (TrialScheduler.STOP if scheduler is ray_asha else TrialScheduler.CONTINUE)


def test_a_swept_train_steps_is_each_trials_last_step():
    scheduler = asha(["train.steps=4"], 8)  # the base config's 4 steps are not the last step of an 8-step trial
    good, longer = trial(**{"train.steps": 8}), trial(**{"train.steps": 8})
    for each in (good, longer):
        scheduler.on_trial_add(None, each)
    for step, loss in ((2, 6.0), (4, 5.5)):
        scheduler.on_trial_result(None, good, {"step": step, "loss": loss})
    assert scheduler.on_trial_result(None, longer, {"step": 2, "loss": 5.9}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, longer, {"step": 4, "loss": 5.8}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, good, {"step": 8, "loss": 5.0}) == TrialScheduler.CONTINUE
