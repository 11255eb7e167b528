"""The largest-cluster arithmetic of train/capacity.py on the shipped launcher YAML (no Ray needed: the
live nodes are given as Ray reports them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from raytron.train.capacity import Capacity, NodeType, ResourceError, fits, launcher_node_types, require_capacity

AWS = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / "aws-gpu.yaml").read_text())
HEAD = {"CPU": 8.0, "memory": 3e10, "node:__internal_head__": 1.0}


def aws_capacity(live: list[dict] | None = None) -> Capacity:
    kinds, max_workers = launcher_node_types(AWS)
    return Capacity(live or [HEAD], kinds, max_workers, "aws-gpu.yaml")


def test_aws_node_types_read_from_the_launcher_yaml():
    kinds, max_workers = launcher_node_types(AWS)
    assert max_workers == 43
    gpu = next(kind for kind in kinds if kind.name == "gpu")
    assert (gpu.resources, gpu.max_count) == ({"CPU": 96, "GPU": 8}, 35)
    assert "head" not in [kind.name for kind in kinds]


def test_gpu_run_on_an_idle_aws_cluster_counts_the_gpu_nodes_it_may_add():
    # 1.3B-style run: 64 GPU workers on a cluster that has no GPU node yet
    bundle = {"CPU": 8, "GPU": 1}
    capacity = require_capacity(bundle, 64, "64 workers", aws_capacity())
    assert capacity.live_fit(bundle) == 0
    assert capacity.largest_fit(bundle) == 35 * 8


def test_per_node_fit_not_totals():
    # 12 CPUs per worker: a 96-CPU node holds 8 and the CPU head none
    assert fits({"CPU": 96, "GPU": 8}, {"CPU": 12, "GPU": 1}) == 8
    assert fits(HEAD, {"CPU": 12, "GPU": 1}) == 0
    assert fits({"CPU": 1.0}, {"CPU": 0.1}) == 10


def test_global_max_workers_caps_the_node_types_together():
    kinds = [NodeType("big", {"CPU": 4}, 10), NodeType("small", {"CPU": 1}, 10)]
    capacity = Capacity([HEAD], kinds, max_workers=3)
    # best-fitting type first: 3 big nodes (12) + the head (8)
    assert capacity.largest_fit({"CPU": 1}) == 20


def test_type_without_resources_or_limit_is_assumed_to_fit():
    assert Capacity([HEAD], [NodeType("auto", None, 2)]).largest_fit({"GPU": 1}) == math.inf
    assert Capacity([HEAD], [NodeType("any", {"GPU": 1}, -1)]).largest_fit({"GPU": 1}) == math.inf


def test_no_autoscaler_counts_live_nodes_only():
    capacity = Capacity([HEAD, {"CPU": 2.0}], None)
    assert capacity.largest_fit({"CPU": 2}) == 5
    with pytest.raises(ResourceError, match=r"12 CPU requested, cluster has 10 \(no autoscaler: live nodes only\)"):
        require_capacity({"CPU": 2}, 6, "6 workers", capacity)
