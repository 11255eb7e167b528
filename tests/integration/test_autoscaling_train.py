"""Scale up and down (issue 15, test a): a dp=2 x tp=2 run whose workers need the custom resource
`tpnode`, which only the autoscaled node type `fake.tp` offers (2 per node, 0 nodes at rest, at most 2).
The run is accepted, the autoscaler brings up 2 nodes, each TP group sits on one node (read back from
the placement recorded in the MLflow run), the run finishes, and the nodes are gone after their idle
timeout."""

from __future__ import annotations

import time

import pytest

from tests.fake_cluster import fake_autoscaling_cluster, node_ids_alive, printed_json

pytestmark = pytest.mark.slow

TP_TYPE = {"fake.tp": {"resources": {"CPU": 2, "tpnode": 2}, "max_workers": 2}}

TRAIN = """
import json, mlflow, numpy as np, ray
from raytron.config import load_config
from raytron.tracking.mlflow_run import RunTracker
from raytron.train.placement import ARTIFACT
from raytron.train.ray_trainer import fit
cfg = load_config("jobs/configs/tiny_smoke.yaml", [
    "parallel.dp=2", "parallel.tp=2", "resources.custom={{tpnode: 1}}", "train.steps=3", "train.log_every=1",
    "train.micro_batch_size=2", "train.checkpoint_every=0", "model.vocab_size=256",
    "train.storage_path={workdir}/runs", "tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"])
ray.init()
head = ray.get_runtime_context().get_node_id()
blocks = np.random.default_rng(0).integers(0, 256, (64, cfg.train.seq_len + 1))
tracker = RunTracker.start(cfg)
result = fit(cfg, ray.data.from_items([{{"tokens": row}} for row in blocks]), mlflow_run_id=tracker.run_id,
             run_name="scale-up")
tracker.finish()
placement = mlflow.MlflowClient(tracker.tracking_uri).download_artifacts(tracker.run_id, ARTIFACT, "{workdir}")
print(json.dumps({{"head": head, "step": result.metrics["step"], "placement": json.load(open(placement))}}))
"""


def test_tp_run_scales_two_nodes_up_keeps_tp_groups_on_a_node_and_scales_down(tmp_path):
    with fake_autoscaling_cluster(TP_TYPE, head_cpus=2, idle_timeout_minutes=0.1) as cluster:
        done = cluster.driver(TRAIN.format(workdir=tmp_path), timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        outcome = printed_json(done.stdout)
        assert outcome["step"] == 3
        placement = outcome["placement"]
        nodes = placement["rank_nodes"]
        assert len(set(nodes)) == 2 and outcome["head"] not in nodes, "two autoscaled nodes host the workers"
        assert placement["groups"]["tp"] == [[0, 1], [2, 3]]
        for group in placement["groups"]["tp"]:
            assert len({nodes[rank] for rank in group}) == 1, f"TP group {group} spans nodes: {nodes}"
        # idle timeout 6 s + the leaked-request expiry the fixture sets (15 s) + the coordinator's 20 s tick. Before
        # raytron started Ray Data's detached actors from the driver, one node stayed here for good: the
        # _StatsActor a worker had started on it (train/ray_data_actors.py)
        deadline = time.monotonic() + 60
        while (alive := node_ids_alive(cluster)) != [outcome["head"]] and time.monotonic() < deadline:
            time.sleep(3)
        assert alive == [outcome["head"]], f"autoscaled nodes outlived their 6 s idle timeout by 60 s: alive {alive}"
