"""Log-probabilities in OpenAI's two response shapes.

- completions (legacy): ``{tokens, token_logprobs, top_logprobs, text_offset}``, one entry per
  token; ``top_logprobs`` maps token text -> logprob (null for a prompt's first token), and
  ``text_offset`` is where each token's text starts in the choice's ``text`` (with ``echo``, the
  prompt's text comes first);
- chat: ``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}``.

A token's text is what decoding it alone gives (a character split over tokens shows as U+FFFD).

After a stop-string cut the engine has generated (and scored) tokens the returned text does not
hold. Given ``end``, where the returned text ends, both shapes keep only the tokens that start
before it: they describe the returned text and nothing after it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from raytron.serve.logprobs import TokenLogprob

TokenText = Callable[[int], str]


def returned(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0,
             end: int | None = None) -> tuple[list[TokenLogprob], list[str], list[int]]:
    """The entries that start before ``end`` (all when None), their texts and text offsets from ``offset``."""
    kept, texts, offsets = [], [], []
    for entry in entries:
        if end is not None and offset >= end:
            break
        text = token_text(entry.token)
        kept.append(entry)
        texts.append(text)
        offsets.append(offset)
        offset += len(text)
    return kept, texts, offsets


def legacy_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0,
                    end: int | None = None) -> dict[str, Any]:
    """The legacy shape of ``entries``, text offsets counted from ``offset``, cut at ``end``."""
    entries, texts, offsets = returned(entries, token_text, offset, end)
    return {"tokens": texts, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [None if entry.logprob is None else {token_text(t): lp for t, lp in entry.top}
                             for entry in entries],
            "text_offset": offsets}


def _chat_token(token: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, end: int | None = None) -> dict[str, Any]:
    """The chat shape of ``entries`` (the content's tokens from offset 0), cut at ``end``."""
    entries = returned(entries, token_text, 0, end)[0]
    return {"content": [{**_chat_token(entry.token, entry.logprob, token_text),
                         "top_logprobs": [_chat_token(t, lp, token_text) for t, lp in entry.top]}
                        for entry in entries],
            "refusal": None}
