"""The prepare pipeline's parts without Ray: records and bad-record problems, source listing,
streaming packing, the tokenize UDF, and `raytron tokenizer train`."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raytron.cli import main
from raytron.config import load_config
from raytron.data.encode import TokenizeBatch, document_ends, is_validation
from raytron.data.packing import BlockPacker
from raytron.data.records import BadRecordError, checked, read_records
from raytron.data.sources import list_sources
from raytron.data.tokenizer import EOS_TOKEN, load_tokenizer, pack_documents, train_tokenizer
from raytron.storage import StorageError

GOOD = json.dumps({"text": "fine"}) + "\n"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# (file name, content, the problem reported: "<line>: <what>")
BAD_INPUTS = [
    ("invalid.jsonl", GOOD + '{"text": "cut\n', "2: invalid JSON"),
    ("missing.jsonl", GOOD + GOOD + '{"body": "x"}\n', "3: missing field 'text'"),
    ("null.jsonl", '{"text": null}\n', "1: missing field 'text'"),
    ("number.jsonl", '{"text": 3}\n', "1: field 'text' is a int, not a string"),
    ("emptytext.jsonl", '{"text": ""}\n', "1: field 'text' is empty"),
    ("array.jsonl", "[1, 2]\n", "1: a JSON list, not an object"),
    ("latin1.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', "2: not valid UTF-8"),
    ("gzipped.jsonl.gz", gzip.compress((GOOD + "nope\n").encode()), "2: invalid JSON"),
    ("empty.jsonl", b"", "0: empty file"),
    ("blank.jsonl", "\n\n", "0: empty file"),
    ("empty.txt", b"", "0: empty file"),
    ("latin1.txt", b"one\ntwo \xff\n", "2: not valid UTF-8"),
    ("nocolumn.parquet", parquet_bytes(pa.table({"body": ["x"]})), "0: no column 'text'"),
    ("nullrow.parquet", parquet_bytes(pa.table({"text": ["a", None]})), "row 2: missing field 'text'"),
    ("broken.parquet", b"PAR1 not really", "0: not a readable Parquet file"),
]


@pytest.mark.parametrize("name, content, problem", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_records_named_by_file_and_line_skip_keeps_going(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    cfg = load_config(None, [f"data.source={path}"])
    [source] = list_sources(cfg)
    records = lambda: read_records(pafs.LocalFileSystem(), str(path), str(path), source.format, "text")  # noqa: E731
    with pytest.raises(BadRecordError, match=f"{path}:{problem}"):
        list(checked(records(), "fail"))
    skipped = list(checked(records(), "skip"))
    assert [record.problem.split(" (")[0] for record in skipped if record.problem] == [f"{path}:{problem}"]
    assert all(record.text for record in skipped if not record.problem)


def test_sources_expand_prefix_glob_and_list_sorted_once(tmp_path):
    for name in ("b/2.jsonl", "b/1.jsonl.gz", "a/x.parquet", "a/deep/y.txt", "a/_SUCCESS", "a/.hidden.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    cfg = load_config(None, [f"data.source=[{tmp_path}/b/*.jsonl*, {tmp_path}/a, {tmp_path}/b/2.jsonl]"])
    sources = list_sources(cfg)
    assert [s.url.removeprefix(f"{tmp_path}/") for s in sources] == ["a/deep/y.txt", "a/x.parquet", "b/1.jsonl.gz",
                                                                     "b/2.jsonl"]
    assert [s.format for s in sources] == ["text", "parquet", "jsonl", "jsonl"]
    assert all(s.size == 1 and s.mtime_ns > 0 for s in sources)
    for missing in (f"{tmp_path}/nothing", f"{tmp_path}/b/*.csv"):
        with pytest.raises(StorageError, match=re.escape(f"data.source: {missing}")):
            list_sources(load_config(None, [f"data.source={missing}"]))


def test_streaming_packer_equals_packing_everything_at_once():
    rng = np.random.default_rng(0)
    documents = [rng.integers(3, 100, size=rng.integers(1, 40)).astype(np.int32) for _ in range(200)]
    whole = pack_documents(documents, seq_len=15, eos_id=0)
    packer = BlockPacker(15)
    chunks = [packer.add(np.concatenate([np.append(doc, 0) for doc in documents[i:i + 7]]).astype(np.int32))
              for i in range(0, len(documents), 7)]
    assert np.array_equal(np.concatenate(chunks), whole)
    assert packer.dropped == sum(len(doc) + 1 for doc in documents) - whole.size


def test_tokenize_udf_appends_eos_and_splits_by_text_hash():
    texts = [f"document number {i}: " + "words " * (i % 7) for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    batch = pa.table({"text": [*texts[:150], None, *texts[150:]], "problem": [None] * 150 + ["f:1: bad"] + [None] * 150})
    out = TokenizeBatch(tokenizer.to_str(), 0.3, document_ends(tokenizer, {}))(batch)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    rows = out.to_pylist()
    assert rows[150] == {"tokens": [], "validation": False, "problem": "f:1: bad"}
    for text, row in zip(texts, rows[:150] + rows[151:]):
        assert row["tokens"] == [*tokenizer.encode(text).ids, eos]
        assert row["validation"] == is_validation(text, 0.3)
    assert 40 < sum(row["validation"] for row in rows) < 140  # about 30% of 300


def test_tokenizer_train_command_writes_a_tokenizer_of_the_configured_size(tmp_path, capsys):
    texts = [f"def function_{i}(argument): return argument * {i} # a comment about {i}" for i in range(2000)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    out = tmp_path / "tok" / "tokenizer.json"
    assert main(["tokenizer", "train", "--set", f"data.source={tmp_path / 'corpus.jsonl'}",
                 "--set", "model.vocab_size=400", "--out", str(out)]) == 0
    tokenizer = load_tokenizer(out)
    assert tokenizer.get_vocab_size() == 400 and tokenizer.token_to_id(EOS_TOKEN) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 400
