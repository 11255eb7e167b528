"""Packed token blocks from the built-in docstring corpus (no downloads), for the demo and tests.

Documents are split deterministically (last ``validation_fraction`` of them held out),
tokenized with a BPE tokenizer trained on the training documents, and packed.
Results are cached under ``workdir`` keyed by the arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytron.data.corpus import build_docstring_corpus
from raytron.data.tokenizer import load_tokenizer, pack_documents, save_tokenizer, special_token_ids, train_tokenizer


@dataclass
class DemoData:
    tokenizer_path: Path
    vocab_size: int
    train_blocks: np.ndarray
    """(N, seq_len + 1) token ids."""
    validation_blocks: np.ndarray


def _read_texts(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def demo_data(workdir: str | Path, corpus_bytes: int, vocab_size: int, seq_len: int,
              validation_fraction: float = 0.05) -> DemoData:
    workdir = Path(workdir)
    corpus = build_docstring_corpus(workdir / f"corpus-{corpus_bytes}", max_bytes=corpus_bytes,
                                    include_site_packages=corpus_bytes > 1_500_000)
    cache = workdir / f"blocks-{corpus_bytes}-{vocab_size}-{seq_len}-{validation_fraction}"
    tokenizer_path = cache / "tokenizer.json"
    if not (cache / "validation.npy").exists():
        texts = _read_texts(corpus.paths)
        held_out = max(1, int(len(texts) * validation_fraction))
        train_texts, validation_texts = texts[:-held_out], texts[-held_out:]
        tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
        cache.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, cache)
        eos = special_token_ids(tokenizer).eos
        for name, split in (("train", train_texts), ("validation", validation_texts)):
            ids = [encoding.ids for encoding in tokenizer.encode_batch(split)]
            np.save(cache / f"{name}.npy", pack_documents(ids, seq_len, eos))  # written last: marks completion
    tokenizer = load_tokenizer(tokenizer_path)
    return DemoData(tokenizer_path, tokenizer.get_vocab_size(), np.load(cache / "train.npy"),
                    np.load(cache / "validation.npy"))
