"""Training reads prepared shards: a per-epoch shuffle from a seed, disjoint ranges per DP group,
resume inside an epoch without re-reading what was consumed, and exactly-once through a
killed worker -- counted by block id."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from raytron.config import load_config
from raytron.train.ray_trainer import fit
from raytron.train.shard_source import PreparedShards
from tests.integration.conftest import parquet_shards
from tests.integration.test_train_parity import BASE

SHARD_ROWS = [10, 14, 12, 16, 12]  # 64 blocks, shards of unequal size


@pytest.fixture(scope="module")
def shards(text_blocks, tmp_path_factory):
    """The first 64 demo blocks as parquet shards in the prepared layout: [(url, rows), ...]."""
    folder = tmp_path_factory.mktemp("prepared") / "train"
    folder.mkdir()
    return parquet_shards(folder, text_blocks.train_blocks, SHARD_ROWS)


def epoch_ids(source: PreparedShards, epoch: int, rows: int, dp_index: int, dp: int, start: int = 0) -> list[list[int]]:
    return [batch["id"].tolist() for batch in source.batches(epoch, start, rows, dp_index, dp)]


def test_dp_groups_read_disjoint_blocks_once_per_epoch(ray_cluster, shards, text_blocks):
    source = PreparedShards(shards, seed=7, block_len=33)
    groups = [epoch_ids(source, 0, 3, dp_index, 2) for dp_index in (0, 1)]
    assert len(groups[0]) == len(groups[1]) == 32 // 3  # 32 blocks per group, batches of 3
    ids = [i for group in groups for batch in group for i in batch]
    assert len(ids) == len(set(ids)) == 2 * 10 * 3
    assert set(ids) <= set(range(64))
    # the tokens are the blocks the ids name
    batch = next(source.batches(0, 0, 3, 1, 2))
    np.testing.assert_array_equal(batch["tokens"], text_blocks.train_blocks[batch["id"]])


def test_epochs_shuffle_deterministically_from_the_seed(ray_cluster, shards):
    source = PreparedShards(shards, seed=7, block_len=33)
    first = epoch_ids(source, 0, 4, 0, 1)
    assert first == epoch_ids(PreparedShards(shards, seed=7, block_len=33), 0, 4, 0, 1)
    assert first != epoch_ids(source, 1, 4, 0, 1)
    assert first != epoch_ids(PreparedShards(shards, seed=8, block_len=33), 0, 4, 0, 1)
    assert sorted(i for batch in first for i in batch) == list(range(64))  # dp=1, 16 x 4: all of them
    assert first[0] != list(range(4)) or first[1] != list(range(4, 8))  # not file order


def test_resume_continues_the_epoch_and_skips_consumed_shards(ray_cluster, shards):
    source = PreparedShards(shards, seed=3, block_len=33)
    whole = epoch_ids(source, 2, 2, 1, 2)
    assert epoch_ids(source, 2, 2, 1, 2, start=9) == whole[9:]
    pieces = source.pieces(2, 9, 2, 1, 2)
    assert sum(piece.stop - piece.start for piece in pieces) == 2 * (16 - 9)  # only what is left
    assert len(pieces) < len(source.pieces(2, 0, 2, 1, 2))  # shards already consumed are not opened


def test_prepared_run_survives_a_killed_worker_exactly_once(ray_cluster, shards, tmp_path, monkeypatch):
    """dp=2 on prepared shards loses rank 1's process after step 5 and restarts from its
    checkpoint: every step's blocks are those the source assigns, replays re-read the same
    blocks, and no block is read by two groups or twice in the epoch."""
    marker, ledger = tmp_path / "fault-marker", tmp_path / "ledger"
    monkeypatch.setenv("RAYTRON_FAULT", f"1:5:{marker}")
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + [
        "parallel.dp=2", "train.grad_accum_steps=1", "train.checkpoint_every=2", "train.max_failures=1",
        f"train.data_ledger={ledger}", f"train.storage_path={tmp_path / 'runs'}", "name=prepared-killed"])
    source = PreparedShards(shards, seed=cfg.data.shuffle_seed, block_len=33)
    result = fit(cfg, source, run_name="prepared-killed")
    assert marker.exists(), "the fault was never injected"
    assert min(result.metrics["losses"]) in (3, 5)

    reads = defaultdict(list)  # (dp index, step) -> every read of it, replays included
    for dp_index in (0, 1):
        for line in (ledger / f"dp{dp_index}.jsonl").read_text().splitlines():
            record = json.loads(line)
            reads[dp_index, record["step"]].append(record["ids"])
    assert all(len({tuple(ids) for ids in replays}) == 1 for replays in reads.values())
    for dp_index in (0, 1):
        expected = epoch_ids(source, 0, 2, dp_index, 2)[:10]  # micro batch 2 x 10 steps, epoch 0
        assert [reads[dp_index, step][0] for step in range(1, 11)] == expected
    consumed = [i for (_, step), replays in reads.items() for i in replays[0]]
    assert len(consumed) == len(set(consumed)) == 40
