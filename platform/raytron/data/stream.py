"""The Ray Data pipeline from raw files to packed blocks, in a deterministic order.

read (CorpusDatasource: sorted files, blocks of records) -> tokenize (TokenizeBatch in an
actor pool; [BOS] + ids + EOS, split by text hash) -> consumer packs each split's ids into
seq_len + 1 blocks. ``preserve_order`` makes the blocks arrive in file order however many
readers and actors run, so the packed output is the same on every run. Packing is done
by the one consumer because blocks cross document (and file) boundaries.

``prepare`` consumes it to write shards; ``packed_blocks`` yields the blocks of one
split directly (``data.mode: streaming``, run inside a Ray Train worker). SFT formats take the
same read and actor pool with ``EncodeSftBatch`` (one sample + loss mask per record) instead of
``TokenizeBatch``; ``sft_prepare`` turns those into rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset

from raytron.config import RaytronConfig
from raytron.data.datasource import CorpusDatasource
from raytron.data.encode import TokenizeBatch, split_tokens
from raytron.data.packing import BlockPacker
from raytron.data.records import bad_record_error
from raytron.data.sft_batch import EncodeSftBatch
from raytron.data.sft_setup import SftSetup
from raytron.data.sources import SourceFile
from raytron.data.tokenizer_source import TokenizerSpec

# problems quoted in the manifest and summary (all are counted)
MAX_EXAMPLES = 20


def document_dataset(cfg: RaytronConfig, files: list[SourceFile], tokenizer: TokenizerSpec,
                     progress_bars: bool = True, sft: SftSetup | None = None) -> Dataset:
    """Rows (tokens: [BOS] + ids + EOS, validation: bool, problem: str | None), one per record, in file order;
    for SFT formats (``sft`` given) EncodeSftBatch's rows (tokens, loss_mask, ..., too_long, cut_tokens)."""
    data = cfg.data
    records = ray.data.read_datasource(CorpusDatasource(files, data.text_field, data.endpoint_url, data.region))
    kwargs = {"tokenizer_json": tokenizer.json, "validation_fraction": data.validation_fraction}
    if not sft:
        kwargs["ends"] = tokenizer.ends
    else:
        kwargs |= {"fmt": data.format, "seq_len": cfg.train.seq_len, "too_long": data.too_long,
                   "chat_template": sft.template, "special_tokens": sft.special_tokens,
                   "train_on_prompt": data.train_on_prompt}
    tokens = records.map_batches(
        EncodeSftBatch if sft else TokenizeBatch, fn_constructor_kwargs=kwargs,
        batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        compute=ActorPoolStrategy(size=data.tokenize_actors), num_cpus=data.tokenize_cpus)
    tokens.context.execution_options.preserve_order = True
    tokens.context.enable_progress_bars = progress_bars
    return tokens


@dataclass
class BadRecords:
    """Bad records met so far; under 'fail' the first one stops the run."""

    policy: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, table: pa.Table) -> None:
        problems = [problem for problem in table.column("problem").to_pylist() if problem is not None]
        if problems and self.policy == "fail":
            raise bad_record_error(problems[0])
        self.count += len(problems)
        self.examples += problems[:MAX_EXAMPLES - len(self.examples)]


def packed_blocks(cfg: RaytronConfig, files: list[SourceFile], split: str,
                  tokenizer: TokenizerSpec) -> Iterator[np.ndarray]:
    """Blocks of one split ('train' or 'validation'), shape (n, seq_len + 1) int32, in a fixed order.

    The same as the rows of prepare's shards for these files, in the same order, but
    chunked as the stream delivers them. Bad records follow data.on_bad_record (skipped
    ones are not reported: there is no manifest). No progress bars (runs in a worker).
    """
    packer = BlockPacker(cfg.train.seq_len)
    bad = BadRecords(cfg.data.on_bad_record)
    validation = split == "validation"
    for table in document_dataset(cfg, files, tokenizer, progress_bars=False).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        bad.add(table)
        tokens, _ = split_tokens(table, validation)
        blocks = packer.add(tokens)
        if len(blocks):
            yield blocks
