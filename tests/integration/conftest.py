"""One Ray cluster for the whole test session, and packed blocks of real text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raytron.data.demo_data import demo_data


@pytest.fixture(scope="session")
def ray_cluster():
    # logical CPUs beyond the 2 real cores: Train workers + Ray Data tasks must all fit. The dashboard serves the
    # State API, which Ray Train's PlacementGroupCleaner needs to free the workers of a Tune trial ASHA stopped
    # (without it their placement group stays reserved until the session ends and later trials never start)
    ray.init(num_cpus=8, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def text_blocks(tmp_path_factory):
    """Docstring corpus -> BPE (vocab 512) -> blocks of 33 tokens."""
    return demo_data(tmp_path_factory.mktemp("demo-data"), 400_000, vocab_size=512, seq_len=32)


def blocks_dataset(blocks, count: int):
    """The first ``count`` blocks as a Ray Dataset with an 'id' column (for exactly-once audits)."""
    return ray.data.from_items([{"tokens": blocks[i], "id": i} for i in range(count)])


def parquet_shards(folder: Path, blocks: np.ndarray, shard_rows: list[int]) -> list[tuple[str, int]]:
    """``blocks`` (rows, T+1) with their row index as 'id', as prepared-layout parquet shards of the given sizes:
    [(path, rows), ...]."""
    listed, first = [], 0
    for index, rows in enumerate(shard_rows):
        table = pa.table({"tokens": pa.array(list(blocks[first:first + rows].astype(np.int32)), type=pa.list_(pa.int32())),
                          "id": pa.array(np.arange(first, first + rows), type=pa.int64())})
        path = folder / f"shard-{index:05d}.parquet"
        pq.write_table(table, path)
        listed.append((str(path), rows))
        first += rows
    return listed
