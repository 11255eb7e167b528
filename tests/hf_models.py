"""Tiny random Hugging Face models built with `transformers`, saved sharded (small max_shard_size), and a
Llama tokenizer trained here (no hub)."""

from __future__ import annotations

from pathlib import Path

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 300
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
GQA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}

KINDS = {
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**GQA, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama-untied": lambda: LlamaForCausalLM(LlamaConfig(**GQA, tie_word_embeddings=False,
                                                         rope_parameters=LLAMA3_ROPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**GQA)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**GQA, sliding_window=4096)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                               bos_token_id=0, eos_token_id=0)),
}


def save_tiny(kind: str, folder: Path, seed: int = 0):
    """Build ``kind`` with random weights (biases too, so every tensor matters) and save it sharded."""
    torch.manual_seed(seed)
    model = KINDS[kind]().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)  # transformers starts these at 0 / 1
    model.save_pretrained(folder, max_shard_size="64KB")
    return model


def save_llama_tokenizer(folder: Path, texts: list[str], vocab_size: int = VOCAB) -> Path:
    """A Llama tokenizer as transformers saves one (tokenizer.json whose post-processor puts <s> first,
    tokenizer_config.json with bos <s>, eos </s>): a BPE over SentencePiece-style pieces trained on ``texts``,
    with Llama's <unk> <s> </s> as ids 0, 1, 2 and no <|endoftext|>."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    LlamaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True).save_pretrained(folder)
    return folder
