"""The request surface: every OpenAI parameter accepted (null = its default), the ones raytron does
not act on refused by name unless they ask for nothing, unknown names refused, every prompt form."""

from __future__ import annotations

import pytest

from raytron.serve.protocol import CHAT_UNSUPPORTED, ApiError, ChatCompletionRequest, CompletionRequest, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
ACTING = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 1, "stop": [str(i) for i in range(16)],
          "n": 3, "stream": True, "stream_options": {"include_usage": True}, "presence_penalty": 0.5,
          "frequency_penalty": -0.5, "logit_bias": {"7": -100}, "repetition_penalty": 1.2, "min_tokens": 2,
          "stop_token_ids": [4], "ignore_eos": True, "user": "u", "metadata": {"k": "v"}, "service_tier": "auto",
          "prompt_cache_key": "c", "safety_identifier": "s", "parallel_tool_calls": False}


def refusal(schema, body) -> ApiError:
    with pytest.raises(ApiError) as error:
        parse_request(schema, body)
    assert error.value.status == 400
    return error.value


@pytest.mark.parametrize("schema,base,extra", [
    (CompletionRequest, COMPLETION, {"echo": True, "logprobs": 5, "suffix": None, "best_of": 3}),
    (ChatCompletionRequest, CHAT, {"max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2,
                                   "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                                   "store": False, "modalities": ["text"]}),
])
def test_every_parameter_is_accepted_with_a_value_and_as_null(schema, base, extra):
    given = {**base, **ACTING, **extra}
    request = parse_request(schema, given)
    assert request.choices_per_prompt == 3 and len(request.stops()) == 16 and request.include_usage
    nulls = parse_request(schema, {**base, **{name: None for name in given if name not in base}})
    assert nulls.choices_per_prompt == 1 and nulls.stops() == () and not nulls.include_usage
    assert nulls.requested_max_tokens() is None


@pytest.mark.parametrize("name,value", [("suffix", "tail"), ("best_of", 4)])
def test_completion_parameters_not_done_are_refused_by_name(name, value):
    error = refusal(CompletionRequest, {**COMPLETION, "n": 3, name: value})
    assert error.param == name and error.code == "unsupported_parameter"


@pytest.mark.parametrize("name,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("response_format", {"type": "json_object"}),
    ("audio", {"voice": "alloy"}), ("modalities", ["text", "audio"]), ("prediction", {"type": "content"}),
    ("reasoning_effort", "low"), ("web_search_options", {}), ("verbosity", "low"), ("store", True)])
def test_chat_parameters_not_done_are_refused_by_name(name, value):
    error = refusal(ChatCompletionRequest, {**CHAT, name: value})
    assert error.param == name and error.code == "unsupported_parameter"
    assert name in CHAT_UNSUPPORTED


@pytest.mark.parametrize("schema,base,name", [(CompletionRequest, COMPLETION, "frobnicate"),
                                              (CompletionRequest, COMPLETION, "max_completion_tokens"),
                                              (ChatCompletionRequest, CHAT, "echo"),
                                              (ChatCompletionRequest, CHAT, "prompt")])
def test_names_openai_does_not_define_here_are_unknown(schema, base, name):
    error = refusal(schema, {**base, name: 1})
    assert error.param == name and error.code == "unknown_parameter"


def test_prompts_come_as_text_texts_token_ids_or_lists_of_token_ids():
    forms = {"hi": ["hi"], ("a", "b"): ["a", "b"], (5, 6): [[5, 6]], ((5, 6), (7,)): [[5, 6], [7]]}
    for prompt, prompts in forms.items():
        as_json = [list(p) if isinstance(p, tuple) else p for p in prompt] if isinstance(prompt, tuple) else prompt
        assert parse_request(CompletionRequest, {**COMPLETION, "prompt": as_json}).prompts() == prompts
    assert refusal(CompletionRequest, {**COMPLETION, "prompt": [1, "a"]}).param.startswith("prompt")
    assert refusal(CompletionRequest, {**COMPLETION, "prompt": 3}).param == "prompt"


def test_chat_content_is_text_or_text_parts():
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "one "},
                                                                {"type": "text", "text": "two"}]}]}
    assert parse_request(ChatCompletionRequest, parts).messages[0].text == "one two"
    image = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert refusal(ChatCompletionRequest, image).param.startswith("messages.0.content")


def test_max_completion_tokens_wins_over_max_tokens():
    request = parse_request(ChatCompletionRequest, {**CHAT, "max_tokens": 9, "max_completion_tokens": 4})
    assert request.requested_max_tokens() == 4
