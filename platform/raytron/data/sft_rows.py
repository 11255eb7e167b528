"""SFT samples -> shard rows: one sample per row of seq_len + 1 ids, padded, with its loss mask.

Samples are not packed together here (that needs a block-diagonal attention mask), so each row is one
sample followed by pad ids; the pads are never scored. The shard table is the pretraining one
(``tokens``, ``id``) plus a ``loss_mask`` column (list<bool>, aligned with ``tokens``), so readers that
know only ``tokens`` still read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from raytron.data.sft_encode import SftSample

SFT_SHARD_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("id", pa.int64()),
                              ("loss_mask", pa.list_(pa.bool_()))])


def sample_rows(samples: Sequence[SftSample], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (n, seq_len + 1) int32, loss_mask (n, seq_len + 1) bool); samples must already fit."""
    width = seq_len + 1
    tokens = np.full((len(samples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(samples), width), dtype=bool)
    for row, sample in enumerate(samples):
        if len(sample.tokens) > width:
            raise ValueError(f"sample {row} has {len(sample.tokens)} tokens, more than seq_len + 1 = {width} "
                             "(apply fit_length first)")
        tokens[row, :len(sample.tokens)] = sample.tokens
        mask[row, :len(sample.loss_mask)] = sample.loss_mask
    return tokens, mask


def sft_rows_table(tokens: np.ndarray, loss_mask: np.ndarray, first_id: int) -> pa.Table:
    rows, width = tokens.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.table([pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1))),
                     pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
                     pa.ListArray.from_arrays(offsets, pa.array(loss_mask.reshape(-1)))], schema=SFT_SHARD_SCHEMA)


def table_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The (tokens, loss_mask) arrays of an SFT shard table, shapes (rows, seq_len + 1)."""
    rows = len(table)
    tokens = table.column("tokens").combine_chunks().values.to_numpy().reshape(rows, -1)
    mask = table.column("loss_mask").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(rows, -1)
    return tokens, mask
