"""Encoding a block of SFT records in a Ray Data actor, the SFT counterpart of encode.TokenizeBatch.

Input columns: ``record`` (the JSON object's text, null for a record the reader already found bad),
``where`` (``"<url>:<line>"``) and ``problem``. Output: ``tokens`` and ``loss_mask`` (a fitted
sample, empty otherwise), ``validation`` (a hash of the record's text, as for plain documents, so a
record's split never depends on its position), ``problem``, ``too_long`` (why a sample does not fit
a row: skipped, or fails under data.too_long: fail) and ``cut_tokens`` (ids truncation cut off).
"""

from __future__ import annotations

import json

import pyarrow as pa
from tokenizers import Tokenizer

from raytron.data.chat_template import ChatTemplate
from raytron.data.encode import is_validation
from raytron.data.sft_encode import SftEncoder, encode_record, leading_bos, special_ids

SFT_RECORD_SCHEMA = pa.schema([("record", pa.string()), ("where", pa.string()), ("problem", pa.string())])
SFT_ENCODED_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_())),
                                ("validation", pa.bool_()), ("problem", pa.string()), ("too_long", pa.string()),
                                ("cut_tokens", pa.int32())])


class EncodeSftBatch:
    """Ray Data actor UDF: tokenizer and template are parsed once per actor."""

    def __init__(self, tokenizer_json: str, fmt: str, seq_len: int, too_long: str, validation_fraction: float,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 train_on_prompt: bool = False):
        tokenizer = Tokenizer.from_str(tokenizer_json)
        special_tokens = special_tokens or {}
        template = ChatTemplate(chat_template, special_tokens) if chat_template is not None else None
        eos, _ = special_ids(tokenizer, special_tokens)
        self.encoder = SftEncoder(tokenizer, fmt, eos, template, train_on_prompt, leading_bos(tokenizer))
        self.seq_len, self.too_long, self.validation_fraction = seq_len, too_long, validation_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: [] for name in SFT_ENCODED_SCHEMA.names}
        for text, where, problem in zip(*(batch.column(name).to_pylist() for name in SFT_RECORD_SCHEMA.names)):
            outcome = None
            if problem is None:
                outcome = encode_record(self.encoder, json.loads(text), self.seq_len, self.too_long, where)
                problem = outcome.problem
            sample = outcome.sample if outcome else None
            columns["tokens"].append(sample.tokens if sample else [])
            columns["loss_mask"].append(sample.loss_mask if sample else [])
            columns["validation"].append(problem is None and is_validation(text, self.validation_fraction))
            columns["problem"].append(problem)
            columns["too_long"].append(outcome.too_long if outcome else None)
            columns["cut_tokens"].append(sample.cut_tokens if sample else 0)
        return pa.table([pa.array(columns[name], type=SFT_ENCODED_SCHEMA.field(name).type)
                         for name in SFT_ENCODED_SCHEMA.names], schema=SFT_ENCODED_SCHEMA)
