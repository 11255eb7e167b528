"""The data section's SFT fields: strict, in the schema, and part of the prepared data's fingerprint."""

from __future__ import annotations

import pytest

from raytron.config import ConfigError, build_config, schema_rows
from raytron.data.manifest import fingerprint
from raytron.data.prepare import identity
from raytron.data.sources import SourceFile, list_sources

SFT_FIELDS = ("data.train_on_prompt", "data.too_long", "data.packing", "data.chat_template")


def test_sft_fields_are_in_the_schema_with_their_defaults():
    rows = {row[0]: row for row in schema_rows()}
    for path in SFT_FIELDS:
        assert path in rows and rows[path][3], path
    assert rows["data.too_long"][2] == "'truncate'"
    assert "chat" in rows["data.format"][1] and "prompt_completion" in rows["data.format"][1]


def test_sft_formats_accept_their_fields():
    cfg = build_config({"data": {"format": "chat", "train_on_prompt": True, "too_long": "skip", "packing": True,
                                 "chat_template": "{{ messages }}"}})
    assert cfg.data.is_sft and cfg.data.packing and cfg.data.too_long == "skip"
    assert build_config({"data": {"format": "prompt_completion", "too_long": "fail"}}).data.is_sft
    assert not build_config({}).data.is_sft


@pytest.mark.parametrize("data, expected", [
    ({"packing": True}, "data.packing: only for data.format chat or prompt_completion (got format 'auto')"),
    ({"format": "text", "train_on_prompt": True}, "data.train_on_prompt: only for data.format chat"),
    ({"format": "jsonl", "too_long": "skip"}, "data.too_long: only for data.format chat"),
    ({"format": "prompt_completion", "chat_template": "x"}, "data.chat_template: only for data.format chat"),
    ({"format": "chat", "too_long": "cut"}, "data.too_long: Input should be 'truncate', 'skip' or 'fail'"),
    ({"format": "chat", "packing": "maybe"}, "data.packing"),
    ({"format": "conversation"}, "data.format"),
])
def test_bad_sft_settings_name_the_field(data, expected):
    with pytest.raises(ConfigError) as caught:
        build_config({"data": data})
    assert expected in str(caught.value)


SOURCES = [SourceFile("/corpus/a.jsonl", 10, 1, "chat")]


TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _digest(**data) -> str:
    return fingerprint(identity(build_config({"data": {"format": "chat", "chat_template": TEMPLATE, **data}}),
                                SOURCES, None))


def test_every_sft_field_changes_the_fingerprint():
    base = _digest()
    changed = {_digest(train_on_prompt=True), _digest(too_long="skip"), _digest(packing=True),
               _digest(chat_template="{{ messages }}"), _digest(format="prompt_completion", chat_template=None)}
    assert base not in changed and len(changed) == 5


def test_a_template_file_is_read_and_its_text_is_in_the_fingerprint(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    settings = identity(build_config({"data": {"format": "chat", "chat_template": str(path)}}), SOURCES, None)
    assert settings["sft"]["chat_template"] == TEMPLATE and settings["sft"]["chat_template_source"] == str(path)
    before = fingerprint(settings)
    path.write_text(TEMPLATE + "!")
    assert fingerprint(identity(build_config({"data": {"format": "chat", "chat_template": str(path)}}),
                                SOURCES, None)) != before


def test_pretraining_identity_has_no_sft_keys():
    # pretraining data prepared before these fields existed keeps its fingerprint and folder
    settings = identity(build_config({}), [SourceFile("/corpus/a.txt", 10, 1, "text")], None)
    assert "sft" not in settings


@pytest.mark.parametrize("data, expected", [
    ({}, "data.format chat needs a chat template: set data.chat_template"),
    ({"chat_template": "no/such/template.jinja"}, "data.chat_template: 'no/such/template.jinja' is neither inline"),
    ({"chat_template": "{% for %}"}, "data.chat_template (data.chat_template): chat_template line 1"),
])
def test_a_chat_without_a_usable_template_fails_naming_data_chat_template(data, expected):
    with pytest.raises(ConfigError) as caught:
        identity(build_config({"data": {"format": "chat", **data}}), SOURCES, None)
    assert expected in str(caught.value)


def test_sft_formats_are_listed_and_refused_in_streaming_mode(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    cfg = build_config({"data": {"format": "chat", "source": str(source)}})
    assert [file.format for file in list_sources(cfg)] == ["chat"]
    with pytest.raises(ConfigError, match="data.mode: 'streaming' reads pretraining text only"):
        build_config({"data": {"format": "chat", "mode": "streaming"}})
