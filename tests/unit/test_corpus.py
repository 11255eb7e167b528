"""The docstring corpus: real text, deterministic, distinct, capped by size, reused when complete."""

from __future__ import annotations

import json

import pytest

from raytron.data.corpus import MANIFEST_NAME, build_docstring_corpus

SMALL_CAP = 200_000


def read_documents(paths) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def mtimes(folder) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """The whole standard-library corpus (about 2 MB, a few seconds)."""
    info = build_docstring_corpus(tmp_path_factory.mktemp("stdlib"))
    return info, read_documents(info.paths)


def test_corpus_is_real_stdlib_text(stdlib_corpus):
    info, docs = stdlib_corpus
    assert info.documents == len(docs) > 1000
    by_source = {doc["source"]: doc["text"] for doc in docs}
    assert "Serialize ``obj`` to a JSON formatted ``str``." in by_source["json.dumps"]
    assert "Encode the bytes-like object s using Base64" in by_source["base64.b64encode"]
    assert all(len(doc["text"]) >= 64 for doc in docs)


def test_documents_are_distinct(stdlib_corpus):
    _, docs = stdlib_corpus
    texts = [doc["text"] for doc in docs]
    assert len(set(texts)) == len(texts)


def test_info_matches_files(stdlib_corpus):
    info, _ = stdlib_corpus
    assert [path.name for path in info.paths] == [f"shard-{i:05d}.jsonl" for i in range(len(info.paths))]
    assert info.bytes == sum(path.stat().st_size for path in info.paths)
    assert (info.paths[0].parent / MANIFEST_NAME).is_file()


def test_max_bytes_gives_a_prefix_within_the_cap(stdlib_corpus, tmp_path):
    _, full_docs = stdlib_corpus
    info = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP, docs_per_shard=100)
    docs = read_documents(info.paths)
    assert SMALL_CAP * 0.9 < info.bytes <= SMALL_CAP
    assert len(info.paths) == -(-len(docs) // 100)
    assert docs == full_docs[: len(docs)]


def test_two_builds_are_byte_identical(tmp_path):
    first = build_docstring_corpus(tmp_path / "a", max_bytes=SMALL_CAP, docs_per_shard=100)
    second = build_docstring_corpus(tmp_path / "b", max_bytes=SMALL_CAP, docs_per_shard=100, workers=1)
    assert len(first.paths) == len(second.paths) > 1
    for a, b in zip(first.paths, second.paths):
        assert a.read_bytes() == b.read_bytes()


def test_complete_corpus_is_reused_without_rewriting(tmp_path):
    first = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP)
    before = mtimes(tmp_path)
    again = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP)
    assert again == first
    assert mtimes(tmp_path) == before


def test_incomplete_or_different_corpus_is_rebuilt(tmp_path):
    first = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP)
    (tmp_path / MANIFEST_NAME).unlink()  # as if the build had been killed before finishing
    first.paths[0].write_text("truncated")
    rebuilt = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP)
    assert rebuilt == first
    assert sum(path.stat().st_size for path in rebuilt.paths) == rebuilt.bytes
    smaller = build_docstring_corpus(tmp_path, max_bytes=SMALL_CAP // 2)
    assert smaller.bytes <= SMALL_CAP // 2
    assert sorted(tmp_path.glob("shard-*.jsonl")) == smaller.paths
