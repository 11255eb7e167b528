"""Tokenizing a block of records in a Ray Data actor: [BOS] + ids + EOS per document, split by text hash.

The split of a document depends on its text only (a hash), never on its position, so it
is stable when files are reordered, renamed or added, and duplicates land in the same split.

What goes around a document is the tokenizer's own, as a Hugging Face user expects of continued
pretraining (Megatron's ``--append-eod`` with the tokenizer's EOD, ``tokenizer(text)`` for the BOS):
tokenizer_config.json's ``eos_token`` after each document, else raytron's ``<|endoftext|>``; its
``bos_token`` before each one when ``add_bos_token`` is true (Llama 2, Mistral), else when the
tokenizer.json's post-processor puts a BOS before a text (Llama 3, folders transformers 5 saved),
never twice. Qwen2, GPT-2 and raytron's own tokenizers add none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from raytron.data.chat_template import special_tokens_of
from raytron.data.sft_encode import leading_bos, special_ids
from raytron.data.tokenizer import EOS_TOKEN

TOKENIZED_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("validation", pa.bool_()),
                              ("problem", pa.string())])
_HASH_RANGE = float(1 << 64)


def is_validation(text: str, validation_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _HASH_RANGE < validation_fraction


@dataclass(frozen=True)
class DocumentEnds:
    """The ids pretraining puts around every document: ``bos`` before it (None: nothing), ``eos`` after."""
    eos: int
    eos_token: str
    bos: int | None = None
    bos_token: str | None = None

    @property
    def is_raytrons(self) -> bool:
        """What raytron always did: <|endoftext|> after each document, nothing before."""
        return self.eos_token == EOS_TOKEN and self.bos is None

    def settings(self) -> dict:
        """The manifest's settings['documents'] (hashed into the fingerprint)."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}


def document_ends(tokenizer: Tokenizer, config: dict) -> DocumentEnds:
    """The document separator of ``tokenizer`` given its tokenizer_config.json's content ({} without one)."""
    special = special_tokens_of(config)
    eos, _ = special_ids(tokenizer, special)
    eos_token = tokenizer.id_to_token(eos)
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # transformers 5 writes no add_bos_token: the post-processor says it
        bos = leading_bos(tokenizer)
    elif not isinstance(add_bos, bool):
        raise ValueError(f"tokenizer_config.json add_bos_token is {add_bos!r}, expected true or false")
    elif add_bos:
        bos = tokenizer.token_to_id(special["bos_token"]) if special.get("bos_token") else None
        if bos is None:
            raise ValueError(f"tokenizer_config.json add_bos_token is true, but its bos_token "
                             f"{special.get('bos_token')!r} is not a token of tokenizer.json")
    else:
        bos = None
    return DocumentEnds(eos, eos_token, bos, None if bos is None else tokenizer.id_to_token(bos))


class TokenizeBatch:
    """Ray Data actor UDF: the tokenizer is parsed once per actor, then applied to every block."""

    def __init__(self, tokenizer_json: str, validation_fraction: float, ends: DocumentEnds):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.ends = ends
        self.validation_fraction = validation_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [text for text in texts if text is not None]
        # encode_batch_fast: the same ids as encode_batch without computing character offsets; no post-processor
        # (BOS and EOS are placed here, once each, whatever the tokenizer.json's template would add)
        ids = [np.asarray(encoding.ids, dtype=np.int32)
               for encoding in self.tokenizer.encode_batch_fast(good, add_special_tokens=False)]
        bos = self.ends.bos
        prefixed = np.array([bos is not None and doc[:1].tolist() != [bos] for doc in ids], dtype=bool)  # (docs,)
        present = np.array([text is not None for text in texts], dtype=bool)  # (records,)
        sizes = np.zeros(len(texts), dtype=np.int32)  # (records,): [BOS] + ids + EOS, 0 for a bad record
        sizes[present] = prefixed + np.array([len(doc) + 1 for doc in ids], dtype=np.int32)
        offsets = np.zeros(len(texts) + 1, dtype=np.int32)
        np.cumsum(sizes, out=offsets[1:])
        starts, stops = offsets[:-1][present], offsets[1:][present]  # (docs,) each document's slots
        values = np.empty(offsets[-1], dtype=np.int32)
        mask = np.ones(len(values), dtype=bool)  # the slots the documents' own ids go to
        values[stops - 1] = self.ends.eos
        mask[stops - 1] = False
        if bos is not None:
            values[starts[prefixed]] = bos
            mask[starts[prefixed]] = False
        if ids:
            values[mask] = np.concatenate(ids)
        split = [text is not None and is_validation(text, self.validation_fraction) for text in texts]
        return pa.table([pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), pa.array(split),
                         batch.column("problem")], schema=TOKENIZED_SCHEMA)


def split_tokens(table: pa.Table, validation: bool) -> tuple[np.ndarray, int]:
    """(the split's documents' ids with their BOS and EOS, concatenated; number of documents) of one block."""
    mask = pc.and_(pc.equal(table.column("validation"), validation), pc.is_null(table.column("problem")))
    chosen = table.column("tokens").filter(mask)
    flat = pc.list_flatten(chosen)
    return flat.to_numpy().astype(np.int32, copy=False), len(chosen)
