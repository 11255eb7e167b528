"""Small supervised fine-tuning data sets made here (no downloads), for sft_smoke.yaml, the SFT prepare
tests and the end-to-end SFT run: arithmetic chats a tiny model can learn, in ChatML with a tokenizer folder laid
out as Hugging Face's (tokenizer.json + tokenizer_config.json with the chat template).

The chats are deterministic for a seed: ``"What is 3 + 4?"`` -> ``"3 + 4 = 7."``, sometimes with a
system prompt, sometimes two turns, so masks cover several assistant turns per sample.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from raytron.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
"""Qwen2's chat format: every turn ends with <|im_end|>, the end-of-turn token (the EOS of a chat model)."""
SYSTEM_PROMPTS = ("You add numbers.", "Answer briefly.")


def _question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def chat_records(count: int, seed: int = 0) -> list[dict]:
    """``count`` chats of one or two user/assistant turns, a third with a system prompt."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2))):
            question, answer = _question(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def prompt_completion_records(count: int, seed: int = 0) -> list[dict]:
    """``count`` questions (the prompt, ending in a space) and answers (the completion)."""
    rng = random.Random(seed)
    return [{"prompt": f"{question} ", "completion": answer} for question, answer in
            (_question(rng) for _ in range(count))]


def write_jsonl(path: str | Path, records: list) -> Path:
    """One JSON value per line (records may be any JSON, to make bad ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_chatml_tokenizer(folder: str | Path, vocab_size: int = 384, template: str = CHATML_TEMPLATE) -> Path:
    """A byte-level BPE trained on the chats' text with the ChatML tokens, saved as a Hugging Face tokenizer
    folder: tokenizer.json, tokenizer_config.json (chat_template, eos <|im_end|>, pad <|pad|>)."""
    folder = Path(folder)
    texts = [message["content"] for record in chat_records(400) for message in record["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size,
                                special_tokens=[EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, IM_START, IM_END])
    save_tokenizer(tokenizer, folder)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": IM_END,
              "pad_token": PAD_TOKEN, "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
