"""SFT records -> tokens + loss mask: exactly the assistant / completion tokens score, one BOS at most,
bad records named, and the length policy."""

from __future__ import annotations

import numpy as np
import pytest

from raytron.data.chat_template import ChatTemplate
from raytron.data.sft_encode import (SampleTooLongError, SftEncoder, encode_record, leading_bos, special_ids,
                                     too_long_error)
from raytron.data.tokenizer import train_tokenizer

BOS, EOS = "<s>", "<|endoftext|>"
# Llama 3's shape: BOS written by the template, <|eot_id|> ends every turn
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "three four"}, {"role": "user", "content": "five"},
        {"role": "assistant", "content": "two one"}]
CHAT = {"messages": MESSAGES}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["one two three four five", "be brief system user assistant"] * 30
    fast = train_tokenizer(texts, vocab_size=200, special_tokens=[EOS, BOS, "<|start_header_id|>",
                                                                  "<|end_header_id|>", "<|eot_id|>"])
    return fast


def chat_encoder(tokenizer, **kwargs):
    template = ChatTemplate(LLAMA3, {"bos_token": BOS, "eos_token": EOS})
    return SftEncoder(tokenizer, "chat", tokenizer.token_to_id(EOS), template, **kwargs)


def scored_text(tokenizer, sample) -> list[str]:
    """The scored tokens as runs of text, one run per contiguous scored stretch."""
    runs, current = [], []
    for token, scored in zip(sample.tokens.tolist(), sample.loss_mask.tolist()):
        if scored:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False)), current.clear()
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_chat_scores_only_assistant_turns_with_their_end_of_turn(tokenizer):
    sample = chat_encoder(tokenizer).encode(CHAT)
    eot = tokenizer.token_to_id("<|eot_id|>")
    runs = scored_text(tokenizer, sample)
    assert len(runs) == 2
    assert [run.replace(" ", "") for run in runs] == ["threefour<|eot_id|>", "twoone<|eot_id|>"]
    # every scored stretch ends with the end-of-turn token; the user's <|eot_id|> is not scored
    eot_positions = np.flatnonzero(sample.tokens == eot)
    assert sample.loss_mask[eot_positions].tolist() == [False, False, True, False, True]


def test_chat_has_one_bos_and_train_on_prompt_scores_everything(tokenizer):
    bos = tokenizer.token_to_id(BOS)
    sample = chat_encoder(tokenizer).encode(CHAT)
    assert sample.tokens[0] == bos and (sample.tokens == bos).sum() == 1
    everything = chat_encoder(tokenizer, train_on_prompt=True).encode(CHAT)
    # every token scores but the first: nothing in the sample predicts it (packing relies on it)
    assert not everything.loss_mask[0] and everything.loss_mask[1:].all()
    assert np.array_equal(everything.tokens, sample.tokens)


def test_prompt_completion_scores_completion_and_eos(tokenizer):
    encoder = SftEncoder(tokenizer, "prompt_completion", tokenizer.token_to_id(EOS))
    sample = encoder.encode({"prompt": "one two ", "completion": "three four"})
    prompt_len = len(tokenizer.encode("one two ", add_special_tokens=False).ids)
    assert not sample.loss_mask[:prompt_len].any() and sample.loss_mask[prompt_len:].all()
    assert sample.tokens[-1] == tokenizer.token_to_id(EOS)
    assert tokenizer.decode(sample.tokens[prompt_len:-1].tolist()).replace(" ", "") == "threefour"


@pytest.mark.parametrize("record, expected", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"text": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0].role 'wizard' is not one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]},
     "messages[1].content must be a string"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_bad_chat_records_are_named(tokenizer, record, expected):
    outcome = encode_record(chat_encoder(tokenizer), record, 64, "truncate", "s3://b/chat.jsonl:7")
    assert outcome.sample is None and outcome.problem.startswith("s3://b/chat.jsonl:7: ")
    assert expected in outcome.problem


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "hi"}, "'completion' must be a string"),
    ({"prompt": 3, "completion": "x"}, "'prompt' must be a string"),
    ({"prompt": "hi", "completion": ""}, "'completion' is empty"),
])
def test_bad_prompt_completion_records_are_named(tokenizer, record, expected):
    encoder = SftEncoder(tokenizer, "prompt_completion", tokenizer.token_to_id(EOS))
    outcome = encode_record(encoder, record, 64, "truncate", "pc.jsonl:3")
    assert outcome.problem.startswith("pc.jsonl:3: ") and expected in outcome.problem


def test_length_policy_truncate_skip_fail(tokenizer):
    encoder = chat_encoder(tokenizer)
    full = encoder.encode(CHAT)
    seq_len = len(full.tokens) - 3
    truncated = encode_record(encoder, CHAT, seq_len, "truncate", "c.jsonl:1").sample
    assert truncated.truncated and len(truncated.tokens) == seq_len + 1
    assert np.array_equal(truncated.loss_mask, full.loss_mask[:seq_len + 1])
    assert truncated.cut_tokens == len(full.tokens) - (seq_len + 1)
    skipped = encode_record(encoder, CHAT, seq_len, "skip", "c.jsonl:1")
    assert skipped.skipped_too_long and skipped.sample is None
    # under fail the record is reported the same way; the consumer raises, in file order
    failed = encode_record(encoder, CHAT, seq_len, "fail", "c.jsonl:1")
    assert failed.too_long == f"c.jsonl:1: sample of {len(full.tokens)} tokens is longer than train.seq_len + 1 = " \
                              f"{seq_len + 1}"
    with pytest.raises(SampleTooLongError, match=r"c.jsonl:1: sample of .*\(set data.too_long: truncate or skip\)"):
        raise too_long_error(failed.too_long)
    fits = encode_record(encoder, CHAT, len(full.tokens) - 1, "fail", "c.jsonl:1").sample
    assert not fits.truncated and np.array_equal(fits.tokens, full.tokens)
    # truncating before the first assistant token leaves nothing to score: skipped, not kept
    first_scored = int(np.flatnonzero(full.loss_mask)[0])
    assert encode_record(encoder, CHAT, first_scored - 1, "truncate", "c.jsonl:1").skipped_too_long


def test_prompt_completion_gets_the_post_processors_bos_once(tokenizer):
    from tokenizers import processors

    with_bos = tokenizer.from_str(tokenizer.to_str())
    bos = with_bos.token_to_id(BOS)
    with_bos.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    assert leading_bos(with_bos) == bos and leading_bos(tokenizer) is None
    encoder = SftEncoder(with_bos, "prompt_completion", with_bos.token_to_id(EOS), bos_id=leading_bos(with_bos))
    plain = encoder.encode({"prompt": "one two", "completion": "three"})
    already = encoder.encode({"prompt": f"{BOS}one two", "completion": "three"})
    assert plain.tokens[0] == bos and (plain.tokens == bos).sum() == 1
    assert np.array_equal(plain.tokens, already.tokens) and not plain.loss_mask[0]


def test_special_ids_come_from_the_config_tokens_else_raytrons(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    assert special_ids(tokenizer, {}) == (eos, eos)  # no <|pad|>: pads are EOS
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert special_ids(tokenizer, {"eos_token": "<|eot_id|>", "pad_token": BOS}) == (eot, tokenizer.token_to_id(BOS))
    with pytest.raises(ValueError, match="eos_token '</s>' is not a token of tokenizer.json"):
        special_ids(tokenizer, {"eos_token": "</s>"})


def test_a_chat_with_nothing_to_score_is_a_bad_record(tokenizer):
    template = ChatTemplate("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
                            "{% endfor %}")
    encoder = SftEncoder(tokenizer, "chat", tokenizer.token_to_id(EOS), template)
    outcome = encode_record(encoder, CHAT, 64, "truncate", "c.jsonl:4")
    assert outcome.problem == "c.jsonl:4: no token to score (the assistant turns render empty)"
