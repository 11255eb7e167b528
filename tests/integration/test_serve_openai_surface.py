"""The OpenAI request surface and log-probabilities through the official `openai` client (and raw
HTTP where the client cannot say it): max_completion_tokens, n with derived seeds, logprobs and echo,
chat logprobs, token-id prompts, text-part content, explicit nulls, and refusals by name."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from raytron.model.sampling import SamplingParams
from raytron.serve.chat_template import TURN_STOPS, render_chat
from raytron.serve.engine import Engine, EngineLimits
from raytron.serve.evaluate import choice_logliks
from raytron.serve.protocol import ChatMessage
from tests.integration.test_serve_api import (  # noqa: F401 (fixtures)
    CONTEXT, MODEL_NAME, TEXTS, client, coalescing, fill_every_slot, health, local, post, reference, request, served,
    settled, wait_for)


@torch.no_grad()
def direct_logprobs(local, ids: list[int]) -> torch.Tensor:
    """The model's log-softmax over the tokenizer's vocabulary after every position, (T, V)."""
    logits = local.model(torch.tensor([ids]))[0]  # (T, V')
    return torch.log_softmax(logits[:, :local.tokenizer.get_vocab_size()].float(), -1)


def test_max_completion_tokens_bounds_a_chat_completion(client, local):
    messages = [{"role": "user", "content": TEXTS[0]}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=5,
                                              temperature=0, extra_body={"ignore_eos": True})
    prompt = render_chat([ChatMessage(**m) for m in messages])
    expected = reference(local, prompt, SamplingParams(max_new_tokens=5, temperature=0, stop=TURN_STOPS))
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens <= 5


def test_n_choices_equal_single_requests_seeded_seed_plus_index(client):
    kwargs = dict(model=MODEL_NAME, prompt=TEXTS[1], max_tokens=12, temperature=1.0)
    response = client.completions.create(**kwargs, n=3, seed=40)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    singles = [client.completions.create(**kwargs, seed=40 + j).choices[0].text for j in range(3)]
    assert texts == singles and len(set(texts)) > 1
    streamed = {}
    for chunk in client.completions.create(**kwargs, n=3, seed=40, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[j] for j in range(3)] == texts
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": TEXTS[2]}],
                                          max_tokens=6, n=2, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": TEXTS[2]}], max_tokens=6, seed=7 + j
    ).choices[0].message.content for j in range(2)]


def test_logprobs_and_echo_give_the_models_log_softmax(client, local):
    ids = local.tokenizer.encode(TEXTS[0]).ids
    response = client.completions.create(model=MODEL_NAME, prompt=TEXTS[0], max_tokens=4, temperature=0.8, seed=2,
                                         logprobs=3, echo=True)
    (choice,) = response.choices
    lp = choice.logprobs
    generated = response.usage.completion_tokens
    assert choice.text.startswith(TEXTS[0]) and len(lp.tokens) == len(ids) + generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(TEXTS[0])
    generated_ids = local.tokenizer.encode(choice.text[len(TEXTS[0]):]).ids
    expected = direct_logprobs(local, ids + generated_ids[:generated])
    # prompt token t is scored by the logits after t - 1; a generated one likewise
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - expected[t - 1, ids[t]].item()) < 1e-4
        assert len(lp.top_logprobs[t]) <= 3 and max(lp.top_logprobs[t].values()) == pytest.approx(
            expected[t - 1].max().item(), abs=1e-4)
    scored = client.completions.create(model=MODEL_NAME, prompt=TEXTS[0], max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == TEXTS[0] and scored.usage.completion_tokens == 0
    total = sum(scored.choices[0].logprobs.token_logprobs[1:])
    assert total == pytest.approx(sum(expected[t - 1, ids[t]].item() for t in range(1, len(ids))), abs=1e-4)


def test_streamed_logprobs_add_up_to_the_plain_ones(client):
    kwargs = dict(model=MODEL_NAME, prompt=TEXTS[3], max_tokens=10, temperature=0, logprobs=1)
    plain = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values = [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == plain.tokens and values == pytest.approx(plain.token_logprobs, abs=1e-6)


def test_chat_logprobs_with_top_logprobs(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": TEXTS[1]}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens > 0
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(entry.token for entry in content).startswith(response.choices[0].message.content[:1])


def test_token_id_prompts_give_the_texts_of_their_string_forms(client, local):
    ids = [local.tokenizer.encode(text).ids for text in TEXTS[:2]]
    kwargs = dict(model=MODEL_NAME, max_tokens=8, temperature=0)
    assert client.completions.create(**kwargs, prompt=ids[0]).choices[0].text == \
        client.completions.create(**kwargs, prompt=TEXTS[0]).choices[0].text
    as_ids = client.completions.create(**kwargs, prompt=ids)
    as_text = client.completions.create(**kwargs, prompt=TEXTS[:2])
    assert [c.text for c in as_ids.choices] == [c.text for c in as_text.choices]
    assert as_ids.usage.prompt_tokens == sum(len(i) for i in ids)


def test_text_part_content_equals_string_content(client):
    kwargs = dict(model=MODEL_NAME, max_tokens=8, temperature=0)
    parts = [{"type": "text", "text": TEXTS[2][:10]}, {"type": "text", "text": TEXTS[2][10:]}]
    as_parts = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": parts}])
    as_text = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": TEXTS[2]}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_explicit_nulls_mean_the_defaults(served):
    url = served[0]
    base = {"model": MODEL_NAME, "prompt": TEXTS[0], "seed": 3, "max_tokens": 6}
    nulls = {name: None for name in ("temperature", "top_p", "top_k", "n", "stream", "stop", "stream_options",
                                     "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo",
                                     "user", "suffix", "best_of", "min_tokens", "repetition_penalty",
                                     "stop_token_ids", "ignore_eos")}
    with_nulls = post(f"{url}/v1/completions", {**base, **nulls})
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"][0]["text"] == post(f"{url}/v1/completions", base).json()["choices"][0]["text"]
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "tools": None,
            "tool_choice": None, "response_format": None, "max_completion_tokens": None, "top_logprobs": None}
    assert post(f"{url}/v1/chat/completions", chat).status_code == 200


@pytest.mark.parametrize("route,body,param,code", [
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ("completions", {"suffix": "!"}, "suffix", "unsupported_parameter"),
    ("completions", {"best_of": 2}, "best_of", "unsupported_parameter"),
    ("completions", {"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ("completions", {"logit_bias": {"999999": 1}}, "logit_bias", "invalid_value"),
    ("completions", {"stop_token_ids": [-1]}, "stop_token_ids", "invalid_value"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt.1", "invalid_value"),
    ("completions", {"max_tokens": 0}, "max_tokens", "invalid_value"),
])
def test_unsupported_and_unknown_parameters_are_refused_by_name(served, route, body, param, code):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": "hi"})
    reply = post(f"{served[0]}/v1/{route}", {"model": MODEL_NAME, **base, **body})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert reply.json()["error"]["code"] == code
    assert health(served[0])["status"] == "ok"


def test_penalties_and_stop_token_ids_act_through_the_server(client, local):
    kwargs = dict(model=MODEL_NAME, prompt=TEXTS[0], max_tokens=12, temperature=0, logprobs=0)
    plain = client.completions.create(**kwargs).choices[0]
    first = local.tokenizer.token_to_id(plain.logprobs.tokens[0]) if plain.logprobs.tokens else None
    banned = client.completions.create(**kwargs, logit_bias={str(first): -100}).choices[0]
    assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]
    stopped = client.completions.create(**kwargs, extra_body={"stop_token_ids": [first]}).choices[0]
    assert stopped.text == "" and stopped.finish_reason == "stop"
    at_least = client.completions.create(**kwargs, extra_body={"stop_token_ids": [first], "min_tokens": 3}).choices[0]
    assert len(at_least.logprobs.tokens) >= 3


def test_logprobs_after_a_stop_string_describe_only_the_returned_text(client):
    kwargs = dict(model=MODEL_NAME, prompt=TEXTS[1], max_tokens=12, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0]
    # a stop string that first occurs inside the text, after its start: the engine generates its tokens
    stop = next(token for token in plain.logprobs.tokens[2:] if token.strip() and plain.text.find(token) > 0)
    kept = plain.text[:plain.text.index(stop)]
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.text == kept and cut.finish_reason == "stop"
    assert cut.logprobs.tokens == plain.logprobs.tokens[:len(cut.logprobs.tokens)]
    assert all(offset < len(kept) for offset in cut.logprobs.text_offset), "a token past the returned text"
    assert "".join(cut.logprobs.tokens).startswith(kept) and len(cut.logprobs.tokens) < len(plain.logprobs.tokens)


UNSEEN = "\u2603\u2603"
"""Text the tiny model does not generate (the cut replies below show it): a stop string that ends in it
makes the engine hold back text that matches its start, then send it."""


def stop_on_token_boundaries(reply_for) -> tuple[int, list[str], int]:
    """The first seed whose reply (``reply_for(seed)``: its text and token texts, joining to it) holds
    tokens k, k+1 (k >= 2) whose text first occurs where token k starts, with a clean token before k:
    the seed, stop strings [that clean token's text + UNSEEN, tokens k and k+1's text], and k. With
    them the engine holds token 1 back (then sends it), holds token k back, generates k + 1 and cuts
    before k: the reply ends with token k - 1 on a token boundary."""
    clean = lambda text: text and "\ufffd" not in text  # a whole character (the random model makes many halves)
    for seed in range(8):
        text, tokens = reply_for(seed)
        starts = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        for k in range(2, len(tokens) - 1 if "".join(tokens) == text else 0):
            stop = tokens[k] + tokens[k + 1]
            if clean(stop) and clean(tokens[1]) and text.find(stop) == starts[k]:
                return seed, [tokens[1] + UNSEEN, stop], k
    raise AssertionError("no seed in 0-7 gave a reply with a stop string on token boundaries")


def streamed_chunks(chunks, text_of, tokens_of) -> tuple[str, list[str]]:
    """A stream's text and its logprobs' token texts, checking that no token goes out before its text
    starts to (a token held back with its text as a stop string's possible start)."""
    text, tokens = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += text_of(choice) or ""
            tokens += tokens_of(choice)
            assert not tokens or sum(map(len, tokens[:-1])) < len(text), f"token {tokens[-1]!r} ahead of its text"
    return text, tokens


def test_streamed_logprobs_at_a_stop_string_equal_the_plain_ones_and_join_to_the_text(client):
    completion = dict(model=MODEL_NAME, prompt=TEXTS[1], max_tokens=24, temperature=1.0, logprobs=1,
                      extra_body={"ignore_eos": True})

    def completion_reply(seed: int, **more):
        choice = client.completions.create(**completion, seed=seed, **more).choices[0]
        return choice.text, choice.logprobs.tokens

    seed, stops, k = stop_on_token_boundaries(completion_reply)
    plain = client.completions.create(**completion, seed=seed, stop=stops).choices[0]
    whole_tokens = completion_reply(seed)[1]
    assert plain.finish_reason == "stop" and plain.logprobs.tokens == whole_tokens[:k]
    assert plain.text == "".join(whole_tokens[:k])
    chunks = list(client.completions.create(**completion, seed=seed, stop=stops, stream=True))
    text, tokens = streamed_chunks(chunks, lambda c: c.text, lambda c: c.logprobs.tokens if c.logprobs else [])
    assert text == plain.text == "".join(tokens) and tokens == plain.logprobs.tokens
    offsets = [o for chunk in chunks for c in chunk.choices if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == plain.logprobs.text_offset

    chat = dict(model=MODEL_NAME, messages=[{"role": "user", "content": TEXTS[1]}], max_tokens=24, temperature=1.0,
                logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})

    def chat_reply(seed: int, **more):
        choice = client.chat.completions.create(**chat, seed=seed, **more).choices[0]
        return choice.message.content, [entry.token for entry in choice.logprobs.content]

    seed, stops, k = stop_on_token_boundaries(chat_reply)
    whole_tokens = chat_reply(seed)[1]
    plain_text, plain_tokens = chat_reply(seed, stop=stops)
    assert plain_tokens == whole_tokens[:k] and plain_text == "".join(plain_tokens)
    text, tokens = streamed_chunks(client.chat.completions.create(**chat, seed=seed, stop=stops, stream=True),
                                   lambda c: c.delta.content,
                                   lambda c: [entry.token for entry in c.logprobs.content] if c.logprobs else [])
    assert text == plain_text == "".join(tokens) and tokens == plain_tokens


def test_seeded_batch_invariance_with_n_and_logprobs_under_16_concurrent_requests(coalescing):
    url = coalescing
    bodies = [{"model": MODEL_NAME, "prompt": TEXTS[i % 4], "max_tokens": 6 + i % 5, "temperature": 1.0,
               "seed": 500 + i, "n": 2, "logprobs": 1} for i in range(16)]

    def outcome(reply) -> list:
        assert reply.status_code == 200, reply.text
        return [(c["text"], c["logprobs"]["tokens"]) for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]

    alone = [outcome(post(f"{url}/v1/completions", body)) for body in bodies]
    blockers = fill_every_slot(url)  # the 32 choices queue together behind a full batch, then run batched
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = [pool.submit(post, f"{url}/v1/completions", body) for body in bodies]
        wait_for(lambda: health(url)["waiting"] == 2 * len(bodies), "the 32 choices queue behind the full batch")
        for blocker in blockers:
            blocker.close()
        together = [outcome(reply.result()) for reply in replies]
    assert together == alone
    wait_for(lambda: settled(url), "every slot is free again")


def test_tokenizer_endpoints_in_vllms_shapes(served, local):
    url, tokenizer = served[0], local.tokenizer
    counted = post(f"{url}/tokenize", {"model": MODEL_NAME, "prompt": TEXTS[0]}).json()
    assert counted == {"count": len(tokenizer.encode(TEXTS[0]).ids), "max_model_len": CONTEXT,
                       "tokens": tokenizer.encode(TEXTS[0]).ids, "token_strs": None}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[1]}]
    chat = post(f"{url}/tokenize", {"messages": messages, "add_generation_prompt": True}).json()
    rendered = render_chat([ChatMessage(**m) for m in messages])
    assert chat["tokens"] == tokenizer.encode(rendered).ids
    assert post(f"{url}/detokenize", {"tokens": counted["tokens"]}).json() == {"prompt": tokenizer.decode(counted["tokens"])}
    info = request(f"{url}/tokenizer_info").json()
    assert info["vocab_size"] == tokenizer.get_vocab_size() and info["max_model_len"] == CONTEXT
    assert info["eos_token_id"] == local.eos_id and tokenizer.token_to_id(info["eos_token"]) == local.eos_id
    assert {"bos_token", "pad_token", "bos_token_id", "pad_token_id"} <= set(info)
    # a client renders chats itself from the template it was given
    assert ImmutableSandboxedEnvironment().from_string(info["chat_template"]).render(messages=messages) == rendered
    for route, body, param in [("tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                               ("detokenize", {"tokens": [-1]}, "tokens"), ("tokenize", {"text": "a"}, "text")]:
        reply = post(f"{url}/{route}", body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert request(f"{url}/tokenizer_info", headers={"Authorization": ""}).status_code == 401


def test_echoed_log_likelihood_equals_raytron_evals(client, local):
    """The server's echo scoring and `raytron eval`'s multiple-choice log-likelihood are one number."""
    context, choice = TEXTS[2][:12], TEXTS[2][12:]
    ctx, cont = local.tokenizer.encode(context).ids, local.tokenizer.encode(choice).ids
    scored = client.completions.create(model=MODEL_NAME, prompt=ctx + cont, max_tokens=0, echo=True, logprobs=0)
    echoed = sum(scored.choices[0].logprobs.token_logprobs[len(ctx):])
    engine = Engine(local.model, local.eos_id, local.tokenizer.decode, EngineLimits(4, 4096, CONTEXT),
                    vocab_size=local.tokenizer.get_vocab_size())
    (evaluated,) = asyncio.run(choice_logliks(engine, local.tokenizer, [{"context": context, "choices": [choice]}]))
    engine.close()
    assert evaluated[0] == pytest.approx(echoed, abs=1e-4)
