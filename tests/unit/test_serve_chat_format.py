"""Which chat format and EOS set a served folder gets: its own template and end-of-turn token when
tokenizer_config.json has a chat_template, the paragraphs otherwise; generation_config.json's EOS list."""

from __future__ import annotations

import json

import pytest

from raytron.data.tokenizer import DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, train_tokenizer
from raytron.serve.chat_template import PARAGRAPHS, TURN_STOPS, chat_format
from raytron.serve.model_source import ModelSourceError, eos_set
from raytron.serve.protocol import ChatMessage

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["one two three four"] * 5, vocab_size=280, min_frequency=1,
                           special_tokens=DEFAULT_SPECIAL_TOKENS + ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))


def test_folder_without_a_template_keeps_the_paragraphs_format(tmp_path, tokenizer):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    for folder in (tmp_path, tmp_path / "absent"):
        chat = chat_format(folder, tokenizer)
        assert chat is PARAGRAPHS and chat.stops == TURN_STOPS and not chat.end_ids
    assert chat.render([ChatMessage(role="user", content="Hi")]) == "User: Hi\n\nAssistant:"


def test_own_template_brings_its_end_of_turn_token_and_special_tokens(tmp_path, tokenizer):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3, "bos_token": "<|bos|>"}))
    chat = chat_format(tmp_path, tokenizer)
    assert chat.own and chat.stops == () and chat.end_ids == {tokenizer.token_to_id("<|eot_id|>")}
    ids = chat.encode(tokenizer, [ChatMessage(role="user", content="one")])
    assert ids[0] == tokenizer.token_to_id("<|bos|>") and ids.count(tokenizer.token_to_id("<|eot_id|>")) == 1


def test_transformers_saved_folder_serves_its_chat_template_jinja(tmp_path, tokenizer):
    """transformers 5 saves the template as chat_template.jinja, not in tokenizer_config.json; served chats
    must be rendered with it, as apply_chat_template renders them."""
    from transformers import PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eot_id|>")
    saved.chat_template = LLAMA3
    saved.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    messages = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                {"role": "user", "content": "four"}]
    chat = chat_format(tmp_path, tokenizer)
    assert chat.own and chat.end_ids == {tokenizer.token_to_id("<|eot_id|>")}
    expected = PreTrainedTokenizerFast.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert chat.template.render(messages, add_generation_prompt=True) == expected


def test_eos_set_joins_generation_config_list_and_tokenizer_eos(tmp_path, tokenizer):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    assert eos_set(tmp_path, tokenizer, eos) == {eos}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    assert eos_set(tmp_path, tokenizer, eos) == {eos, 7, 9, tokenizer.token_to_id("<|eot_id|>")}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "7"}))
    with pytest.raises(ModelSourceError, match="generation_config.json: eos_token_id must be an int or a list"):
        eos_set(tmp_path, tokenizer, eos)
