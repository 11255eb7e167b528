"""One supervised fine-tuning record -> token ids and a per-token loss mask.

Formats: ``chat`` (``{"messages": [{"role", "content"}, ...]}``, rendered with the model's chat
template) and ``prompt_completion`` (``{"prompt", "completion"}``, the completion followed by EOS).
``loss_mask[i]`` says whether token ``i`` is scored as a target (predicted from token ``i - 1``):
only assistant / completion tokens, their end-of-turn text or EOS included, unless
``train_on_prompt``; never at position 0 (no token before it in the sample), which packing relies on.
Checks return a problem text instead of raising, so the caller applies ``data.on_bad_record`` exactly
as for plain-text records, naming file and line; a sample too long for a row is reported the same way,
and the caller applies ``data.too_long: fail`` in file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from raytron.data_config import SFT_FORMATS
from raytron.data.chat_template import ChatTemplate, ChatTemplateError
from raytron.data.tokenizer import EOS_TOKEN, PAD_TOKEN

CHAT_ROLES = ("system", "user", "assistant", "tool")
LENGTH_POLICIES = ("truncate", "skip", "fail")


class SampleTooLongError(ValueError):
    """A sample longer than seq_len + 1 tokens under ``data.too_long: fail``."""


def too_long_error(too_long: str) -> SampleTooLongError:
    return SampleTooLongError(f"{too_long} (set data.too_long: truncate or skip)")


@dataclass(frozen=True)
class SftSample:
    tokens: np.ndarray
    """(n,) int32 ids."""
    loss_mask: np.ndarray
    """(n,) bool: token i is a scored target."""
    cut_tokens: int = 0
    """Ids cut off the end by data.too_long: truncate."""

    @property
    def truncated(self) -> bool:
        return self.cut_tokens > 0


@dataclass(frozen=True)
class SftOutcome:
    """Exactly one of: a sample, a bad-record problem, or a sample too long for a row (what data.too_long
    skip or fail acts on, or a truncation that would leave nothing scored)."""
    sample: SftSample | None = None
    problem: str | None = None
    too_long: str | None = None
    """``"<where>: sample of N tokens is longer than ..."``."""

    @property
    def skipped_too_long(self) -> bool:
        return self.too_long is not None


def special_ids(tokenizer: Tokenizer, special_tokens: dict[str, str]) -> tuple[int, int]:
    """(EOS id, pad id): tokenizer_config.json's eos_token / pad_token when given, else raytron's
    ``<|endoftext|>`` / ``<|pad|>``; no pad token pads with EOS (pads are never scored)."""
    named = special_tokens.get("eos_token")
    eos = tokenizer.token_to_id(named or EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer_config.json's eos_token {named!r} is not a token of tokenizer.json" if named else
                         f"no EOS token: expected an eos_token in the tokenizer_config.json beside tokenizer.json "
                         f"or a {EOS_TOKEN} token in tokenizer.json, found neither")
    pad = tokenizer.token_to_id(special_tokens.get("pad_token") or PAD_TOKEN)
    return eos, eos if pad is None else pad


def leading_bos(tokenizer: Tokenizer) -> int | None:
    """The one id the tokenizer's post-processor puts before a text (Llama's BOS), or None."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None


def chat_problem(record: object) -> str | None:
    """Why a chat record cannot be trained on, or None."""
    if not isinstance(record, dict):
        return "a chat record must be a JSON object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object with 'role' and 'content'"
        if message.get("role") not in CHAT_ROLES:
            return f"messages[{index}].role {message.get('role')!r} is not one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{index}].content must be a string"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant turn (nothing to train on)"
    return None


def prompt_completion_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "a prompt_completion record must be a JSON object"
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            return f"'{key}' must be a string"
    if not record["completion"]:
        return "'completion' is empty (nothing to train on)"
    return None


def record_texts(record_json: str) -> list[str]:
    """The strings of an SFT record (message contents, or prompt and completion): the text a tokenizer
    trained for SFT data learns from, never the JSON around it."""
    record = json.loads(record_json)
    messages = record.get("messages")
    if isinstance(messages, list):
        return [message["content"] for message in messages
                if isinstance(message, dict) and isinstance(message.get("content"), str)]
    return [record[key] for key in ("prompt", "completion") if isinstance(record.get(key), str)]


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.array([start for start, _ in offsets], dtype=np.int64)  # (n,)
    mask = np.zeros(len(offsets), dtype=bool)
    for span_start, span_stop in spans:
        mask |= (starts >= span_start) & (starts < span_stop)
    return mask


class SftEncoder:
    """Encodes records of one format; the tokenizer's own post-processor is never applied (the
    template writes any BOS itself), so a chat never starts with two BOS tokens. A prompt_completion
    sample starts with ``bos_id`` (the post-processor's BOS, as ``tokenizer(prompt)`` would give) unless
    the prompt already does."""

    def __init__(self, tokenizer: Tokenizer, fmt: str, eos_id: int, template: ChatTemplate | None = None,
                 train_on_prompt: bool = False, bos_id: int | None = None):
        if fmt not in SFT_FORMATS:
            raise ValueError(f"data.format {fmt!r}: expected one of {', '.join(SFT_FORMATS)}")
        if fmt == "chat" and template is None:
            raise ValueError("data.format chat needs a chat template (data.chat_template or the tokenizer's "
                             "tokenizer_config.json)")
        self.tokenizer, self.fmt, self.eos_id = tokenizer, fmt, eos_id
        self.template, self.train_on_prompt, self.bos_id = template, train_on_prompt, bos_id

    def encode(self, record: object) -> SftSample | str:
        """The sample, or a problem text (without file and line)."""
        if self.fmt == "chat":
            problem = chat_problem(record)
            result = problem if problem else self._encode_chat(record["messages"])
        else:
            problem = prompt_completion_problem(record)
            result = problem if problem else self._encode_prompt_completion(record["prompt"], record["completion"])
        if isinstance(result, str):
            return result
        result.loss_mask[0] = False  # nothing in the sample predicts its first token
        return result if result.loss_mask.any() else "no token to score (the assistant turns render empty)"

    def _encode_chat(self, messages: list[dict]) -> SftSample | str:
        try:
            text, spans = self.template.assistant_spans(messages)
        except ChatTemplateError as error:
            return str(error)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        mask = _mask_from_spans(encoding.offsets, spans)
        tokens = np.asarray(encoding.ids, dtype=np.int32)
        return SftSample(tokens, np.ones_like(mask) if self.train_on_prompt else mask)

    def _encode_prompt_completion(self, prompt: str, completion: str) -> SftSample:
        # encoded apart so no token straddles the boundary and the mask is exact
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if self.bos_id is not None and prompt_ids[:1] != [self.bos_id]:
            prompt_ids = [self.bos_id, *prompt_ids]
        completion_ids = self.tokenizer.encode(completion, add_special_tokens=False).ids + [self.eos_id]
        tokens = np.asarray(prompt_ids + completion_ids, dtype=np.int32)
        mask = np.zeros(len(tokens), dtype=bool)
        mask[0 if self.train_on_prompt else len(prompt_ids):] = True
        return SftSample(tokens, mask)


def fit_length(sample: SftSample, seq_len: int, policy: str, where: str) -> SftOutcome:
    """Apply data.too_long to a sample longer than seq_len + 1 tokens (a shard row holds seq_len + 1):
    truncate it, or report it (skip and fail; the consumer raises for fail, in file order)."""
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"data.too_long {policy!r}: expected one of {', '.join(LENGTH_POLICIES)}")
    limit = seq_len + 1
    if len(sample.tokens) <= limit:
        return SftOutcome(sample=sample)
    if policy != "truncate" or not sample.loss_mask[:limit].any():  # truncation would leave nothing to score
        return SftOutcome(too_long=f"{where}: sample of {len(sample.tokens)} tokens is longer than "
                                   f"train.seq_len + 1 = {limit}")
    return SftOutcome(sample=SftSample(sample.tokens[:limit], sample.loss_mask[:limit], len(sample.tokens) - limit))


def encode_record(encoder: SftEncoder, record: object, seq_len: int, policy: str, where: str) -> SftOutcome:
    """A record of ``where`` (``"<url>:<line>"``) encoded and fitted to the sequence length."""
    result = encoder.encode(record)
    if isinstance(result, str):
        return SftOutcome(problem=f"{where}: {result}")
    return fit_length(result, seq_len, policy, where)
