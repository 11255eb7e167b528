"""The SFT JSONL reader: each object line is a record with its file:line; bad lines are named problems."""

from __future__ import annotations

import gzip
import json

import pyarrow.fs as pafs
import pytest

from raytron.data.records import Record, read_records

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
