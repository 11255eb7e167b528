"""SFT samples as shard rows: padded with unscored pads, or packed whole and greedily with segment
numbers; the mask and segments travel as Parquet columns next to tokens and id."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pytest

from raytron.data.manifest import SplitInfo
from raytron.data.sft_encode import SftSample
from raytron.data.sft_rows import SampleRows
from raytron.data.shards import ShardWriter, read_columns

PAD = 2


def _sample(tokens: list[int], mask: list[int]) -> SftSample:
    return SftSample(np.array(tokens, dtype=np.int32), np.array(mask, dtype=bool))


SAMPLES = [_sample([5, 6, 7, 8], [0, 0, 1, 1]), _sample([9, 10, 11, 12, 13, 14], [0, 1, 1, 0, 1, 1]),
           _sample([15, 16], [0, 1]), _sample([17, 18, 19], [0, 1, 1])]


def test_unpacked_rows_are_one_sample_each_with_unscored_pads():
    rows = SampleRows(seq_len=5, pad_id=PAD, packing=False)
    out = rows.add(SAMPLES[:2])
    assert set(out) == {"tokens", "loss_mask"} and not len(rows.close()["tokens"])
    assert out["tokens"].tolist() == [[5, 6, 7, 8, PAD, PAD], [9, 10, 11, 12, 13, 14]]
    assert out["loss_mask"].tolist() == [[False, False, True, True, False, False],
                                         [False, True, True, False, True, True]]
    assert (rows.samples, rows.tokens, rows.scored_tokens) == (2, 10, 6)


def test_packing_is_greedy_in_order_whole_samples_only_with_segments():
    rows = SampleRows(seq_len=6, pad_id=PAD, packing=True)
    first = rows.add(SAMPLES)  # rows of 7: [4], [6] (4 + 6 > 7), [2, 3] (6 + 2 > 7, 2 + 3 <= 7)
    last = rows.close()
    tokens = np.concatenate([first["tokens"], last["tokens"]]).tolist()
    segments = np.concatenate([first["segments"], last["segments"]]).tolist()
    mask = np.concatenate([first["loss_mask"], last["loss_mask"]]).tolist()
    assert tokens == [[5, 6, 7, 8, PAD, PAD, PAD], [9, 10, 11, 12, 13, 14, PAD], [15, 16, 17, 18, 19, PAD, PAD]]
    assert segments == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 2, 2, 2, 0, 0]]
    # each sample's first position is unscored, so no target crosses from one sample to the next
    assert mask[2] == [False, True, False, True, True, False, False]
    assert (rows.samples, rows.scored_tokens) == (4, 9)


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="a sample of 6 tokens is longer than a row of seq_len \\+ 1 = 5"):
        SampleRows(seq_len=4, pad_id=PAD, packing=True).add(SAMPLES)


def test_sft_columns_round_trip_through_the_shard_writer(tmp_path):
    rows = SampleRows(seq_len=6, pad_id=PAD, packing=True)
    built = [rows.add(SAMPLES), rows.close()]
    writer = ShardWriter(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path), "train", shard_blocks=2)
    for part in built:
        writer.add(**part)
    shards = writer.close()
    assert [shard.rows for shard in shards] == [2, 1]
    columns = read_columns(SplitInfo(3, 4, 15, 0, shards))
    assert columns["id"].tolist() == [0, 1, 2]
    for name in ("tokens", "loss_mask", "segments"):
        assert np.array_equal(columns[name], np.concatenate([part[name] for part in built])), name
    assert columns["loss_mask"].dtype == bool and columns["segments"].dtype == np.int32
