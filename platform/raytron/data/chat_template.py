"""A model's own chat template (tokenizer_config.json's ``chat_template``), rendered as
``transformers.apply_chat_template`` renders it: Jinja in an immutable sandbox (templates come
from model hubs: untrusted code), blocks trimmed, loop controls, ``tojson`` without HTML escapes,
``raise_exception`` and ``strftime_now``, the tokenizer's special tokens as variables.

``assistant_spans`` finds where each assistant turn (with the end-of-turn text the template
writes after it) sits in the rendered chat, so SFT can score exactly those characters: the
conversation up to a turn, rendered with the generation prompt, must be a prefix of the whole.
Serving and training use this one renderer, so both format chats the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template failed (its own raise_exception, bad syntax) or a turn cannot be located."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & for HTML, which would change what the model sees
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken mappings."""
    return token.get("content") if isinstance(token, dict) else token


def special_tokens_of(config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config.json, as text (what templates see)."""
    return {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}


@dataclass
class ChatTemplate:
    source: str
    """The Jinja template text."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """bos_token, eos_token, ... as the template sees them."""

    def __post_init__(self):
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"chat_template line {error.lineno}: {error.message}") from None

    @classmethod
    def from_tokenizer_config(cls, config: dict, where: str = "tokenizer_config.json") -> "ChatTemplate":
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {entry["name"]: entry["template"] for entry in template}.get("default")
        if not isinstance(template, str):
            raise ChatTemplateError(f"{where}: no chat_template (or no 'default' among named ones)")
        return cls(template, special_tokens_of(config))

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **variables)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat_template: {error}") from None

    def assistant_spans(self, messages: list[dict], **variables: Any) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the [start, stop) character span of every assistant turn: from the
        end of the generation prompt before it to the end of the turn (its end-of-turn text included)."""
        text = self.render(messages, **variables)
        spans = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True, **variables)
            through = self.render(messages[: index + 1], **variables)
            if not (text.startswith(through) and through.startswith(before)):
                raise ChatTemplateError(f"messages[{index}]: the template does not render the conversation as a "
                                        "growing prefix, so the assistant turn cannot be located")
            spans.append((len(before), len(through)))
        return text, spans
