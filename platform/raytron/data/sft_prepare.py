"""The SFT side of ``raytron prepare``: encoded records -> each split's rows -> shards, with the counts.

Blocks arrive in file order (``preserve_order``), so the rows, and the first record that stops the
run under ``data.on_bad_record: fail`` or ``data.too_long: fail``, are the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from raytron.config import RaytronConfig
from raytron.data.manifest import SPLITS, SplitInfo
from raytron.data.records import bad_record_error
from raytron.data.sft_encode import SftSample, special_ids, too_long_error
from raytron.data.sft_rows import SampleRows
from raytron.data.sft_setup import SftSetup
from raytron.data.shards import ShardWriter
from raytron.data.sources import SourceFile
from raytron.data.stream import BadRecords, document_dataset
from raytron.data.tokenizer_source import TokenizerSpec


@dataclass
class SplitCounts:
    records: int = 0
    truncated: int = 0
    cut_tokens: int = 0
    skipped_too_long: int = 0


def stop_at_first_failure(table: pa.Table, on_bad_record: str, too_long: str) -> None:
    """Raise for the block's first record that a 'fail' policy refuses, in file order."""
    for problem, long in zip(table.column("problem").to_pylist(), table.column("too_long").to_pylist()):
        if problem is not None and on_bad_record == "fail":
            raise bad_record_error(problem)
        if long is not None and too_long == "fail":
            raise too_long_error(long)


def block_samples(table: pa.Table) -> list[SftSample]:
    """The samples of an (already filtered) block of encoded records, in order."""
    lengths = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    tokens = pc.list_flatten(table.column("tokens")).to_numpy()
    masks = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False)
    cuts = table.column("cut_tokens").to_numpy()
    return [SftSample(tokens[start:stop], masks[start:stop], int(cut))
            for start, stop, cut in zip(bounds[:-1], bounds[1:], cuts)]


def write_sft_splits(cfg: RaytronConfig, writers: dict[str, ShardWriter], sources: list[SourceFile],
                     tokenizer: TokenizerSpec, setup: SftSetup) -> tuple[dict[str, SplitInfo], BadRecords, int]:
    """(per-split info, bad records, samples in all); shards written through ``writers``."""
    data = cfg.data
    _, pad = special_ids(Tokenizer.from_str(tokenizer.json), setup.special_tokens)
    rows = {name: SampleRows(cfg.train.seq_len, pad, data.packing) for name in SPLITS}
    counts = {name: SplitCounts() for name in SPLITS}
    bad = BadRecords(data.on_bad_record)
    for table in document_dataset(cfg, sources, tokenizer, sft=setup).iter_batches(batch_size=None,
                                                                                  batch_format="pyarrow"):
        stop_at_first_failure(table, data.on_bad_record, data.too_long)
        bad.add(table)
        good = pc.is_null(table.column("problem"))
        for name in SPLITS:
            mine = table.filter(pc.and_(good, pc.equal(table.column("validation"), name == "validation")))
            fitting = mine.filter(pc.is_null(mine.column("too_long")))
            count = counts[name]
            count.records += len(mine)
            count.skipped_too_long += len(mine) - len(fitting)
            count.truncated += pc.sum(pc.greater(fitting.column("cut_tokens"), 0)).as_py() or 0
            count.cut_tokens += pc.sum(fitting.column("cut_tokens")).as_py() or 0
            writers[name].add(**rows[name].add(block_samples(fitting)))
    splits = {}
    for name in SPLITS:
        writers[name].add(**rows[name].close())
        shards, built, count = writers[name].close(), rows[name], counts[name]
        splits[name] = SplitInfo(sum(shard.rows for shard in shards), count.records, built.tokens, count.cut_tokens,
                                 shards, built.samples, built.scored_tokens, count.truncated, count.skipped_too_long)
    return splits, bad, sum(rows[name].samples for name in SPLITS)
