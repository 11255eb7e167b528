"""Tokenizing a block of records in a Ray Data actor: ids + EOS per document, split by text hash.

The split of a document depends on its text only (a hash), never on its position, so it
is stable when files are reordered, renamed or added, and duplicates land in the same split.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from raytron.data.tokenizer import EOS_TOKEN

TOKENIZED_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("validation", pa.bool_()),
                              ("problem", pa.string())])
_HASH_RANGE = float(1 << 64)


def is_validation(text: str, validation_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _HASH_RANGE < validation_fraction


def eos_id(tokenizer: Tokenizer) -> int:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token to end documents with")
    return eos


class TokenizeBatch:
    """Ray Data actor UDF: the tokenizer is parsed once per actor, then applied to every block."""

    def __init__(self, tokenizer_json: str, validation_fraction: float):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos = eos_id(self.tokenizer)
        self.validation_fraction = validation_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [text for text in texts if text is not None]
        # encode_batch_fast: the same ids as encode_batch without computing character offsets
        ids = [np.asarray(encoding.ids, dtype=np.int32) for encoding in self.tokenizer.encode_batch_fast(good)]
        lengths = iter([len(doc) + 1 for doc in ids])
        sizes = np.array([next(lengths) if text is not None else 0 for text in texts], dtype=np.int32)
        offsets = np.zeros(len(texts) + 1, dtype=np.int32)
        np.cumsum(sizes, out=offsets[1:])
        values = np.empty(offsets[-1], dtype=np.int32)
        ends = offsets[1:][sizes > 0] - 1  # the last slot of every document holds its EOS
        values[ends] = self.eos
        if ids:
            mask = np.ones(len(values), dtype=bool)
            mask[ends] = False
            values[mask] = np.concatenate(ids)
        split = [text is not None and is_validation(text, self.validation_fraction) for text in texts]
        return pa.table([pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), pa.array(split),
                         batch.column("problem")], schema=TOKENIZED_SCHEMA)


def split_tokens(table: pa.Table, validation: bool) -> tuple[np.ndarray, int]:
    """(the split's documents' ids with their EOS, concatenated; number of documents) of one block."""
    mask = pc.and_(pc.equal(table.column("validation"), validation), pc.is_null(table.column("problem")))
    chosen = table.column("tokens").filter(mask)
    flat = pc.list_flatten(chosen)
    return flat.to_numpy().astype(np.int32, copy=False), len(chosen)
