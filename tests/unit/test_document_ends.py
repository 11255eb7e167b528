"""Pretraining documents are framed by the tokenizer's own special tokens, as transformers tokenizes them:
a Llama tokenizer folder (no <|endoftext|>) ends each document with its </s> and starts it with one <s>;
tokenizer_config.json's add_bos_token wins over the post-processor; a tokenizer with no EOS to use fails
naming data.tokenizer; the separator is part of the data fingerprint."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from raytron.config import ConfigError, build_config
from raytron.data.encode import TokenizeBatch
from raytron.data.manifest import fingerprint
from raytron.data.prepare import identity
from raytron.data.sources import SourceFile
from raytron.data.tokenizer import save_tokenizer, train_tokenizer
from raytron.data.tokenizer_source import load_configured
from tests.hf_models import save_llama_tokenizer

TEXTS = [f"the cat number {i} sat on the mat, and the dog said {i % 7} words." for i in range(60)]
SOURCES = [SourceFile("/corpus/a.jsonl", 10, 1, "jsonl")]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_llama_tokenizer(tmp_path_factory.mktemp("llama-tokenizer"), TEXTS)


def _cfg(tokenizer) -> object:
    return build_config({"model": {"vocab_size": 512}, "data": {"tokenizer": str(tokenizer)}})


def _documents(spec, texts: list[str]) -> list[list[int]]:
    table = pa.table({"text": texts, "problem": pa.array([None] * len(texts), type=pa.string())})
    return TokenizeBatch(spec.json, 0.0, spec.ends)(table).column("tokens").to_pylist()


def _edited_copy(folder, target, **config) -> object:
    shutil.copytree(folder, target)
    path = target / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


def test_a_llama_folder_frames_documents_as_transformers_does(llama_folder):
    spec = load_configured(_cfg(llama_folder))
    theirs = AutoTokenizer.from_pretrained(llama_folder)
    assert (spec.ends.eos, spec.ends.bos) == (theirs.eos_token_id, theirs.bos_token_id) == (2, 1)
    for text, ids in zip(TEXTS, _documents(spec, TEXTS)):
        assert ids == [*theirs(text)["input_ids"], theirs.eos_token_id]  # transformers' BOS, then its EOS
    # a text that already starts with the BOS token gets no second one
    (ids,) = _documents(spec, ["<s> the cat sat"])
    assert ids == [1, *theirs("<s> the cat sat", add_special_tokens=False)["input_ids"][1:], 2]


def test_add_bos_token_in_the_config_wins_over_the_post_processor(llama_folder, tmp_path):
    without = load_configured(_cfg(_edited_copy(llama_folder, tmp_path / "off", add_bos_token=False)))
    theirs = AutoTokenizer.from_pretrained(llama_folder)
    assert without.ends.bos is None
    assert _documents(without, TEXTS[:3]) == [[*theirs(t, add_special_tokens=False)["input_ids"], 2] for t in TEXTS[:3]]
    # Llama 2's hub config says add_bos_token: true; here the tokenizer.json's own template adds nothing
    bare = _edited_copy(llama_folder, tmp_path / "on", add_bos_token=True)
    tokenizer = json.loads((bare / "tokenizer.json").read_text())
    (bare / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    assert load_configured(_cfg(bare)).ends.bos == 1
    missing = _edited_copy(llama_folder, tmp_path / "no-bos", add_bos_token=True, bos_token=None)
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*add_bos_token is true, but its bos_token None"):
        load_configured(_cfg(missing))


def test_a_tokenizer_with_no_eos_to_use_fails_naming_data_tokenizer(llama_folder, tmp_path):
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300, special_tokens=["<s>", "</s>"]), tmp_path / "bare")
    with pytest.raises(ConfigError, match=rf"data.tokenizer: {tmp_path}/bare/tokenizer.json: no EOS token: expected "
                                          r"an eos_token in the tokenizer_config.json .* or a <\|endoftext\|> token"):
        load_configured(_cfg(tmp_path / "bare"))
    named = _edited_copy(llama_folder, tmp_path / "named", eos_token={"content": "</doc>", "special": True})
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*eos_token '</doc>' is not a token of tokenizer.json"):
        load_configured(_cfg(named))


def test_the_separator_is_part_of_the_data_fingerprint(llama_folder, tmp_path):
    def digest(tokenizer=None) -> str:
        return fingerprint(identity(_cfg(tokenizer), SOURCES, load_configured(_cfg(tokenizer)) if tokenizer else None))

    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), tmp_path / "raytron")
    raytrons = load_configured(_cfg(tmp_path / "raytron"))
    assert raytrons.ends.is_raytrons and "documents" not in identity(_cfg(tmp_path / "raytron"), SOURCES, raytrons)
    llama = identity(_cfg(llama_folder), SOURCES, load_configured(_cfg(llama_folder)))
    assert llama["documents"] == {"bos_token": "<s>", "eos_token": "</s>"}
    # one tokenizer.json, two separators (the config's add_bos_token): two datasets
    no_bos = _edited_copy(llama_folder, tmp_path / "no-bos", add_bos_token=False)
    assert len({digest(tmp_path / "raytron"), digest(llama_folder), digest(no_bos)}) == 3
