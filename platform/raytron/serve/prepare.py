"""From a validated request to what the engine runs: token ids and SamplingParams per choice.

A request with ``P`` prompts and ``n`` choices becomes ``P * n`` engine requests, choice ``j`` of
prompt ``i`` at index ``i * n + j`` (OpenAI's order); with a ``seed``, choice ``j`` samples with
``seed + j``, so ``n`` choices equal ``n`` single requests seeded ``seed``, ``seed + 1``, ...
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from raytron.model.sampling import SamplingParams
from raytron.serve.engine import Engine, RequestTooLarge
from raytron.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from raytron.serve.settings import ServeConfig

LOGIT_BIAS_LIMIT = 100.0
"""OpenAI's bound on a logit_bias value."""


@dataclass(frozen=True)
class Choice:
    index: int
    ids: list[int]
    """Prompt token ids."""
    params: SamplingParams | None
    """None: score the prompt only (echo with max_tokens 0)."""


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int, param: str, eos_id: int | None) -> list[int]:
    """Token ids of one prompt: a text is encoded (an empty one opens a new text), token ids are checked."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt).ids or [eos_id or 0]
    if not prompt:
        raise ApiError(400, f"{param}: a token-id prompt needs at least one token", param, "invalid_value")
    bad = [token for token in prompt if not 0 <= token < vocab_size]
    if bad:
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab_size}), got {bad[0]}", param, "invalid_value")
    return list(prompt)


def token_id_list(values: list[int], vocab_size: int, param: str) -> tuple[int, ...]:
    bad = [token for token in values if not 0 <= token < vocab_size]
    if bad:
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab_size}), got {bad[0]}", param, "invalid_value")
    return tuple(values)


def logit_bias(body: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias: keys must be token ids in [0, {vocab_size}), got {key!r}",
                           "logit_bias", "invalid_value")
        if abs(bias) > LOGIT_BIAS_LIMIT:
            raise ApiError(400, f"logit_bias: values must be in [-100, 100], got {bias} for {key}", "logit_bias",
                           "invalid_value")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def max_new_tokens(body: CompletionRequest | ChatCompletionRequest, prompt_len: int, engine: Engine,
                   cfg: ServeConfig, param: str) -> int:
    """An explicit max_tokens must fit; the default shrinks to what the window leaves."""
    context, limit = engine.limits.context, cfg.limits.max_tokens
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    asked = body.requested_max_tokens()
    if prompt_len >= context:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the context window is {context} tokens, "
                            "including at least one to generate", param, "context_length_exceeded")
    if asked is not None and asked > limit:
        raise ApiError(400, f"{name}: {asked} exceeds this server's limit of {limit}", name, "invalid_value")
    tokens = asked if asked is not None else min(cfg.sampling.max_tokens, context - prompt_len)
    try:
        engine.check(prompt_len, tokens)
    except RequestTooLarge as error:
        raise ApiError(400, str(error), name, "context_length_exceeded") from None
    return tokens


def prepare_choices(body: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], engine: Engine,
                    cfg: ServeConfig, vocab_size: int, param: str, extra_stops: tuple[str, ...] = ()) -> list[Choice]:
    """One Choice per prompt and choice index, in OpenAI's order (module docstring)."""
    defaults, n = cfg.sampling, body.choices_per_prompt
    scoring_only = body.requested_max_tokens() == 0
    if scoring_only and not getattr(body, "echo", False):
        raise ApiError(400, "max_tokens: must be > 0 (0 only scores the prompt, with echo: true)", "max_tokens",
                       "invalid_value")
    shared = dict(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        stop=body.stops() + extra_stops,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=logit_bias(body, vocab_size), min_tokens=body.min_tokens or 0,
        stop_token_ids=token_id_list(body.stop_token_ids or [], vocab_size, "stop_token_ids"),
        ignore_eos=bool(body.ignore_eos))
    choices = []
    for prompt_index, ids in enumerate(prompts):
        where = param if len(prompts) == 1 else f"{param}.{prompt_index}"
        if scoring_only:
            if len(ids) > engine.limits.context:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; the context window is "
                                    f"{engine.limits.context} tokens", where, "context_length_exceeded")
            choices += [Choice(prompt_index * n + j, ids, None) for j in range(n)]
            continue
        tokens = max_new_tokens(body, len(ids), engine, cfg, where)
        if shared["min_tokens"] > tokens:
            raise ApiError(400, f"min_tokens: {shared['min_tokens']} exceeds max_tokens {tokens}", "min_tokens",
                           "invalid_value")
        for j in range(n):
            seed = None if body.seed is None else body.seed + j
            choices.append(Choice(prompt_index * n + j, ids, SamplingParams(max_new_tokens=tokens, seed=seed, **shared)))
    return choices
