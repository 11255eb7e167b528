"""Where SFT's template and special tokens come from: data.chat_template (inline or a file), else the
tokenizer folder's chat_template.jinja / tokenizer_config.json (whose eos_token pretraining reads too)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from raytron.config import ConfigError, build_config
from raytron.data.sft_setup import sft_setup
from raytron.data.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer
from raytron.data.tokenizer_source import load_configured, tokenizer_files

TEMPLATE = "{% for m in messages %}<|turn|>{{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Llama-like tokenizer folder: no <|endoftext|>, its EOS named by tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("hf")
    save_tokenizer(train_tokenizer(["one two three"] * 20, vocab_size=300, special_tokens=["<s>", "</s>", "<|turn|>"]),
                   folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>",
                                                              "bos_token": {"content": "<s>"}}))
    return folder


def _cfg(**data):
    return build_config({"model": {"vocab_size": 512}, "data": data})


def test_tokenizer_files_of_a_file_a_folder_and_s3(hf_folder):
    assert tokenizer_files(str(hf_folder)) == (f"{hf_folder}/tokenizer.json", str(hf_folder))
    assert tokenizer_files(f"{hf_folder}/tokenizer.json") == (f"{hf_folder}/tokenizer.json", str(hf_folder))
    assert tokenizer_files("s3://b/models/llama/") == ("s3://b/models/llama/tokenizer.json", "s3://b/models/llama")
    assert tokenizer_files("s3://b/tok/tokenizer.json") == ("s3://b/tok/tokenizer.json", "s3://b/tok")


def test_the_folders_template_and_tokens_are_used_for_chat(hf_folder):
    spec = load_configured(_cfg(format="chat", tokenizer=str(hf_folder)))
    setup = sft_setup(_cfg(format="chat").data, spec)
    assert setup.template == TEMPLATE and setup.template_source == f"{hf_folder}/tokenizer_config.json"
    assert setup.special_tokens == {"eos_token": "</s>", "bos_token": "<s>"}
    inline = sft_setup(_cfg(format="chat", chat_template="{{ messages[0]['content'] }}").data, spec)
    assert inline.template_source == "data.chat_template" and inline.special_tokens == setup.special_tokens
    assert sft_setup(_cfg(format="prompt_completion").data, spec).template is None


def test_chat_template_jinja_wins_over_the_config(hf_folder, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    (folder / "chat_template.jinja").write_text("{{ 'jinja' }}")
    setup = sft_setup(_cfg(format="chat").data, load_configured(_cfg(format="chat", tokenizer=str(folder))))
    assert setup.template == "{{ 'jinja' }}" and setup.template_source == f"{folder}/chat_template.jinja"


def test_pretraining_ends_documents_with_the_configs_eos(hf_folder):
    # the folder's tokenizer has no <|endoftext|>: its tokenizer_config.json names the EOS, for SFT and pretraining
    spec = load_configured(_cfg(tokenizer=str(hf_folder)))
    assert spec.config is not None and spec.ends.eos_token == "</s>"
    assert spec.ends.eos == Tokenizer.from_str(spec.json).token_to_id("</s>") and spec.ends.bos is None


def test_a_bare_tokenizer_gets_raytrons_tokens_that_it_has(tmp_path):
    save_tokenizer(train_tokenizer(["one two"] * 20, vocab_size=300, special_tokens=[EOS_TOKEN]), tmp_path)
    spec = load_configured(_cfg(format="chat", tokenizer=str(tmp_path / "tokenizer.json")))
    assert spec.config is None
    setup = sft_setup(_cfg(format="chat", chat_template=TEMPLATE).data, spec)
    assert setup.special_tokens == {"eos_token": EOS_TOKEN} and setup.tokenizer_config_sha256 is None
    with pytest.raises(ConfigError, match="data.format chat needs a chat template"):
        sft_setup(_cfg(format="chat").data, spec)
