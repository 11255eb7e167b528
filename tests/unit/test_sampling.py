"""The sampler's logit adjustments on constructed logits: each changes the distribution exactly as
OpenAI (logit_bias, presence/frequency penalties) or vLLM (repetition_penalty, min_tokens,
stop_token_ids, ignore_eos) defines it."""

from __future__ import annotations

import pytest
import torch

from raytron.model.sampling import SamplingParams, adjusted_logits, choose_tokens

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
EOS = 3


def adjusted(prompt=(), output=(), **params) -> torch.Tensor:
    return adjusted_logits(LOGITS, SamplingParams(**params), list(prompt), list(output), EOS)


def test_no_adjustment_leaves_the_logits():
    assert torch.equal(adjusted(prompt=[0, 1], output=[2]), LOGITS)
    assert not SamplingParams().adjusts_logits


def test_logit_bias_is_added_to_its_tokens():
    expected = LOGITS.clone()
    expected[1] += 5.0
    expected[3] -= 100.0
    assert torch.equal(adjusted(logit_bias=((1, 5.0), (3, -100.0))), expected)


def test_frequency_and_presence_penalties_follow_openais_formula():
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counted over the output only
    output = [0, 0, 0, 2, 5]
    got = adjusted(prompt=[1, 1, 4], output=output, frequency_penalty=0.5, presence_penalty=0.25)
    counts = torch.tensor([3.0, 0, 1, 0, 0, 1])
    assert torch.allclose(got, LOGITS - counts * 0.5 - (counts > 0).float() * 0.25)
    negative = adjusted(output=[4], frequency_penalty=-1.0)  # negative values encourage repeats
    assert negative[4] == LOGITS[4] + 1.0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    got = adjusted(prompt=[0, 1], output=[5], repetition_penalty=2.0)
    expected = LOGITS.clone()
    expected[0], expected[1], expected[5] = 2.0 / 2, -1.0 * 2, 1.0 / 2
    assert torch.equal(got, expected)


def test_min_tokens_forbids_the_end_tokens_until_reached():
    params = dict(min_tokens=2, stop_token_ids=(0,), max_new_tokens=4)
    early = adjusted(output=[5], **params)
    assert early[EOS] == early[0] == float("-inf") and torch.equal(early[[1, 2, 4, 5]], LOGITS[[1, 2, 4, 5]])
    assert torch.equal(adjusted(output=[5, 5], **params), LOGITS)
    # with ignore_eos EOS is no end token, so min_tokens leaves it
    assert adjusted(output=[], min_tokens=1, ignore_eos=True)[EOS] == LOGITS[EOS]


def test_end_ids_are_eos_unless_ignored_and_the_stop_token_ids():
    assert SamplingParams(stop_token_ids=(4, 5)).end_ids(EOS) == {3, 4, 5}
    assert SamplingParams(stop_token_ids=(4,), ignore_eos=True).end_ids(EOS) == {4}
    assert SamplingParams().end_ids(None) == set()


def test_the_sampled_distribution_is_the_softmax_of_the_adjusted_logits():
    params = SamplingParams(temperature=1.0, seed=0, logit_bias=((4, 4.0),), presence_penalty=1.0)
    output = [3]
    expected = adjusted_logits(LOGITS, params, [], output, EOS).softmax(-1)  # (V,)
    generator, draws = torch.Generator().manual_seed(0), 20_000
    counts = torch.zeros(len(LOGITS))
    for _ in range(draws):
        counts[choose_tokens(LOGITS[None], [params], [generator], [([], output)], EOS)[0]] += 1
    assert torch.allclose(counts / draws, expected, atol=0.015)


def test_greedy_takes_the_argmax_of_the_adjusted_logits():
    params = SamplingParams(temperature=0, logit_bias=((1, 10.0),))
    assert choose_tokens(LOGITS[None], [params], [None], [([], [])], EOS).tolist() == [1]
    assert choose_tokens(LOGITS[None], [SamplingParams(temperature=0)], [None]).tolist() == [3]
    with pytest.raises(ValueError, match="histories"):
        choose_tokens(LOGITS[None], [params], [None])


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3)
