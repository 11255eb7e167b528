"""Packing a stream of token ids into ``seq_len + 1`` blocks, chunk by chunk.

The streaming form of ``tokenizer.pack_documents``: documents (each already ending in
EOS) are concatenated and cut into consecutive blocks, so a block may hold the end of
one document and the start of the next, and no token is padding. The ids that do not
fill a last block stay in ``carry``; at the end of the stream they are dropped (fewer
than seq_len + 1 ids per split) and counted as ``dropped``.
"""

from __future__ import annotations

import numpy as np


class BlockPacker:
    def __init__(self, seq_len: int):
        self.width = seq_len + 1
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append ids; return every block completed so far, shape (n, seq_len + 1)."""
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        full = len(stream) // self.width * self.width
        self.carry = stream[full:].copy()
        return stream[:full].reshape(-1, self.width)

    @property
    def dropped(self) -> int:
        """Ids that would be lost if the stream ended now."""
        return len(self.carry)
