"""End to end on moto's S3 server: the docstring corpus uploaded as JSONL (+ gzip), Parquet and text
files, prepared with Ray Data, shards decoded and compared with the tokenizer applied directly;
an unreachable endpoint, a missing bucket and denied access fail in seconds naming the URL."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.config import load_config
from raytron.data.corpus import build_docstring_corpus
from raytron.data.encode import is_validation
from raytron.data.prepare import prepare
from raytron.data.shards import read_split
from raytron.data.tokenizer import EOS_TOKEN, load_tokenizer
from raytron.storage import StorageError, join_url, read_bytes, write_bytes
from tests.servers import free_port

SEQ_LEN = 32
BUCKET = "prepare-e2e"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def upload_corpus(texts: list[str], root: str) -> list[str]:
    """Thirds of the documents as JSONL (plain + gzip), Parquet (2 files) and one text file per document.

    Returns the documents in the order of their files' sorted URLs, then file order."""
    third = len(texts) // 3
    jsonl, parquet, text = texts[:third], texts[third:2 * third], texts[2 * third:]

    def lines(docs):
        return "".join(json.dumps({"text": doc, "source": "x"}) + "\n" for doc in docs).encode()
    half = len(jsonl) // 2
    write_bytes(f"{root}/jsonl/a.jsonl", lines(jsonl[:half]))
    write_bytes(f"{root}/jsonl/b.jsonl.gz", gzip.compress(lines(jsonl[half:]), mtime=0))
    half = len(parquet) // 2
    for name, docs in (("a", parquet[:half]), ("b", parquet[half:])):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), buffer)
        write_bytes(f"{root}/parquet/{name}.parquet", buffer.getvalue())
    for index, doc in enumerate(text):
        write_bytes(f"{root}/text/doc-{index:04d}.txt", doc.encode())
    return jsonl + parquet + text


def expected_blocks(texts: list[str], tokenizer, validation: bool, fraction: float) -> tuple[np.ndarray, int]:
    """The split's documents tokenized one by one, EOS after each, concatenated, cut into blocks."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    stream = [token for text in texts if is_validation(text, fraction) == validation
              for token in [*tokenizer.encode(text).ids, eos]]
    rows = len(stream) // (SEQ_LEN + 1)
    return np.array(stream[: rows * (SEQ_LEN + 1)], dtype=np.int32).reshape(rows, SEQ_LEN + 1), len(stream) % (SEQ_LEN + 1)


def test_prepare_from_s3_matches_direct_tokenization(ray_cluster, s3_env, tmp_path):
    s3_env.create_bucket(BUCKET)
    corpus = build_docstring_corpus(tmp_path / "corpus", max_bytes=150_000)
    texts = [json.loads(line)["text"] for path in corpus.paths for line in path.read_text().splitlines()]
    root = f"s3://{BUCKET}/corpus"
    ordered = upload_corpus(texts, root)
    prepared = f"s3://{BUCKET}/prepared"
    # listed out of order, with a prefix, a glob and a file: sorted sources make that irrelevant
    cfg = load_config(None, [f"data.source=[{root}/text/*.txt, {root}/parquet/, {root}/jsonl]",
                             f"data.prepared={prepared}", "model.vocab_size=512", f"train.seq_len={SEQ_LEN}",
                             "data.validation_fraction=0.2", "data.shard_blocks=500"])
    result = prepare(cfg)
    assert not result.reused
    manifest = result.manifest
    assert len(manifest.sources) == 4 + len(ordered) - 2 * (len(texts) // 3)
    assert [source["url"] for source in manifest.sources] == sorted(source["url"] for source in manifest.sources)
    assert manifest.bad_records == 0 and manifest.seq_len == SEQ_LEN

    # the shards' tokenizer is the one saved next to them
    local_tokenizer = tmp_path / "tokenizer.json"
    local_tokenizer.write_bytes(read_bytes(join_url(prepared, "tokenizer.json")))
    tokenizer = load_tokenizer(local_tokenizer)
    assert tokenizer.get_vocab_size() == 512
    documents = 0
    for name in ("train", "validation"):
        split = manifest.splits[name]
        blocks, ids = read_split(split)
        want, dropped = expected_blocks(ordered, tokenizer, name == "validation", 0.2)
        assert blocks.shape == want.shape and np.array_equal(blocks, want), name
        assert np.array_equal(ids, np.arange(len(blocks)))
        assert split.rows == len(blocks) and split.dropped_tokens == dropped
        assert all(shard.rows <= 500 for shard in split.shards) and len(split.shards) == -(-split.rows // 500)
        documents += split.documents
    assert documents == len(texts)
    assert 0 < manifest.splits["validation"].documents < manifest.splits["train"].documents
    summary = dict((row[0], row[1:]) for row in result.summary_rows())
    assert summary["output"][0] == prepared and summary["bad records"][0] == "0"

    again = prepare(cfg)
    assert again.reused and again.manifest.fingerprint == manifest.fingerprint


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["closed port", "missing bucket"])
def test_unreachable_storage_fails_fast_naming_the_url(s3_env, monkeypatch, what):
    url = "s3://no-such-bucket-here/corpus/"
    if what == "closed port":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    cfg = load_config(None, [f"data.source={url}", "data.prepared=s3://no-such-bucket-here/out"])
    with pytest.raises(StorageError, match=f"data.source: .*{url}"):
        prepare(cfg)


@pytest.fixture
def s3_enforcing_auth(monkeypatch):
    """A second moto S3 server, in its own process with IAM auth enforced from the first request
    (process-wide in moto, so not the session's server): unknown credentials are denied."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.1)
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "nobody",
                           "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        yield
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.timeout(60)
def test_denied_access_fails_fast_naming_the_url(s3_enforcing_auth):
    url = "s3://corpus/texts/"
    cfg = load_config(None, [f"data.source={url}", "data.prepared=s3://corpus/out"])
    with pytest.raises(StorageError, match=f"data.source: .*{url}.*ACCESS_DENIED"):
        prepare(cfg)
