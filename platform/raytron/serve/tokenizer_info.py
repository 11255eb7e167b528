"""GET /tokenizer_info: what a client needs to count and align tokens without loading the tokenizer."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from raytron.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN
from raytron.serve.chat_template import ChatFormat


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, context: int, chat: ChatFormat) -> dict[str, Any]:
    """The special tokens (null where the vocabulary lacks one), the vocabulary's size, the context
    window and the chat template (Jinja, over ``messages``; a model's own one with the special
    tokens it names, which then override raytron's defaults)."""
    info: dict[str, Any] = {"tokenizer_class": "tokenizers.Tokenizer", "vocab_size": vocab_size,
                            "model_max_length": context, "max_model_len": context,
                            "chat_template": chat.template.source}
    named = chat.template.special_tokens
    for role, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN)):
        token = named.get(f"{role}_token") or token
        token_id = tokenizer.token_to_id(token)
        info[f"{role}_token"] = None if token_id is None else token
        info[f"{role}_token_id"] = token_id
    return info
