"""`tune.layouts: auto` end to end on a real Ray cluster with a real `mlflow server`: a layout sweep of 4 workers
runs every valid layout it enumerated as a real 4-worker training trial (the count checked against an independent
enumeration), runs none of the invalid ones, and ranks the trials by the tokens/s they reported."""

from __future__ import annotations

import itertools
import math
import uuid

import pytest
import ray
from mlflow import MlflowClient

from raytron.config import load_config
from raytron.tune.layouts import LAYOUT_KEYS
from raytron.tune.sweep import run_sweep
from raytron.tune.tracking import PARENT_TAG, TRIAL_TAG
from tests.integration.test_tune_sweep import assert_placement_groups_released
from tests.unit.test_tune_layouts import independent_enumeration

# every layout is a 4-worker training run: a minute or so each on 2 shared cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LAYOUTS = "jobs/configs/tune_layouts_smoke.yaml"
# A global batch of 2 (micro 1 x accum 1 x dp 2) and 2 heads keep the sweep to 4 trials: of the 8 candidates of
# 4 workers, the tp=4 ones (2 heads) and the pp=4 ones (2 layers) are invalid.
SMALL = ["model.num_heads=2", "train.micro_batch_size=1", "train.grad_accum_steps=1", "tune.layout_steps=2"]


def candidates(workers: int, global_batch: int) -> set[tuple[int, ...]]:
    """Every (dp, pp, tp, micro, accum) of the worker count and global batch, valid or not."""
    return {combination for combination in itertools.product(range(1, 9), repeat=5)
            if math.prod(combination[:3]) == workers and combination[3] * combination[4] * combination[0] == global_batch}


def test_layout_sweep_on_four_workers_ranks_every_valid_layout_and_runs_no_invalid_one(ray_cluster, mlflow_server,
                                                                                       tmp_path):
    name = f"layouts-{uuid.uuid4().hex[:6]}"
    cfg = load_config(LAYOUTS, [f"tune.name={name}", f"train.storage_path={tmp_path / 'runs'}",
                                f"tracking.tracking_uri={mlflow_server.url}", *SMALL])
    assert (cfg.world_size, cfg.global_batch_size) == (4, 2)
    expected = independent_enumeration(4, 2, cfg.model.num_layers, cfg.model.num_heads, cfg.model.ffn_size,
                                       cfg.parallel.zero_stage)
    invalid = candidates(4, 2) - expected
    assert len(expected) == 4 and {(1, 1, 4), (1, 4, 1)} <= {layout[:3] for layout in invalid}

    before = set(ray.util.placement_group_table())
    result = run_sweep(cfg, workdir=tmp_path)
    assert_placement_groups_released(before)

    ran = [tuple(row[key] for key in LAYOUT_KEYS) for row in result.rows]
    assert len(ran) == len(set(ran)) == len(expected) and set(ran) == expected  # so none of the invalid ones
    assert all((row["status"], row["step"]) == ("FINISHED", 2) for row in result.rows)
    speeds = [row["tokens_per_s"] for row in result.rows]
    assert all(math.isfinite(speed) and speed > 0 for speed in speeds)
    assert speeds == sorted(speeds, reverse=True)  # ranked, fastest first
    assert result.best == result.rows[0]

    # each trial's best tokens/s is the best of what its workers logged, and its run holds its layout
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.get_run(result.parent_run_id).info.experiment_id
    children = {run.data.tags[TRIAL_TAG]: run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")}
    assert set(children) == {row["trial_id"] for row in result.rows}
    for row in result.rows:
        child = children[row["trial_id"]]
        assert all(child.data.params[key] == str(row[key]) for key in LAYOUT_KEYS)
        history = client.get_metric_history(child.info.run_id, "tokens_per_s")
        assert [m.step for m in history] == [1, 2]
        assert row["tokens_per_s"] == pytest.approx(max(m.value for m in history))
