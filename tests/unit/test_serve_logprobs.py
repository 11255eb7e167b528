"""Log-probabilities from the engine equal the model's own log-softmax, computed directly by a full
forward pass without a cache: for generated tokens whatever the sampling parameters, for echoed
prompt tokens (scored in prefill), over the true vocabulary only."""

from __future__ import annotations

import asyncio

import torch

from raytron.config import ModelConfig
from raytron.model.gpt import build_model
from raytron.model.sampling import SamplingParams
from raytron.serve.engine import Engine, EngineLimits, _token_start
from raytron.serve.logprob_shapes import chat_logprobs, legacy_logprobs
from tests.unit.test_serve_engine import EOS, PROMPTS, letters

VOCAB = 200
TRUE_VOCAB = 150
"""The tokenizer's size: the model's rows beyond it (and the padding to 256) are no tokens."""


def model_for_test():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4, max_position_embeddings=96)
    return build_model(cfg, seed=5).eval()


MODEL = model_for_test()


@torch.no_grad()
def direct_logprobs(tokens: list[int]) -> torch.Tensor:
    """log-softmax over the true vocabulary after every position of ``tokens``, (T, TRUE_VOCAB)."""
    logits = MODEL(torch.tensor([tokens]))[0]  # (T, V')
    return torch.log_softmax(logits[:, :TRUE_VOCAB].float(), -1)


def run(*requests):
    async def go():
        engine = Engine(MODEL, EOS, letters, EngineLimits(8, 10_000, 96), vocab_size=TRUE_VOCAB)
        done = await asyncio.gather(*(engine.complete(*r) for r in requests))
        engine.close()
        return done

    return asyncio.run(go())


def test_generated_tokens_logprobs_are_the_models_whatever_the_sampling():
    sampled = SamplingParams(max_new_tokens=12, temperature=1.7, top_k=5, seed=3, presence_penalty=1.5,
                             logit_bias=((7, 3.0),))
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    done = run((PROMPTS[1], sampled, 3), (PROMPTS[3], greedy, 0), (PROMPTS[0], greedy, None))
    for prompt, delta, k in zip((PROMPTS[1], PROMPTS[3]), done, (3, 0)):
        entries = delta.logprobs
        assert len(entries) == delta.completion_tokens > 0
        generated = [e.token for e in entries]
        expected = direct_logprobs(prompt + generated)[len(prompt) - 1:-1]  # (N, V) each predicts the next
        for entry, row in zip(entries, expected):
            assert abs(entry.logprob - row[entry.token].item()) < 1e-4
            values, ids = torch.topk(row, k)
            assert [t for t, _ in entry.top] == ids.tolist()
            assert torch.allclose(torch.tensor([lp for _, lp in entry.top]), values, atol=1e-4)
            assert all(t < TRUE_VOCAB for t, _ in entry.top)
    assert done[2].logprobs == () and done[2].prompt_logprobs is None


def test_echo_scores_the_prompt_in_prefill_and_scoring_only_generates_nothing():
    prompt = PROMPTS[1]
    with_generation, scored_only = run((prompt, SamplingParams(max_new_tokens=3, temperature=0), 2, True),
                                       (PROMPTS[3], None, 1, True))
    expected = direct_logprobs(prompt)
    entries = with_generation.prompt_logprobs
    assert [e.token for e in entries] == prompt and entries[0].logprob is None
    for t, entry in enumerate(entries[1:], start=1):
        assert abs(entry.logprob - expected[t - 1, prompt[t]].item()) < 1e-4
        assert [token for token, _ in entry.top] == torch.topk(expected[t - 1], 2).indices.tolist()
    assert with_generation.completion_tokens == 3 and len(with_generation.logprobs) == 3
    assert scored_only.completion_tokens == 0 and scored_only.text == "" and scored_only.finish_reason == "length"
    total = sum(e.logprob for e in scored_only.prompt_logprobs[1:])
    reference = direct_logprobs(PROMPTS[3])
    assert abs(total - sum(reference[t - 1, PROMPTS[3][t]].item() for t in range(1, len(PROMPTS[3])))) < 1e-4


def test_echoing_and_plain_requests_in_one_step_give_the_texts_they_give_alone():
    params = [SamplingParams(max_new_tokens=8, temperature=0.9, seed=i) for i in range(4)]
    together = run(*[(PROMPTS[i], params[i], 1, i % 2 == 0) for i in range(4)])
    alone = [run((PROMPTS[i], params[i]))[0] for i in range(4)]
    assert [d.text for d in together] == [d.text for d in alone]


def streamed(prompt, params, logprobs):
    """Every delta of one request streamed at interval 0 (each step's text once it is final)."""
    async def go():
        engine = Engine(MODEL, EOS, letters, EngineLimits(8, 10_000, 96), vocab_size=TRUE_VOCAB)
        deltas = [delta async for delta in engine.stream(prompt, params, 0.0, logprobs)]
        engine.close()
        return deltas

    return asyncio.run(go())


def test_logprobs_after_a_stop_string_cut_describe_only_the_returned_text():
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    (whole,) = run((PROMPTS[1], greedy, 1))
    stop = whole.text[5:7]  # two letters in the middle: the engine generates them, then cuts
    cut_params = SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,))
    (cut,) = run((PROMPTS[1], cut_params, 1))
    returned_text = cut.text
    assert returned_text == whole.text[:whole.text.find(stop)] and cut.completion_tokens > len(returned_text)
    assert cut.logprobs == whole.logprobs[:len(returned_text)]  # one letter per token

    head = "echoed prompt "  # with echo the choice's text starts with the prompt's
    legacy = legacy_logprobs(cut.logprobs, lambda t: letters([t]), len(head))
    assert "".join(legacy["tokens"]) == returned_text
    assert legacy["text_offset"] == list(range(len(head), len(head) + len(returned_text)))
    chat = chat_logprobs(cut.logprobs, lambda t: letters([t]))
    assert "".join(c["token"] for c in chat["content"]) == returned_text

    # streamed, each delta carries the logprobs of exactly the tokens whose text it carries
    deltas = streamed(PROMPTS[1], cut_params, 1)
    assert "".join(d.text for d in deltas) == returned_text
    assert [letters([e.token for e in d.logprobs]) for d in deltas] == [d.text for d in deltas]
    assert tuple(e for d in deltas for e in d.logprobs) == cut.logprobs


def test_streamed_logprobs_without_a_cut_are_every_generated_token():
    params = SamplingParams(max_new_tokens=10, temperature=0, stop=("zzzz",))  # held back, never met
    (whole,) = run((PROMPTS[3], params, 2))
    deltas = streamed(PROMPTS[3], params, 2)
    assert tuple(e for d in deltas for e in d.logprobs) == whole.logprobs and len(whole.logprobs) == 10


def test_a_token_after_unfinished_bytes_starts_where_their_character_does():
    # "x" then the first byte of "é" (shown as U+FFFD): the next token finishes the character
    assert _token_start("xé", 2, 1) == 1
    # the U+FFFD stayed (bytes that make no character): the token starts after it
    assert _token_start("x\ufffdR", 2, 1) == 2
    assert _token_start("abc", 3, 0) == 3
