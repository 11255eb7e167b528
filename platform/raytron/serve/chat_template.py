"""How chat messages become one prompt, and which tokens end the assistant's turn.

A served folder whose ``tokenizer_config.json`` has a ``chat_template`` is chatted with in its own
format (rendered by ``data.chat_template.ChatTemplate``, as ``transformers.apply_chat_template``
renders it, special tokens included); its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...)
then ends generation as EOS does. A model without one (raytron's own base GPTs) gets the
paragraphs format: each message a paragraph that starts with its speaker, the prompt ending with
the assistant's turn opened::

    System: {system content}

    User: {user content}

    Assistant:

Generation there stops where the model starts the next turn (``TURN_STOPS``), besides EOS and the
request's own stop strings: the tokenizer has no chat special tokens, so the format is plain text
the model may have seen in its corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from raytron.data.chat_template import ChatTemplate, special_tokens_of
from raytron.parallel.checkpoint_layout import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from raytron.serve.protocol import ChatMessage

SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
TURN_STOPS = tuple(f"{TURN_SEPARATOR}{speaker}:" for speaker in SPEAKERS.values())
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] }}: "
    "{{ message['content'] | trim }}\n\n"
    "{% endfor %}Assistant:")
"""The paragraphs format as a Jinja template over ``messages`` (Hugging Face's convention), which
GET /tokenizer_info hands to clients for models without their own."""

_PROBE = "\x00raytron-turn-probe\x00"
"""Assistant content whose rendering shows what the template writes after a turn."""


@dataclass(frozen=True)
class ChatFormat:
    template: ChatTemplate
    stops: tuple[str, ...]
    """Stop strings every chat request gets (the paragraphs format's next-turn openings)."""
    end_ids: frozenset[int]
    """Token ids that end the assistant's turn (the template's end-of-turn token)."""
    own: bool
    """The model's own template: its text carries special tokens, written by the template itself
    (so the tokenizer adds none, as apply_chat_template(tokenize=True) does not)."""

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        return self.template.render([{"role": m.role, "content": m.text} for m in messages],
                                    add_generation_prompt=add_generation_prompt)

    def encode(self, tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
               add_special_tokens: bool | None = None) -> list[int]:
        add = (not self.own) if add_special_tokens is None else add_special_tokens
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=add).ids


PARAGRAPHS = ChatFormat(ChatTemplate(CHAT_TEMPLATE), TURN_STOPS, frozenset(), own=False)


def render_chat(messages: list[ChatMessage]) -> str:
    """The paragraphs rendering (for models without a template of their own)."""
    return PARAGRAPHS.render(messages)


def end_of_turn_ids(template: ChatTemplate, tokenizer: Tokenizer) -> frozenset[int]:
    """The special tokens the template writes right after an assistant turn's content."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    after = template.render(probe).split(_PROBE, 1)[-1]
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    found = sorted((after.find(text), text) for text in special if text in after)
    return frozenset(tokenizer.token_to_id(text) for _, text in found[:1])


def read_tokenizer_config(folder: Path) -> dict:
    path = folder / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {error.lineno}: not JSON ({error.msg})") from None


def chat_format(folder: Path, tokenizer: Tokenizer) -> ChatFormat:
    """The folder's own chat template, else the paragraphs. As in transformers 5, a chat_template.jinja
    (what its save_pretrained writes) wins over tokenizer_config.json's chat_template."""
    config = read_tokenizer_config(folder)
    template_file = folder / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        template = ChatTemplate(template_file.read_text(), special_tokens_of(config))
    elif config.get("chat_template"):
        template = ChatTemplate.from_tokenizer_config(config, str(folder / TOKENIZER_CONFIG_FILE))
    else:
        return PARAGRAPHS
    return ChatFormat(template, (), end_of_turn_ids(template, tokenizer), own=True)
