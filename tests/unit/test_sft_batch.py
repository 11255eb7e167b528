"""The SFT Ray Data UDF on one block: samples, named problems, length skips and a content-hash split."""

from __future__ import annotations

import json

import pyarrow as pa

from raytron.data.sft_batch import SFT_RECORD_SCHEMA, EncodeSftBatch
from raytron.data.tokenizer import train_tokenizer

EOS = "<|endoftext|>"


def _encoder(seq_len: int, too_long: str = "skip", validation_fraction: float = 0.0) -> EncodeSftBatch:
    tokenizer = train_tokenizer(["one two three four five six"] * 30, vocab_size=300, special_tokens=[EOS])
    return EncodeSftBatch(tokenizer.to_str(), "prompt_completion", seq_len, too_long, validation_fraction)


def _block(records: list[tuple[object | None, str | None]]) -> pa.Table:
    texts = [json.dumps(record) if problem is None else None for record, problem in records]
    wheres = [f"pc.jsonl:{line}" for line in range(1, len(records) + 1)]
    return pa.table([texts, wheres, [problem for _, problem in records]], schema=SFT_RECORD_SCHEMA)


def test_block_gives_samples_problems_and_length_skips():
    block = _block([({"prompt": "one two", "completion": "three"}, None),
                    (None, "pc.jsonl:2: invalid JSON (Expecting value)"),
                    ({"prompt": "one", "completion": ""}, None),
                    ({"prompt": "one two three four five six " * 20, "completion": "one"}, None)])
    encoder = _encoder(seq_len=32)
    out = encoder(block).to_pylist()
    assert out[0]["problem"] is None and out[0]["tokens"][-1] == encoder.encoder.eos_id
    assert out[0]["loss_mask"][0] is False and out[0]["loss_mask"][-1] is True
    assert out[1]["problem"] == "pc.jsonl:2: invalid JSON (Expecting value)" and out[1]["tokens"] == []
    assert out[2]["problem"].startswith("pc.jsonl:3: 'completion' is empty")
    assert out[3]["too_long"].startswith("pc.jsonl:4: sample of ") and out[3]["problem"] is None
    assert out[3]["tokens"] == [] and out[3]["cut_tokens"] == 0
    assert [row["too_long"] for row in out[:3]] == [None, None, None]


def test_truncation_is_counted_and_a_too_long_record_keeps_its_split():
    long = {"prompt": "one", "completion": "two three four five six " * 20}
    out = _encoder(seq_len=16, too_long="truncate")(_block([(long, None)])).to_pylist()[0]
    assert len(out["tokens"]) == 17 and out["cut_tokens"] > 0 and out["too_long"] is None
    # a skipped record is split by its text like any other, so skips are counted per split
    records = [({"prompt": f"one {index} " * 20, "completion": "two"}, None) for index in range(40)]
    skipped = _encoder(seq_len=16, too_long="skip", validation_fraction=0.5)(_block(records)).to_pylist()
    assert all(row["too_long"] for row in skipped) and 0 < sum(row["validation"] for row in skipped) < 40


def test_validation_split_follows_the_record_text_not_its_position():
    records = [({"prompt": f"one {index}", "completion": "two"}, None) for index in range(40)]
    encoder = _encoder(seq_len=32, validation_fraction=0.5)
    forward = encoder(_block(records)).column("validation").to_pylist()
    backward = encoder(_block(records[::-1])).column("validation").to_pylist()
    assert forward == backward[::-1] and 0 < sum(forward) < 40
