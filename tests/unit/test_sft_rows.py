"""SFT samples as shard rows: padded with unscored pads, the mask travels as a Parquet column."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytron.data.sft_encode import SftSample
from raytron.data.sft_rows import sample_rows, sft_rows_table, table_rows

PAD = 2


def _samples():
    return [SftSample(np.array([5, 6, 7, 8], dtype=np.int32), np.array([0, 0, 1, 1], dtype=bool)),
            SftSample(np.array([9, 10, 11, 12, 13, 14], dtype=np.int32), np.array([0, 1, 1, 0, 1, 1], dtype=bool))]


def test_rows_pad_with_unscored_pads_and_round_trip_through_parquet():
    tokens, mask = sample_rows(_samples(), seq_len=5, pad_id=PAD)
    assert tokens.tolist() == [[5, 6, 7, 8, PAD, PAD], [9, 10, 11, 12, 13, 14]]
    assert mask.tolist() == [[False, False, True, True, False, False], [False, True, True, False, True, True]]
    sink = io.BytesIO()
    pq.write_table(sft_rows_table(tokens, mask, first_id=10), sink)
    table = pq.read_table(io.BytesIO(sink.getvalue()))
    assert table.column("id").to_pylist() == [10, 11]
    read_tokens, read_mask = table_rows(table)
    assert np.array_equal(read_tokens, tokens) and np.array_equal(read_mask, mask)


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="sample 1 has 6 tokens, more than seq_len \\+ 1 = 5"):
        sample_rows(_samples(), seq_len=4, pad_id=PAD)
