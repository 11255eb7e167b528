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

from raytron.serve.protocol import ChatMessage

SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
TURN_STOPS = tuple(f"{TURN_SEPARATOR}{speaker}:" for speaker in SPEAKERS.values())


def render_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{SPEAKERS[m.role]}: {m.text.strip()}" for m in messages]
    return TURN_SEPARATOR.join([*turns, f"{SPEAKERS['assistant']}:"])
