"""Training blocks tokenized and packed online from the raw corpus (``data.mode: streaming``).

Each epoch deals the raw files, in a permutation drawn from (seed, epoch), round-robin to the DP
groups; each group's reader runs the prepare pipeline (raytron.data.stream.packed_blocks: Ray
Data read, tokenizer actor pool, packing) over its files and cuts the blocks into batches. The
groups' streams differ in length, so the readers agree each step (StepBatches) and all start
the next epoch when the first runs dry.

Resume guarantee: a checkpoint holds (epoch, batch). On resume each group streams its files of
that epoch again from the start and drops the first ``batch`` batches, so no block is repeated or
skipped -- provided the raw files and the tokenizer are the ones the run started with (their
fingerprint is checked). The consumed part of the epoch is read and tokenized again: resume
costs up to one epoch of tokenization, which is what the prepared mode avoids.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from raytron.config import RaytronConfig
from raytron.data.sources import SourceFile
from raytron.data.stream import packed_blocks
from raytron.data.tokenizer_source import TokenizerSpec


def rebatch(chunks: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Batches of exactly ``rows`` blocks from chunks of any size; the remainder is dropped."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:  # (n, T+1)
        pending.append(chunk)
        held += len(chunk)
        if held < rows:
            continue
        blocks = np.concatenate(pending)
        usable = held - held % rows
        for first in range(0, usable, rows):
            yield blocks[first:first + rows]
        pending, held = [blocks[usable:]], held - usable


class StreamingCorpus:
    """A BlockSource over one split of the raw corpus (picklable: travels to Ray Train workers)."""

    def __init__(self, cfg: RaytronConfig, files: list[SourceFile], split: str, tokenizer: TokenizerSpec):
        self.cfg = cfg
        self.files = files
        self.split = split
        self.tokenizer = tokenizer

    def files_of(self, epoch: int, dp_index: int, dp: int) -> list[SourceFile]:
        order = np.random.default_rng([self.cfg.data.shuffle_seed, epoch]).permutation(len(self.files))
        return [self.files[index] for index in order[dp_index::dp]]

    def batches(self, epoch: int, start: int, rows: int, dp_index: int, dp: int) -> Iterator[dict[str, np.ndarray]]:
        files = self.files_of(epoch, dp_index, dp)
        if not files:
            return
        chunks = packed_blocks(self.cfg, files, self.split, self.tokenizer)
        for index, tokens in enumerate(rebatch(chunks, rows)):
            if index >= start:
                yield {"tokens": tokens}
