"""The SFT JSONL reader: each object line is a record with its file:line; bad lines are named problems; the
blocks it makes are what the SFT encoder reads."""

from __future__ import annotations

import gzip
import json

import pyarrow.fs as pafs
import pytest

from raytron.data.datasource import RECORD_SCHEMA, block_schema, record_blocks
from raytron.data.records import Record, read_records
from raytron.data.sft_batch import SFT_RECORD_SCHEMA, EncodeSftBatch
from raytron.data.sources import SourceFile
from raytron.data.tokenizer import train_tokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_sft_lines_keep_their_text_and_line(tmp_path, fmt):
    path = tmp_path / "sft.jsonl.gz"
    lines = [json.dumps(CHAT), "", "[1, 2]", "{not json", json.dumps({"prompt": "a", "completion": "b"})]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    url = str(path)
    records = list(read_records(pafs.LocalFileSystem(), url, url, fmt, "text"))
    assert records == [
        Record(lines[0], where=f"{url}:1"),
        Record(None, f"{url}:3: a JSON list, not an object"),
        records[2],
        Record(lines[4], where=f"{url}:5"),
    ]
    assert records[2].text is None and records[2].problem.startswith(f"{url}:4: invalid JSON")


def test_sft_file_with_bad_utf8_and_an_empty_file(tmp_path):
    bad, empty = tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    empty.write_bytes(b"")
    fs = pafs.LocalFileSystem()
    assert list(read_records(fs, str(bad), str(bad), "chat", "text")) == [
        Record(None, f"{bad}:1: not valid UTF-8 (byte 12)")]
    assert list(read_records(fs, str(empty), str(empty), "chat", "text")) == [
        Record(None, f"{empty}:0: empty file (no documents)")]


def test_record_blocks_feed_the_sft_encoder_with_file_and_line(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "one two", "completion": "three"}) + "\n" +
                    json.dumps({"prompt": "one", "completion": 3}) + "\n[]\n")
    files = [SourceFile(str(path), path.stat().st_size, 0, "prompt_completion")]
    assert block_schema(files) == SFT_RECORD_SCHEMA
    assert block_schema([SourceFile(str(path), 1, 0, "jsonl")]) == RECORD_SCHEMA
    blocks = list(record_blocks(files, "text", {"local": pafs.LocalFileSystem()}))
    assert len(blocks) == 1 and blocks[0].column("where").to_pylist() == [f"{path}:1", f"{path}:2", None]
    tokenizer = train_tokenizer(["one two three"] * 30, vocab_size=300, special_tokens=["<|endoftext|>"])
    out = EncodeSftBatch(tokenizer.to_str(), "prompt_completion", 16, "fail", 0.0)(blocks[0]).to_pylist()
    assert out[0]["problem"] is None and any(out[0]["loss_mask"]) and not out[0]["loss_mask"][0]
    assert out[1]["problem"].startswith(f"{path}:2: ") and out[2]["problem"] == f"{path}:3: a JSON list, not an object"
