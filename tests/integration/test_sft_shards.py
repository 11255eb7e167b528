"""Prepared SFT shards (the SFT shard contract: tokens, id, loss_mask and, packed, segments) read by
PreparedShards: the per-token columns come with the tokens, permuted with their rows; a column of
the wrong length is named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.train.shard_source import PreparedShards

BLOCK = 9  # seq_len 8 + 1
SHARD_ROWS = [5, 7]


def write_shard(path, first: int, rows: int, block: int = BLOCK, packed: bool = True) -> None:
    """Row i's tokens are i * 100 + position; its mask and segments are derived from i, so a test can
    check that every column of a row came from the same row."""
    ids = np.arange(first, first + rows)
    tokens = ids[:, None] * 100 + np.arange(block)  # (rows, block)
    loss_mask = (np.arange(block)[None, :] >= 1 + ids[:, None] % 4)  # row i scores from position 1 + i % 4
    columns = {"tokens": pa.array(list(tokens.astype(np.int32)), type=pa.list_(pa.int32())),
               "id": pa.array(ids, type=pa.int64()),
               "loss_mask": pa.array(list(loss_mask), type=pa.list_(pa.bool_()))}
    if packed:
        segments = np.where(np.arange(block)[None, :] < 2 + ids[:, None] % 3, 1, 2).astype(np.int32)
        columns["segments"] = pa.array(list(segments), type=pa.list_(pa.int32()))
    pq.write_table(pa.table(columns), path)


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft-prepared")
    listed, first = [], 0
    for index, rows in enumerate(SHARD_ROWS):
        path = folder / f"shard-{index:05d}.parquet"
        write_shard(path, first, rows)
        listed.append((str(path), rows))
        first += rows
    return listed


def test_sft_columns_travel_with_their_rows(ray_cluster, sft_shards):
    source = PreparedShards(sft_shards, seed=3, block_len=BLOCK)
    batches = list(source.batches(0, 0, 3, 0, 1))
    assert len(batches) == 4  # 12 rows, batches of 3
    for batch in batches:
        ids = batch["id"]
        assert batch["loss_mask"].dtype == bool and batch["loss_mask"].shape == (3, BLOCK)
        np.testing.assert_array_equal(batch["tokens"], ids[:, None] * 100 + np.arange(BLOCK))
        np.testing.assert_array_equal(batch["loss_mask"], np.arange(BLOCK)[None, :] >= 1 + ids[:, None] % 4)
        np.testing.assert_array_equal(batch["segments"], np.where(np.arange(BLOCK)[None, :] < 2 + ids[:, None] % 3, 1, 2))
    assert sorted(i for batch in batches for i in batch["id"]) == list(range(12))


def test_a_column_of_another_length_is_named(ray_cluster, tmp_path):
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, 0, 4, block=BLOCK + 2, packed=False)
    source = PreparedShards([(str(path), 4)], seed=0, block_len=BLOCK)
    with pytest.raises(Exception, match="column 'tokens' holds 44 values, expected 4 rows"):
        list(source.batches(0, 0, 2, 0, 1))
