"""Make what jobs/configs/sft_smoke.yaml reads, with nothing downloaded: a random tiny Llama (GQA, tied
embeddings) saved by `transformers` as a sharded Hugging Face folder with a ChatML tokenizer beside it
(tokenizer.json + tokenizer_config.json: chat_template, eos <|im_end|>), and a folder of arithmetic chats.

    python jobs/make_sft_smoke_inputs.py .raytron/sft-smoke   # -> .raytron/sft-smoke/{base,chats}
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raytron.data.demo_chat import chat_records, write_chatml_tokenizer, write_jsonl

VOCAB = 384
"""The ChatML tokenizer's size and the model's vocabulary (a multiple of 128: no padded rows)."""
CHATS = 600


def write_base_model(folder: Path, seed: int = 0) -> Path:
    """The tiny Llama with its tokenizer files, as a Hugging Face model folder (small shards: the index is used)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True))
    model.save_pretrained(folder, max_shard_size="64KB")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_chatml_tokenizer(Path(scratch), vocab_size=VOCAB)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, folder / name)
    return folder


def make_inputs(root: Path) -> tuple[Path, Path]:
    """(model folder, chats folder) under ``root``."""
    chats = root / "chats"
    write_jsonl(chats / "train.jsonl", chat_records(CHATS))
    return write_base_model(root / "base"), chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path(".raytron/sft-smoke"))
    base, chats = make_inputs(parser.parse_args().root)
    print(f"model folder: {base}\nchats:        {chats}")


if __name__ == "__main__":
    main()
