"""Resource requests against a fake autoscaling cluster (issue 15, test f): the head has 2 CPUs and no
GPU; only the autoscaled node type `fake.gpu` (0 at rest, at most 2) offers a GPU and the custom
resource `accel`. A request no node type can ever satisfy fails at once naming the fields; one that only
the autoscaled type satisfies is accepted, and its placement really comes up on new nodes."""

from __future__ import annotations


import pytest

from tests.fake_cluster import fake_autoscaling_cluster, printed_json

pytestmark = pytest.mark.slow

GPU_TYPE = {"fake.gpu": {"resources": {"CPU": 2, "GPU": 1, "accel": 1}, "max_workers": 2}}

CHECK = """
import json, logging, time, ray
logging.basicConfig(level=logging.WARNING)
from raytron.config import load_config
from raytron.train.cluster import ResourceError, ensure_resources, reporting_scale_up, worker_bundle
cfg = load_config("jobs/configs/tiny_smoke.yaml", {overrides!r})
ray.init()
try:
    capacity = ensure_resources(cfg)
except ResourceError as error:
    print(json.dumps({{"error": str(error)}}))
else:
    {then}
    print(json.dumps({{"accepted": True, "nodes": len([n for n in ray.nodes() if n["Alive"]])}}))
"""

# reserve the run's worker bundles as one placement group, as Ray Train does, and wait for the autoscaler
PLACE = """with reporting_scale_up(cfg, capacity, poll_s=1):
        ray.get(ray.util.placement_group([worker_bundle(cfg)] * cfg.world_size).ready(), timeout=180)
        time.sleep(2)  # one more poll of the console reporter"""


@pytest.fixture(scope="module")
def gpu_cluster():
    with fake_autoscaling_cluster(GPU_TYPE, head_cpus=2) as cluster:
        yield cluster


def check(cluster, overrides: list[str], then: str = "pass") -> tuple[dict, str]:
    done = cluster.driver(CHECK.format(overrides=overrides, then=then), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return printed_json(done.stdout), done.stderr


def test_request_no_node_type_can_hold_fails_naming_the_fields(gpu_cluster):
    outcome, _ = check(gpu_cluster, ["resources.custom={accel: 2}"])
    message = outcome["error"]
    assert "resources.custom={'accel': 2.0}" in message
    # no node offers 2 accel, though two nodes together would: each worker sits on one node
    assert "no node shape holds more than 0 of 1 workers of {CPU: 1, accel: 2}" in message
    assert "fake.gpu x2 {CPU: 2, GPU: 1, accel: 1}" in message


def test_more_workers_than_the_largest_cluster_fails_naming_the_totals(gpu_cluster):
    outcome, _ = check(gpu_cluster, ["parallel.dp=3", "resources.gpus_per_worker=1"])
    assert "3 workers (parallel.dp x pp x tp)" in outcome["error"]
    assert "resources.gpus_per_worker=1" in outcome["error"]
    assert "3 GPU requested, cluster has 2" in outcome["error"]


def test_unknown_accelerator_type_fails(gpu_cluster):
    outcome, _ = check(gpu_cluster, ["resources.accelerator_type=H100"])
    assert "resources.accelerator_type=H100" in outcome["error"]
    assert "0.001 accelerator_type:H100 requested, cluster has 0" in outcome["error"]


def test_request_only_an_autoscaled_type_satisfies_is_accepted_and_placed(gpu_cluster):
    # the cluster has no GPU now: the old check answered "1 GPU requested, cluster has 0"
    outcome, console = check(gpu_cluster, ["parallel.dp=2", "resources.gpus_per_worker=1",
                                           "resources.custom={accel: 1}"], then=PLACE)
    assert outcome == {"accepted": True, "nodes": 3}
    assert "waiting for the autoscaler: 2 workers of {CPU: 1, GPU: 1, accel: 1}, the live nodes host 0" in console
    assert "3 nodes up; every worker fits: starting" in console
