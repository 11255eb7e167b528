"""KV-cache decoding against full recomputation; batches of mixed-length prompts against one at a time."""

from __future__ import annotations

import pytest
import torch

from raytron.config import ModelConfig
from raytron.model.generation import generate
from raytron.model.gpt import build_model, to_decode_layout
from raytron.model.sampling import SamplingParams, filter_logits

PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42], [100, 101, 102, 103, 104]]


def tiny_model(flavour: str):
    cfg = ModelConfig(flavour=flavour, vocab_size=200, hidden_size=48, num_layers=2, num_heads=4,
                      max_position_embeddings=64)
    return build_model(cfg, seed=1)


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_kv_cache_logits_equal_full_recompute_at_every_step(flavour):
    model = tiny_model(flavour).eval()
    prompt = PROMPTS[1]
    completion = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    sequence = prompt + completion.tokens
    cache = model.new_cache(1, len(sequence))
    with torch.no_grad():
        cached = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
        for position in range(len(prompt), len(sequence) - 1):
            step = model(torch.tensor([[sequence[position]]]), torch.tensor([[position]]), cache)
            cached.append(step[0, -1])
        for offset, logits in enumerate(cached):
            full = model(torch.tensor([sequence[: len(prompt) + offset]]))[0, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    # greedy decode picks exactly the full-recompute argmax at every step
    assert [int(logits[:200].argmax()) for logits in cached] == completion.tokens


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=10, temperature=0),
    SamplingParams(max_new_tokens=14, temperature=0.8, top_k=40, top_p=0.9, seed=123),
])
def test_mixed_length_batch_equals_one_prompt_at_a_time(flavour, params):
    model = tiny_model(flavour)
    batched = generate(model, PROMPTS, params)
    alone = [generate(model, [prompt], params)[0] for prompt in PROMPTS]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert all(len(c.tokens) == params.max_new_tokens and c.finish_reason == "length" for c in batched)


def test_per_request_params_and_seeds_in_one_batch():
    model = tiny_model("gpt")
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 1)]
    out = generate(model, [PROMPTS[0]] * 3, params)
    assert out[0].tokens == out[2].tokens  # same seed, same prompt
    assert out[0].tokens != out[1].tokens  # another seed diverges
    assert generate(model, [PROMPTS[0]], params[1])[0].tokens == out[1].tokens


def test_stops_on_eos_and_on_stop_string():
    model = tiny_model("gpt")
    greedy = generate(model, [PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=0))[0]
    eos = greedy.tokens[2]
    stopped = generate(model, [PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=0), eos_id=eos)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == greedy.tokens[: greedy.tokens.index(eos)]

    def decode(tokens):
        return " ".join(f"t{t}" for t in tokens)

    marker = f"t{greedy.tokens[3]}"
    cut = generate(model, [PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=0, stop=(marker,)),
                   decode=decode)[0]
    assert cut.finish_reason == "stop"
    assert marker not in cut.text and decode(greedy.tokens).startswith(cut.text)


def test_padded_vocab_rows_are_never_sampled():
    model = tiny_model("gpt")
    with torch.no_grad():
        model.embed.tokens.weight[200:] = 10.0  # make padding rows the most likely by far
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert all(t < 200 for c in out for t in c.tokens)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [False, False, True, True, True]
    probs = logits.softmax(-1)  # ~[0.64, 0.24, 0.09, ...]: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.8)).tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -1)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_prompt_beyond_context_window_is_rejected():
    model = tiny_model("gpt")
    with pytest.raises(ValueError, match="context window"):
        generate(model, [[1] * 60], SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_decode_layout_gives_the_same_logits_and_tokens(flavour):
    plain = tiny_model(flavour).eval()
    swapped = to_decode_layout(tiny_model(flavour))
    assert not any(isinstance(m, torch.nn.Linear) for m in swapped.modules())
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(swapped(tokens), plain(tokens), atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=3)
    assert [c.tokens for c in generate(swapped, PROMPTS, params)] == [c.tokens for c in generate(plain, PROMPTS, params)]
