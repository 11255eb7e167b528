"""SFT samples -> shard rows of seq_len + 1 ids, with their loss mask (and, packed, segment numbers).

Without packing each row is one sample followed by pad ids. With ``data.packing`` whole samples are
laid end to end, greedily in arrival order: a sample goes into the current row when it fits, else it
closes that row and starts the next; a sample is never split across rows. ``segments`` numbers the
samples of a row 1, 2, ..., k (0 on the pads), which is what the trainer's block-diagonal mask and
restarting positions come from. Pads are never scored, and a sample's first token never is (the
encoder clears it), so no target is predicted across two samples.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from raytron.data.sft_encode import SftSample


class SampleRows:
    """One split's samples in, completed rows out; counts what went in."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool):
        self.width, self.pad_id, self.packing = seq_len + 1, pad_id, packing
        self.pending: list[SftSample] = []
        """Samples of the row being filled (packing), ``filled`` ids in all."""
        self.filled = 0
        self.samples = self.tokens = self.scored_tokens = 0

    def add(self, samples: Iterable[SftSample]) -> dict[str, np.ndarray]:
        """Append samples (each at most seq_len + 1 ids); return the rows completed so far."""
        rows: list[list[SftSample]] = []
        for sample in samples:
            if len(sample.tokens) > self.width:
                raise ValueError(f"a sample of {len(sample.tokens)} tokens is longer than a row of seq_len + 1 = "
                                 f"{self.width} (apply fit_length first)")
            self.samples += 1
            self.tokens += len(sample.tokens)
            self.scored_tokens += int(sample.loss_mask.sum())
            if not self.packing:
                rows.append([sample])
                continue
            if self.filled + len(sample.tokens) > self.width:
                rows.append(self.pending)
                self.pending, self.filled = [], 0
            self.pending.append(sample)
            self.filled += len(sample.tokens)
        return self._arrays(rows)

    def close(self) -> dict[str, np.ndarray]:
        """The last, partly filled row (packing)."""
        rows, self.pending, self.filled = ([self.pending] if self.pending else []), [], 0
        return self._arrays(rows)

    def _arrays(self, rows: list[list[SftSample]]) -> dict[str, np.ndarray]:
        """{'tokens': (n, width) int32, 'loss_mask': (n, width) bool[, 'segments': (n, width) int32]}."""
        tokens = np.full((len(rows), self.width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), self.width), dtype=bool)
        segments = np.zeros((len(rows), self.width), dtype=np.int32)
        for row, samples in enumerate(rows):
            start = 0
            for number, sample in enumerate(samples, start=1):
                stop = start + len(sample.tokens)
                tokens[row, start:stop], mask[row, start:stop] = sample.tokens, sample.loss_mask
                segments[row, start:stop] = number
                start = stop
        return {"tokens": tokens, "loss_mask": mask, **({"segments": segments} if self.packing else {})}
