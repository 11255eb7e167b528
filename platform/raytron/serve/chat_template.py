"""How chat messages become one prompt for a base (not instruction-tuned) GPT.

Each message is a paragraph that starts with its speaker, and the prompt ends with the
assistant's turn opened::

    System: {system content}

    User: {user content}

    Assistant: {assistant content}

    User: {user content}

    Assistant:

Generation stops where the model starts the next turn (``TURN_STOPS``), besides EOS and the
request's own stop strings. The tokenizer has no chat special tokens, so the template is
plain text the model may have seen in its corpus.
"""

from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment

from raytron.serve.protocol import ChatMessage

SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
TURN_STOPS = tuple(f"{TURN_SEPARATOR}{speaker}:" for speaker in SPEAKERS.values())
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] }}: "
    "{{ message['content'] | trim }}\n\n"
    "{% endfor %}Assistant:")
"""The rendering above as a Jinja template over ``messages`` (Hugging Face's convention), which
GET /tokenizer_info hands to clients; rendered in a sandbox as transformers does."""

_template = ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[ChatMessage]) -> str:
    return _template.render(messages=[{"role": m.role, "content": m.text} for m in messages])
