"""data.tokenizer defaults to model.init_from's folder, as a transformers user expects of a fine-tuned folder:
its tokenizer.json, tokenizer_config.json and chat template are the run's unless data.tokenizer names others;
an imported model without any tokenizer is refused, never given one trained on the corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.make_sft_smoke_inputs import write_base_model
from raytron.config import ConfigError
from raytron.data.demo_chat import chat_records, write_chatml_tokenizer, write_jsonl
from raytron.data.prepare import prepare
from raytron.data.tokenizer_source import load_configured
from raytron.parallel.hf_import import resolve_init_from
from tests.hf_models import save_tiny


def _resolve(init_from: Path, **data) -> object:
    return resolve_init_from({"model": {"init_from": str(init_from)}, "train": {"seq_len": 64},
                              "data": {"format": "chat", **data}}, "run.yaml")


def test_an_unset_tokenizer_is_the_init_from_folders_and_a_given_one_wins(tmp_path):
    base = write_base_model(tmp_path / "base")
    cfg = _resolve(base)
    assert cfg.data.tokenizer == str(base)
    spec = load_configured(cfg)
    assert spec.json == (base / "tokenizer.json").read_text()
    assert spec.config.folder == str(base) and spec.config.content["eos_token"] == "<|im_end|>"
    other = write_chatml_tokenizer(tmp_path / "other", vocab_size=300)
    assert _resolve(base, tokenizer=str(other)).data.tokenizer == str(other)


def test_an_imported_model_without_a_tokenizer_is_refused_naming_both_fields(tmp_path):
    save_tiny("llama-tied", tmp_path / "llama")  # weights and config.json only
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    cfg = _resolve(tmp_path / "llama", source=str(chats), prepared=str(tmp_path / "out"))
    assert cfg.data.tokenizer is None
    with pytest.raises(ConfigError, match=rf"data.tokenizer: not set, and model.init_from '{tmp_path}/llama' "
                                          r"holds no tokenizer.json"):
        prepare(cfg)  # before any tokenizer is trained or Ray Data starts
