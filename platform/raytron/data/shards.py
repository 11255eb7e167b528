"""Writing one split's blocks as Parquet shards of ``shard_blocks`` rows each.

Columns: ``tokens`` (list<int32>, seq_len + 1 ids) and ``id`` (int64, the block's index
within the split in prepare order). Files are written whole, at fixed row-group size and
compression, so the same blocks always give the same bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytron.data.manifest import ShardInfo, SplitInfo
from raytron.storage import StorageError, filesystem_for, join_url

ROW_GROUP_ROWS = 1024
SHARD_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("id", pa.int64())])


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


def blocks_table(blocks: np.ndarray, first_id: int) -> pa.Table:
    rows, width = blocks.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    tokens = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1)))
    return pa.table([tokens, pa.array(np.arange(first_id, first_id + rows, dtype=np.int64))], schema=SHARD_SCHEMA)


class ShardWriter:
    def __init__(self, fs: pafs.FileSystem, base_path: str, base_url: str, split: str, shard_blocks: int):
        self.fs, self.base_path, self.base_url = fs, base_path, base_url
        self.split, self.shard_blocks = split, shard_blocks
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.rows = 0
        self.shards: list[ShardInfo] = []

    def add(self, blocks: np.ndarray) -> None:
        if len(blocks):
            self.pending.append(blocks)
            self.pending_rows += len(blocks)
        while self.pending_rows >= self.shard_blocks:
            self._write(self.shard_blocks)

    def close(self) -> list[ShardInfo]:
        if self.pending_rows:
            self._write(self.pending_rows)
        return self.shards

    def _write(self, rows: int) -> None:
        stacked = np.concatenate(self.pending)
        shard, rest = stacked[:rows], stacked[rows:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        name = shard_name(self.split, len(self.shards))
        path = f"{self.base_path}/{name}"
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as stream:
                pq.write_table(blocks_table(shard, self.rows), stream, row_group_size=ROW_GROUP_ROWS,
                               compression="zstd")
        except (OSError, pa.ArrowException) as error:
            raise StorageError(f"cannot write shard {join_url(self.base_url, name)}: {error}") from None
        self.shards.append(ShardInfo(name, rows, join_url(self.base_url, name)))
        self.rows += rows


def read_split(split: SplitInfo, endpoint_url: str | None = None,
               region: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(blocks (rows, seq_len + 1) int32, ids) of a whole split, shard after shard (for checks and small data)."""
    blocks, ids = [], []
    for shard in split.shards:
        fs, path = filesystem_for(shard.url, endpoint_url, region)
        with fs.open_input_file(path) as handle:
            table = pq.read_table(handle)
        tokens = table.column("tokens").combine_chunks()
        blocks.append(tokens.values.to_numpy().reshape(len(table), -1))
        ids.append(table.column("id").to_numpy())
    if not blocks:
        return np.empty((0, 0), dtype=np.int32), np.empty(0, dtype=np.int64)
    return np.concatenate(blocks), np.concatenate(ids)
