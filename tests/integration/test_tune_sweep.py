"""`raytron tune` on a real Ray cluster with a real `mlflow server`: the smoke sweep with ASHA (trials are real
2-worker pipeline runs), its parent and child runs read back with MlflowClient, the best trial exported."""

from __future__ import annotations

import math
import time
import uuid

import pytest
import ray
from mlflow import MlflowClient

from raytron.config import load_config
from raytron.storage import list_dirs
from raytron.tune.sweep import run_sweep
from raytron.tune.tracking import BEST_RUN_TAG, BEST_TRIAL_TAG, PARENT_TAG, STOPPED_AT_TAG, TRIAL_TAG

# each trial is a real multi-worker training run: minutes on 2 shared cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SMOKE = "jobs/configs/tune_smoke.yaml"
SWEPT = ("train.lr", "train.warmup_steps")


def children_of(client: MlflowClient, parent_run_id: str):
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def assert_placement_groups_released(before: set[str], within_s: float = 30.0) -> None:
    """Every placement group made since ``before`` (Tune's trials', their Ray Train workers') is removed: stopped
    trials too, or the trials after them could not start."""
    deadline = time.monotonic() + within_s
    while True:
        left = {pg: info["state"] for pg, info in ray.util.placement_group_table().items()
                if pg not in before and info["state"] != "REMOVED"}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"placement groups still held {within_s:g} s after the sweep: {left}"


def test_smoke_sweep_with_asha_tracks_parent_and_children_and_exports_the_best(ray_cluster, mlflow_server, tmp_path):
    name = f"sweep-{uuid.uuid4().hex[:6]}"
    cfg = load_config(SMOKE, [f"tune.name={name}", f"train.storage_path={tmp_path / 'runs'}", "train.steps=6",
                              f"tracking.tracking_uri={mlflow_server.url}", "tune.export_best=true",
                              f"tracking.registered_model_name={name}"])
    before = set(ray.util.placement_group_table())
    result = run_sweep(cfg, workdir=tmp_path)
    assert_placement_groups_released(before)

    client = MlflowClient(mlflow_server.url)
    children = {run.data.tags[TRIAL_TAG]: run for run in children_of(client, result.parent_run_id)}
    rows = {row["trial_id"]: row for row in result.rows}
    assert len(children) == len(rows) == 4 and set(children) == set(rows)
    assert sorted((row["train.lr"], row["train.warmup_steps"]) for row in rows.values()) == \
        sorted((lr, warmup) for lr in (3e-3, 1e-5) for warmup in (0, 2))
    histories = {}
    for trial_id, child in children.items():
        for key in SWEPT:  # the child's params are the whole config with the trial's values in it
            assert child.data.params[key] == str(rows[trial_id][key])
        assert child.data.params["parallel.pp"] == "2"
        histories[trial_id] = client.get_metric_history(child.info.run_id, "loss")
        assert child.info.status == rows[trial_id]["status"]

    # whatever the timing, the last trial (weak lr, 2 trials at once) meets a better median at step 2
    in_order = [rows[trial_id] for trial_id in sorted(rows)]
    assert [(row["train.lr"], row["train.warmup_steps"]) for row in in_order] == \
        [(3e-3, 0), (1e-5, 0), (3e-3, 2), (1e-5, 2)]
    assert (in_order[-1]["status"], in_order[-1]["step"]) == ("KILLED", 2)
    killed = [trial_id for trial_id, row in rows.items() if row["status"] == "KILLED"]
    for trial_id in killed:
        stopped_at = int(children[trial_id].data.tags[STOPPED_AT_TAG])
        assert stopped_at in (2, 4)  # ASHA's rungs: grace_period 2 x reduction_factor 2^k, in optimizer steps
        assert rows[trial_id]["step"] == stopped_at < 6
    finished = [trial_id for trial_id, row in rows.items() if row["status"] == "FINISHED"]
    assert finished and all([m.step for m in histories[t]] == [1, 2, 3, 4, 5, 6] for t in finished)

    # a stopped trial's workers run on until Tune's kill reaches them (a step takes ~0.05 s here): what they logged
    # after the step the scheduler stopped the trial at is not part of the sweep
    best_over_histories = min(m.value for trial_id, history in histories.items() for m in history
                              if m.step <= rows[trial_id]["step"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_loss"] == pytest.approx(best_over_histories)
    assert result.best["loss"] == pytest.approx(best_over_histories)
    best_trial = parent.data.tags[BEST_TRIAL_TAG]
    assert parent.data.tags[BEST_RUN_TAG] == children[best_trial].info.run_id
    assert "tune_results.json" in {artifact.path for artifact in client.list_artifacts(result.parent_run_id)}
    # the trial's checkpoints lie under <train.storage_path>/<tune.name>/<trial>
    assert "checkpoint_00000006" in list_dirs(f"{tmp_path / 'runs'}/{name}/{best_trial}")

    version = client.get_model_version(name, result.export.model_version.version)
    assert version.tags[TRIAL_TAG] == best_trial and version.tags["raytron.tune.sweep"] == name
    assert version.run_id == children[best_trial].info.run_id
    assert version.tags["raytron.tune.parent_run_id"] == result.parent_run_id
    assert all(math.isfinite(row["loss"]) for row in result.rows)

