"""Request and response bodies in OpenAI's shapes, and OpenAI-style errors.

Requests are validated strictly: names OpenAI does not define are 400 ``unknown_parameter``,
wrong types (``"max_tokens": "5"``) 400 ``invalid_value``, and OpenAI's parameters that raytron
does not act on (``*_UNSUPPORTED``) 400 ``unsupported_parameter`` unless they ask for nothing; every
error names the offending parameter and ``null`` means a parameter's default. ``top_k``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids`` and ``ignore_eos`` are vLLM's extensions. Responses are plain dicts built here, in the shapes the ``openai`` client parses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """Answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    """Send one last chunk with ``usage`` and no choices before ``data: [DONE]``."""
    continuous_usage_stats: bool | None = None
    """Accepted (vLLM's); usage comes in the last chunk only."""


def _is(*defaults: Any):
    return lambda value, body: value is None or any(value == default for default in defaults)


COMPLETION_UNSUPPORTED: dict[str, Any] = {"suffix": _is(""),
                                          "best_of": lambda value, body: value is None or value == (body.get("n") or 1)}
CHAT_UNSUPPORTED: dict[str, Any] = {
    "tools": _is([]), "functions": _is([]), "tool_choice": _is("none"), "function_call": _is("none"),
    "response_format": _is({"type": "text"}), "audio": _is(), "modalities": _is(["text"]),
    "prediction": _is(), "reasoning_effort": _is(), "web_search_options": _is(), "verbosity": _is(),
    "store": _is(False),
}
"""OpenAI's parameters raytron does not act on, name -> whether a value asks for nothing raytron lacks
(null, or the do-nothing value): those are accepted and dropped, any other answers 400
unsupported_parameter naming it."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=16)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # accepted and ignored: they steer OpenAI's own services (abuse monitoring, caching, tiers)
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


TokenIds = list[int]


class CompletionRequest(_Request):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(min_length=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    unsupported: ClassVar[dict[str, Any]] = COMPLETION_UNSUPPORTED

    def prompts(self) -> list[str | TokenIds]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    unsupported: ClassVar[dict[str, Any]] = CHAT_UNSUPPORTED

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    for name, harmless in getattr(model, "unsupported", {}).items():
        if name in body and not harmless(body[name], body):
            raise ApiError(400, f"{name}: {body[name]!r} is not supported by this server", name,
                           "unsupported_parameter")
    body = {name: value for name, value in body.items() if name not in getattr(model, "unsupported", {})}
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = _param_path(first["loc"])
        code = "unknown_parameter" if first["type"] == "extra_forbidden" else "invalid_value"
        raise ApiError(400, f"{param}: {first['msg']} (got {first.get('input')!r})", param, code) from None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered by the chat template."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    """Let the tokenizer add its special tokens (default: as completions do, yes)."""
    add_generation_prompt: bool | None = None
    """Open the assistant's turn (default yes); the paragraphs format always opens it."""


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def _param_path(loc: tuple) -> str | None:
    """pydantic's error location without the names of union members (``prompt.list[int].0`` ->
    ``prompt.0``)."""
    union_members = {"str", "int", "float", "bool"}
    parts = [str(part) for part in loc if not (isinstance(part, str) and ("[" in part or part in union_members))]
    return ".".join(parts) or None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, choices: list[dict], usage_counts: dict | None,
                    chunk: bool = False, chat: bool = False) -> dict[str, Any]:
    """The envelope of every completion response and stream chunk."""
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and chunk else "")
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def models_body(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "raytron"}]}
