"""Training blocks from a prepared split's shards: shuffled per epoch, split by DP group, resumable.

The order of an epoch: the shards in a permutation drawn from (seed, epoch), and each shard's
rows in a permutation drawn from (seed, epoch, shard). DP group d owns the contiguous range
[d * per, (d + 1) * per) of that order, per = rows // dp, and its batch b is rows
[b * r, (b + 1) * r) of its range (r = its rows per step). So the groups never share a block,
each reads only the shards its range touches, and a resume at batch b opens the shards from the
one holding its row b * r on: what was consumed is not read again. The rows past the last full
batch of each range (fewer than r per group, plus rows % dp) sit out that epoch; the next
epoch's shuffle leaves out others.

SFT shards carry ``loss_mask`` (and, packed, ``segments``) next to ``tokens``: every per-token
column a shard holds is read and permuted with its rows.

Reading is a Ray Data pipeline, one task per (shard, row range) piece, order preserved and
prefetched, so reading overlaps the training step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raytron.storage import filesystem_for


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a shard's permuted order in epoch ``epoch`` (the shard's index is ``shard``)."""

    url: str
    path: str
    """Inside the source's filesystem."""
    rows: int
    shard: int
    epoch: int
    start: int
    stop: int


class PreparedShards:
    """A BlockSource over [(shard URL, rows), ...] of one split (picklable: travels to Ray Train workers)."""

    def __init__(self, shards: list[tuple[str, int]], seed: int, block_len: int,
                 endpoint_url: str | None = None, region: str | None = None, prefetch_batches: int = 2):
        self.shards = shards
        self.seed = seed
        self.block_len = block_len
        self.prefetch_batches = prefetch_batches
        # made here: an S3 filesystem pickles with explicit credentials, which the Ray workers
        # that read may not have in their environment
        self.filesystem, _ = filesystem_for(shards[0][0], endpoint_url, region)
        self.paths = [filesystem_for(url, endpoint_url, region)[1] for url, _ in shards]

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.shards)

    def pieces(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> list[Piece]:
        """The shard pieces holding DP group ``dp_index``'s batches ``start`` .. end of ``epoch``, in order."""
        per_group = self.rows // dp
        first = dp_index * per_group + start * rows
        end = dp_index * per_group + (per_group // rows) * rows
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        pieces, offset = [], 0
        for shard in order:
            url, shard_rows = self.shards[shard]
            low, high = max(first, offset), min(end, offset + shard_rows)
            if low < high:
                pieces.append(Piece(url, self.paths[shard], shard_rows, int(shard), epoch, low - offset, high - offset))
            offset += shard_rows
        return pieces

    def batches(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> Iterator[dict[str, np.ndarray]]:
        pieces = self.pieces(epoch, start, rows, dp_index, dp)
        if not pieces:
            return iter(())
        dataset = ray.data.from_items([asdict(piece) for piece in pieces], override_num_blocks=len(pieces))
        dataset = dataset.map_batches(_read_piece, batch_size=1, batch_format="numpy",
                                      fn_kwargs={"seed": self.seed, "block_len": self.block_len,
                                                 "filesystem": self.filesystem})
        dataset.context.execution_options.preserve_order = True  # the order is the contract
        dataset.context.enable_progress_bars = False  # a bar per epoch in every worker log is noise
        return iter(dataset.iter_batches(batch_size=rows, batch_format="numpy", drop_last=True,
                                         prefetch_batches=self.prefetch_batches))


def _read_piece(batch: dict[str, np.ndarray], seed: int, block_len: int,
                filesystem: pafs.FileSystem) -> dict[str, np.ndarray]:
    """Ray Data task: read one shard, permute its rows for the epoch, keep the piece's range."""
    piece = Piece(**{key: column[0].item() if hasattr(column[0], "item") else column[0] for key, column in batch.items()})
    shard = pq.ParquetFile(piece.path, filesystem=filesystem)
    # every per-token (list) column: tokens, and SFT's loss_mask and segments where the shard has them
    block_columns = [field.name for field in shard.schema_arrow if pa.types.is_list(field.type)]
    table = shard.read(columns=block_columns + ["id"])
    if table.num_rows != piece.rows:
        raise ValueError(f"{piece.url}: {table.num_rows} rows, the manifest says {piece.rows}; "
                         "the prepared data changed under the run")
    chosen = np.random.default_rng([seed, piece.epoch, piece.shard]).permutation(piece.rows)[piece.start:piece.stop]
    read = {name: _blocks(table, name, block_len, piece.url)[chosen] for name in block_columns}  # (piece rows, T+1)
    return {**read, "id": table.column("id").to_numpy()[chosen]}


def _blocks(table: pa.Table, name: str, block_len: int, url: str) -> np.ndarray:
    """A list column of rows x block_len values as a (rows, block_len) array."""
    values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if len(values) != table.num_rows * block_len:
        raise ValueError(f"{url}: column {name!r} holds {len(values)} values, expected {table.num_rows} rows of "
                         f"train.seq_len + 1 = {block_len}; the data was prepared for another seq_len")
    return values.reshape(table.num_rows, block_len)
