"""A sweep survives its driver: SIGKILL `raytron tune` after one trial finished and another checkpointed, then
`--resume`. Also a trial whose loss turns NaN (a learning rate that diverges) ends FAILED and the sweep finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from raytron.config import load_config
from raytron.tune.state import read_sweep_state
from raytron.tune.sweep import SweepError, run_sweep
from raytron.tune.tracking import ERROR_TAG, PARENT_TAG, STOPPED_AT_TAG, SWEEP_TAG, TRIAL_TAG

REPO = Path(__file__).resolve().parents[2]
# each trial is a real multi-worker training run: minutes on 2 shared cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
SMOKE = str(REPO / "jobs" / "configs" / "tune_smoke.yaml")
KILL_DEADLINE_S = 900


STEPS = 12
"""Enough steps that the second trial is still running when its first checkpoint is seen (steps take ~1 s)."""


def sweep_overrides(name: str, storage: Path, tracking_uri: str) -> list[str]:
    # one trial at a time, in grid order: 3e-3 finishes, 1e-3 is killed mid-run, 1e30 diverges after its first step
    return [f"tune.name={name}", f"train.storage_path={storage}", f"tracking.tracking_uri={tracking_uri}",
            "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-3, 1.0e30]}}", "tune.scheduler=fifo",
            "tune.max_concurrent_trials=1", f"train.steps={STEPS}", "train.checkpoint_every=2",
            "train.warmup_steps=0"]


def registered_checkpoint_steps(trial_folder: Path) -> list[int]:
    """The steps of the checkpoints Ray Train recorded in the trial's run snapshot: what a resumed run restores
    from (a checkpoint folder can be on disk before it is recorded)."""
    snapshot = trial_folder / "checkpoint_manager_snapshot.json"
    text = snapshot.read_text() if snapshot.exists() else ""
    return sorted({int(step) for step in re.findall(r"checkpoint_(\d{8})", text)})


def saved_trial_statuses(experiment: Path) -> dict[str, str]:
    """{trial id: status} in Tune's newest saved experiment state: what Tuner.restore starts from."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda path: path.stat().st_mtime)
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except json.JSONDecodeError:  # caught mid-write
        return {}
    return {state["trial_id"]: state["status"] for state in (json.loads(trial[0]) for trial in trials)}


def wait_for_finished_and_checkpointed(experiment: Path, driver: subprocess.Popen) -> tuple[str, str]:
    """(finished trial, checkpointed unfinished trial), once Tune's saved state has the first as TERMINATED and
    Ray Train has recorded a checkpoint of the second."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the driver ended early ({driver.returncode})"
        statuses = saved_trial_statuses(experiment)
        finished = [trial for trial, status in statuses.items() if status == "TERMINATED"]
        steps = {trial: registered_checkpoint_steps(experiment / trial) for trial in statuses}
        running = [trial for trial, status in statuses.items()
                   if status == "RUNNING" and steps[trial] and STEPS not in steps[trial]]
        if finished and running:
            return finished[0], running[0]
        time.sleep(0.3)
    raise AssertionError(f"no finished + checkpointed trial pair within {KILL_DEADLINE_S} s")


def test_sigkilled_sweep_resumes_without_rerunning_or_duplicating(ray_cluster, mlflow_server, tmp_path):
    name = f"resume-{uuid.uuid4().hex[:6]}"
    storage = tmp_path / "runs"
    overrides = sweep_overrides(name, storage, mlflow_server.url)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "raytron.cli", "tune", SMOKE, *(f"--set={o}" for o in overrides)]
    log_path = tmp_path / "driver.log"
    driver_cwd = tmp_path / "driver"  # the driver's default workdir is <cwd>/.raytron: not the resume's
    driver_cwd.mkdir()
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(command, cwd=driver_cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            finished, interrupted = wait_for_finished_and_checkpointed(storage / name, driver)
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
    killed_at_ms = time.time() * 1000
    cfg = load_config(SMOKE, overrides)
    with pytest.raises(SweepError, match="pass --resume"):  # the same sweep again without --resume is refused
        run_sweep(cfg, workdir=tmp_path)
    resumed_from = max(registered_checkpoint_steps(storage / name / interrupted))

    result = run_sweep(cfg, resume=True, workdir=tmp_path)
    # the resumed trials read the first driver's prepared data: nothing was prepared again from this workdir
    assert read_sweep_state(cfg, str(storage / name)).workdir == str(driver_cwd / ".raytron")
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith("corpus-")]

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.get_run(result.parent_run_id).info.experiment_id
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                                                                f"attributes.run_name = '{name}'")
    assert [run.info.run_id for run in parents] == [result.parent_run_id]  # the parent run continued
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    by_trial = {run.data.tags[TRIAL_TAG]: run for run in children}
    assert len(children) == len(by_trial) == 3  # no child run duplicated
    assert {row["trial_id"] for row in result.rows} == set(by_trial)

    def loss_history(trial_id: str):
        return client.get_metric_history(by_trial[trial_id].info.run_id, "loss")

    assert [m.step for m in loss_history(finished)] == list(range(1, STEPS + 1))  # not rerun, not extended
    assert by_trial[finished].info.status == by_trial[interrupted].info.status == "FINISHED"
    after_kill = [m.step for m in loss_history(interrupted) if m.timestamp > killed_at_ms]
    assert min(after_kill) == resumed_from + 1 and max(after_kill) == STEPS  # continued from its checkpoint

    diverged = next(trial_id for trial_id in by_trial if trial_id not in (finished, interrupted))
    run = by_trial[diverged]
    assert run.info.status == "FAILED" and run.data.params["train.lr"] == "1e+30"
    assert "loss is" in run.data.tags[ERROR_TAG] and int(run.data.tags[STOPPED_AT_TAG]) >= 1
    assert all(m.value == m.value for m in loss_history(diverged))  # its last metrics are the finite ones
    assert {row["trial_id"]: row["status"] for row in result.rows}[diverged] == "FAILED"
    assert result.best["trial_id"] in (finished, interrupted)
