"""Node loss (issue 15, test b): a dp=2 run on a multi-node cluster (ray.cluster_utils.Cluster: a head
and two worker nodes that alone offer the custom resource `trainer`) loses the node its workers sit
on. The node goes (Cluster.remove_node, found by node id) after checkpoint 4 is registered, while
rank 1 is provably mid-run (held after step 5 by RAYTRON_FAULT=hang:...). Ray Train restarts the
worker group on the remaining node, training resumes from checkpoint 4, its per-step losses equal
an uninterrupted run's on the same cluster, and every step reads the blocks the uninterrupted run
read: each block once per epoch, replays re-read the same ones.

The cluster lives in a driver process of its own (one process drives one cluster; the test process
may hold the session's local Ray), in a process group of its own: Ray's reaper kills its group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.fake_cluster import REPO, _pythonpath, _stop_group, printed_json
from tests.integration.conftest import parquet_shards
from tests.integration.test_train_parity import BASE, DP2, TOLERANCE

pytestmark = pytest.mark.slow

STEPS = 10
HANG_AFTER = 5
"""Rank 1 stops after this step; the checkpoint before it (checkpoint_every=2) is the one resumed."""
RESUMED_FROM = 4
TRAINER = "trainer"
VOCAB, BLOCK = 512, 33
SHARD_ROWS = [24, 20, 20]


def overrides(work: Path, name: str) -> list[str]:
    return BASE + DP2 + [
        f"train.steps={STEPS}", "train.checkpoint_every=2", "train.max_failures=1", f"resources.custom={{{TRAINER}: 1}}",
        f"train.data_ledger={work / name / 'ledger'}", f"train.storage_path={work / 'runs'}", f"name={name}"]


def write_shards(folder: Path) -> list[tuple[str, int]]:
    """Random blocks (vocab 512, 33 tokens) with ids, as prepared parquet shards of unequal size."""
    folder.mkdir(parents=True)
    blocks = np.random.default_rng(0).integers(0, VOCAB, (sum(SHARD_ROWS), BLOCK), dtype=np.int32)
    return parquet_shards(folder, blocks, SHARD_ROWS)


def registered_checkpoint(run_dir: Path) -> str | None:
    """The dir name of the latest checkpoint Ray Train's controller has registered (its snapshot file)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being written
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def remove_node_when_mid_run(cluster, marker: Path, run_dir: Path, outcome: dict, deadline_s: float = 600) -> None:
    """Once rank 1 holds after step HANG_AFTER and checkpoint RESUMED_FROM is registered, remove the node
    rank 1 runs on. On a missed deadline, interrupt the driver (its finally stops the cluster)."""
    import _thread

    wanted = f"checkpoint_{RESUMED_FROM:08d}"
    deadline = time.monotonic() + deadline_s
    while not (marker.exists() and registered_checkpoint(run_dir) == wanted):
        if time.monotonic() > deadline:
            outcome["error"] = (f"never mid-run: marker {marker.exists()}, registered "
                                f"{registered_checkpoint(run_dir)!r}, wanted {wanted}")
            _thread.interrupt_main()
            return
        time.sleep(0.2)
    host = json.loads(marker.read_text())["node_id"]
    outcome["worker_nodes"] = [node.node_id for node in cluster.worker_nodes]
    node = next(node for node in cluster.worker_nodes if node.node_id == host)
    cluster.remove_node(node)
    outcome["removed"] = host


def drive(workdir: str) -> None:
    """In the driver process: start the cluster, train uninterrupted, then train losing a node; print JSON."""
    import ray
    from ray.cluster_utils import Cluster

    from raytron.config import load_config
    from raytron.train.fault_injection import ENV_VAR
    from raytron.train.ray_trainer import fit
    from raytron.train.shard_source import PreparedShards

    work = Path(workdir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(2):  # each can host the whole dp=2 group
            cluster.add_node(num_cpus=2, resources={TRAINER: 2})
        cluster.wait_for_nodes()
        # the cluster's own processes (Ray Train's PlacementGroupCleaner) then find it by address, not
        # among every Ray instance on the machine
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
        shards = write_shards(work / "shards")
        runs = {}
        for name, fault in (("uninterrupted", None), ("node-loss", f"hang:1:{HANG_AFTER}:{work / 'marker'}")):
            cfg = load_config("jobs/configs/tiny_smoke.yaml", overrides(work, name))
            source = PreparedShards(shards, seed=cfg.data.shuffle_seed, block_len=BLOCK)
            outcome: dict = {}
            remover = None
            if fault:
                os.environ[ENV_VAR] = fault
                remover = threading.Thread(target=remove_node_when_mid_run, daemon=True,
                                           args=(cluster, work / "marker", work / "runs" / name, outcome))
                remover.start()
            result = fit(cfg, source, run_name=name)
            if remover is not None:
                remover.join()
            runs[name] = {"losses": result.metrics["losses"], **outcome}
        runs["alive"] = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        print(json.dumps(runs))
    finally:
        ray.shutdown()
        cluster.shutdown()


def ledger_reads(ledger: Path) -> dict[tuple[int, int], list[list[int]]]:
    """(dp index, step) -> the block ids of every read of that step, replays included."""
    reads = defaultdict(list)
    for dp_index in (0, 1):
        for line in (ledger / f"dp{dp_index}.jsonl").read_text().splitlines():
            record = json.loads(line)
            reads[dp_index, record["step"]].append(record["ids"])
    return reads


@pytest.fixture
def work():
    """Short (Ray's socket paths are limited): the cluster's RAY_TMPDIR, runs, shards and ledgers."""
    folder = Path(tempfile.mkdtemp(prefix="rt-nl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_run_survives_losing_its_node_and_matches_an_uninterrupted_run(work):
    # RAY_TMPDIR keeps this cluster's address file out of /tmp/ray, where other drivers here would join it
    env = {**os.environ, "RAY_TMPDIR": str(work), "PYTHONPATH": _pythonpath(), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    env.pop("RAY_ADDRESS", None)
    code = f"from tests.integration.test_node_loss import drive; drive({str(work)!r})"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        out, err = process.communicate(timeout=1200)
    finally:
        _stop_group(process)
    assert process.returncode == 0, err[-4000:]
    runs = printed_json(out)
    lost = runs["node-loss"]
    assert "error" not in lost, lost["error"]
    assert lost["removed"] in lost["worker_nodes"], "the node hosting rank 1 was removed"
    assert lost["removed"] not in runs["alive"], "the removed node is gone"

    baseline = {int(step): loss for step, loss in runs["uninterrupted"]["losses"].items()}
    resumed = {int(step): loss for step, loss in lost["losses"].items()}
    assert sorted(baseline) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(RESUMED_FROM + 1, STEPS + 1)), "the restart resumed from checkpoint 4"
    for step, loss in resumed.items():
        assert abs(loss - baseline[step]) < TOLERANCE, (step, loss, baseline[step])

    expected, reads = ledger_reads(work / "uninterrupted" / "ledger"), ledger_reads(work / "node-loss" / "ledger")
    assert sorted(reads) == sorted(expected)
    for dp_index in (0, 1):
        assert len(reads[dp_index, HANG_AFTER]) == 2, "step 5 ran before the node went and again after"
    assert all(len({tuple(ids) for ids in replays}) == 1 for replays in reads.values()), "a replay read other blocks"
    assert {key: replays[0] for key, replays in reads.items()} == {key: ids[0] for key, ids in expected.items()}
    consumed = [i for replays in reads.values() for i in replays[0]]
    assert len(consumed) == len(set(consumed)) == 4 * STEPS, "a block was read twice in the epoch"
