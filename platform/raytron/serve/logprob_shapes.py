"""Log-probabilities in OpenAI's two response shapes.

- completions (legacy): ``{tokens, token_logprobs, top_logprobs, text_offset}``, one entry per
  token; ``top_logprobs`` maps token text -> logprob (null for a prompt's first token), and
  ``text_offset`` is where each token's text starts in the choice's ``text`` (with ``echo``, the
  prompt's text comes first);
- chat: ``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}``.

A token's text is what decoding it alone gives (a character split over tokens shows as U+FFFD).

The entries are those the engine hands over with the text: after a stop-string cut it has already
dropped the tokens from the stop string's start on (``serve/engine.py``).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Callable, Sequence

from raytron.serve.logprobs import TokenLogprob

TokenText = Callable[[int], str]


def legacy_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """The legacy shape of ``entries``, text offsets counted from ``offset``."""
    texts = [token_text(entry.token) for entry in entries]
    offsets = list(accumulate(map(len, texts[:-1]), initial=offset))[:len(texts)]  # where each text starts
    return {"tokens": texts, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [None if entry.logprob is None else {token_text(t): lp for t, lp in entry.top}
                             for entry in entries],
            "text_offset": offsets}


def _chat_token(token: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """The chat shape of ``entries``."""
    return {"content": [{**_chat_token(entry.token, entry.logprob, token_text),
                         "top_logprobs": [_chat_token(t, lp, token_text) for t, lp in entry.top]}
                        for entry in entries],
            "refusal": None}
