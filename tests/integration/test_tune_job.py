"""jobs/tune.py as `ray job submit` runs it: submitted through the session cluster's job server (Ray's own
JobSubmissionClient, the SDK behind the CLI), with the checkout as the job's working dir, so the driver runs
in a temporary copy of it and every trial's workers import raytron from the runtime env. One trial's worker
process dies mid-run (the job's env reaches every trial): that trial restarts from its checkpoint
(train.max_failures) and the sweep completes."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from raytron.train.fault_injection import ENV_VAR as FAULT_ENV_VAR
from raytron.tune.tracking import PARENT_TAG, SWEEP_TAG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"\[(\w+)\] step (\d+)/(\d+)  loss ")


def sweep_config(name: str, tmp_path: Path) -> dict:
    """Two one-worker trials of 4 steps (lr swept) of the smoke sweep's model, a checkpoint at step 2, one restart
    allowed."""
    cfg = yaml.safe_load((REPO / "jobs/configs/tune_smoke.yaml").read_text())
    cfg["parallel"].update(pp=1)
    cfg["train"].update(steps=4, checkpoint_every=2, max_failures=1, storage_path=str(tmp_path / "runs"))
    cfg["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name}
    cfg["tune"] = {"name": name, "search_space": {"train.lr": {"grid": [3.0e-3, 1.0e-4]}}, "metric": "loss",
                   "mode": "min", "scheduler": "fifo"}
    return cfg


def wait_for_job(client: JobSubmissionClient, job_id: str, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    return status


def test_submitted_sweep_survives_a_crashed_worker_tracks_its_trials_and_prints_each_progress_line_once(
        ray_cluster, tmp_path):
    name = f"job-sweep-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_config(name, tmp_path)))
    client = JobSubmissionClient(ray.get_runtime_context().gcs_address)  # finds the cluster's job server
    job_id = client.submit_job(entrypoint=f"{sys.executable} jobs/tune.py --config {config}",
                               runtime_env={"working_dir": str(REPO), "env_vars": {
                                   FAULT_ENV_VAR: f"0:3:{tmp_path / 'crashed.json'}"}})  # once, after step 3
    status = wait_for_job(client, job_id, 600)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tracking.search_runs([tracking.get_experiment_by_name(name).experiment_id],
                                filter_string=f"tags.`{SWEEP_TAG}` = '{name}'")
    [parent] = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = tracking.search_runs([parent.info.experiment_id],
                                    filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(float(child.data.params["train.lr"]) for child in children) == [1.0e-4, 3.0e-3]
    assert all(child.info.status == "FINISHED" for child in children)
    assert (tmp_path / "crashed.json").exists()  # the fault did happen
    for child in children:  # (the step the crash came after may or may not have been sent before it)
        assert sorted({m.step for m in tracking.get_metric_history(child.info.run_id, "loss")}) == [1, 2, 3, 4]

    # rank 0 of each trial prints one line per step, each once in the job's log; the crashed trial went on from its
    # step-2 checkpoint, so it printed step 3 twice and steps 1-2 once
    printed = Counter(match.groups() for match in map(PROGRESS.search, logs.splitlines()) if match)
    trials = {trial for trial, _, _ in printed}
    assert len(trials) == 2, logs[-3000:]
    [crashed] = [trial for trial in trials if printed[(trial, "3", "4")] == 2]
    assert printed == Counter({(trial, str(step), "4"): 2 if (trial, step) == (crashed, 3) else 1
                               for trial in trials for step in (1, 2, 3, 4)}), printed
