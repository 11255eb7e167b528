"""The chat template renderer against transformers.apply_chat_template itself, for several templates."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from raytron.data.chat_template import ChatTemplate, ChatTemplateError
from raytron.data.tokenizer import train_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's shape: BOS first, headers, <|eot_id|> ends every turn
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Zephyr's shape with a role check, loop controls and tojson
ZEPHYR = ("{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
          "{% if message['role'] == 'system' and message['content'] == '' %}{% continue %}{% endif %}\n"
          "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}{{ {'n': messages | length, 'q': '<&>'} | tojson }}")
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}

CHATS = {
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello!"}],
    "multi-turn": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                   {"role": "user", "content": "three <tag>"}, {"role": "assistant", "content": "four, five"}],
    "prompt-only": [{"role": "user", "content": "what next?"}],
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello there, be brief", "one two three four five", "what next? <tag> assistant user system"] * 30
    fast = train_tokenizer(texts, vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "<|im_start|>",
                                                                  "<|im_end|>", "<|eot_id|>"])
    return PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_renders_exactly_as_apply_chat_template(tokenizer, template, chat, generation_prompt):
    tokenizer.chat_template = TEMPLATES[template]
    expected = tokenizer.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=generation_prompt)
    ours = ChatTemplate.from_tokenizer_config({"chat_template": TEMPLATES[template], "bos_token": "<s>",
                                               "eos_token": {"content": "<|endoftext|>", "special": True}})
    assert ours.render(CHATS[chat], add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("chat", ["system", "multi-turn"])
def test_assistant_spans_give_transformers_assistant_mask(tokenizer, chat):
    """transformers marks {% generation %} blocks; the same template without the tags, located by
    prefixes here, must score the same tokens (assistant text and its <|im_end|>\n)."""
    tagged = CHATML.replace("{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
                            "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                            "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
                            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                            "{% endif %}")
    tokenizer.chat_template = tagged
    theirs = tokenizer.apply_chat_template(CHATS[chat], tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    text, spans = ChatTemplate(CHATML).assistant_spans(CHATS[chat])
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoding["input_ids"] == theirs["input_ids"]
    ours = [int(any(start <= lo < stop for start, stop in spans)) for lo, _ in encoding["offset_mapping"]]
    assert ours == theirs["assistant_masks"] and sum(ours) > 0


def test_template_errors_name_the_template():
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ChatTemplate(ZEPHYR).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat_template line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplate.from_tokenizer_config({})


def test_the_sandbox_refuses_reaching_into_python():
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
