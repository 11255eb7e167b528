"""Byte-level BPE on the docstring corpus: exact round trips, special tokens, vocab size; packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytron.data.corpus import build_docstring_corpus
from raytron.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    pack_documents,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

VOCAB = 1024


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    info = build_docstring_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=1_000_000)
    return [json.loads(line)["text"] for path in info.paths for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=VOCAB)


def test_vocab_size_is_as_asked(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB


def test_special_tokens_take_the_first_ids(tokenizer):
    ids = special_token_ids(tokenizer)
    assert (ids.eos, ids.bos, ids.pad) == (0, 1, 2)


def test_special_tokens_are_not_split(tokenizer):
    ids = special_token_ids(tokenizer)
    encoding = tokenizer.encode(f"end{EOS_TOKEN}start{PAD_TOKEN}")
    assert encoding.ids.count(ids.eos) == 1 and encoding.ids.count(ids.pad) == 1
    assert EOS_TOKEN in encoding.tokens and PAD_TOKEN in encoding.tokens


def test_round_trip_on_every_corpus_document(tokenizer, texts):
    for text, encoding in zip(texts, tokenizer.encode_batch(texts)):
        assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text


def test_round_trip_of_text_unseen_in_training(tokenizer):
    text = "  naïve café — 東京 🙂\ttabs\r\nand\x00bytes "
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_save_and_load_give_the_same_encodings(tokenizer, texts, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path)
    assert path.name == "tokenizer.json"
    for loaded in (load_tokenizer(path), load_tokenizer(tmp_path)):
        assert [e.ids for e in loaded.encode_batch(texts[:50])] == [e.ids for e in tokenizer.encode_batch(texts[:50])]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_concatenates_documents_with_eos_and_drops_the_tail(seq_len):
    eos = 0
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 500, size=rng.integers(0, 40)).tolist() for _ in range(60)]
    blocks = pack_documents(docs, seq_len, eos)
    stream = [token for doc in docs for token in [*doc, eos]]
    n_blocks = len(stream) // (seq_len + 1)
    assert blocks.shape == (n_blocks, seq_len + 1)
    assert blocks.ravel().tolist() == stream[: n_blocks * (seq_len + 1)]
    kept_ends = np.cumsum([len(doc) + 1 for doc in docs]) <= blocks.size
    assert int((blocks == eos).sum()) == int(kept_ends.sum())


def test_packing_too_little_text_gives_no_blocks():
    assert pack_documents([], 8, 0).shape == (0, 9)
    assert pack_documents([[5, 6, 7]], 8, 0).shape == (0, 9)
