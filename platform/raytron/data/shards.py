"""Writing one split's rows as Parquet shards of ``shard_blocks`` rows each.

Columns: ``tokens`` (list<int32>, seq_len + 1 ids) and ``id`` (int64, the row's index within the
split in prepare order); SFT shards add ``loss_mask`` (list<bool>) and, packed, ``segments``
(list<int32>), aligned with ``tokens``, so readers that know only ``tokens`` still read them. Files
are written whole, at fixed row-group size and compression, so the same rows always give the same bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytron.data.manifest import ShardInfo, SplitInfo
from raytron.storage import StorageError, filesystem_for, join_url

ROW_GROUP_ROWS = 1024


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


def _lists(rows: np.ndarray) -> pa.ListArray:
    """(n, width) -> n lists of width values."""
    count, width = rows.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * width), pa.array(rows.reshape(-1)))


def rows_table(tokens: np.ndarray, first_id: int, **columns: np.ndarray) -> pa.Table:
    """tokens (n, width) int32, ids first_id.., then each extra (n, width) column as lists."""
    ids = pa.array(np.arange(first_id, first_id + len(tokens), dtype=np.int64))
    return pa.table({"tokens": _lists(tokens), "id": ids, **{name: _lists(rows) for name, rows in columns.items()}})


class ShardWriter:
    def __init__(self, fs: pafs.FileSystem, base_path: str, base_url: str, split: str, shard_blocks: int):
        self.fs, self.base_path, self.base_url = fs, base_path, base_url
        self.split, self.shard_blocks = split, shard_blocks
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.rows = 0
        self.shards: list[ShardInfo] = []

    def add(self, tokens: np.ndarray, **columns: np.ndarray) -> None:
        """Rows: tokens (n, seq_len + 1) and any extra columns of the same shape (SFT)."""
        if len(tokens):
            self.pending.append({"tokens": tokens, **columns})
            self.pending_rows += len(tokens)
        while self.pending_rows >= self.shard_blocks:
            self._write(self.shard_blocks)

    def close(self) -> list[ShardInfo]:
        if self.pending_rows:
            self._write(self.pending_rows)
        return self.shards

    def _write(self, rows: int) -> None:
        stacked = {name: np.concatenate([part[name] for part in self.pending]) for name in self.pending[0]}
        shard = {name: values[:rows] for name, values in stacked.items()}
        rest = {name: values[rows:] for name, values in stacked.items()}
        self.pending_rows = len(rest["tokens"])
        self.pending = [rest] if self.pending_rows else []
        name = shard_name(self.split, len(self.shards))
        path = f"{self.base_path}/{name}"
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as stream:
                pq.write_table(rows_table(first_id=self.rows, **shard), stream, row_group_size=ROW_GROUP_ROWS,
                               compression="zstd")
        except (OSError, pa.ArrowException) as error:
            raise StorageError(f"cannot write shard {join_url(self.base_url, name)}: {error}") from None
        self.shards.append(ShardInfo(name, rows, join_url(self.base_url, name)))
        self.rows += rows


def read_columns(split: SplitInfo, endpoint_url: str | None = None,
                 region: str | None = None) -> dict[str, np.ndarray]:
    """Every column of a whole split, shard after shard (for checks and small data): 'id' (rows,), the list
    columns (rows, seq_len + 1): 'tokens', and for SFT 'loss_mask' (and 'segments' when packed)."""
    tables = []
    for shard in split.shards:
        fs, path = filesystem_for(shard.url, endpoint_url, region)
        with fs.open_input_file(path) as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        return {"tokens": np.empty((0, 0), dtype=np.int32), "id": np.empty(0, dtype=np.int64)}
    table = pa.concat_tables(tables)
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        columns[name] = (column.to_numpy() if name == "id" else
                         column.values.to_numpy(zero_copy_only=False).reshape(len(table), -1))
    return columns


def read_split(split: SplitInfo, endpoint_url: str | None = None,
               region: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(blocks (rows, seq_len + 1) int32, ids) of a whole split (for checks and small data)."""
    columns = read_columns(split, endpoint_url, region)
    return columns["tokens"], columns["id"]
