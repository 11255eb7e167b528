"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) and packing of token streams.

Byte-level BPE starts from the 256 byte symbols, so every string encodes (no unknown
token) and ``decode(encode(text)) == text`` exactly. Special tokens take the first ids,
in the order given: with the defaults ``<|endoftext|>`` = 0 (EOS, the GPT-2 name),
``<|bos|>`` = 1, ``<|pad|>`` = 2. They are matched whole in the input and never split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raytron.data.packing import BlockPacker

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class SpecialTokenIds:
    eos: int | None
    bos: int | None
    pad: int | None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` entries (special tokens and the 256 bytes included).

    The vocabulary can come out smaller when the texts offer too few pairs seen
    ``min_frequency`` times to merge.
    """
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: it would make decode(encode(x)) start with a space x did not have.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # All 256 bytes, even those absent from the texts, so any input still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write ``folder/tokenizer.json`` (the format ``transformers`` loads) and return its path."""
    path = Path(folder) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, given as the file or the folder holding it."""
    path = Path(path)
    return Tokenizer.from_file(str(path / TOKENIZER_FILE if path.is_dir() else path))


def special_token_ids(tokenizer: Tokenizer, eos: str = EOS_TOKEN, bos: str = BOS_TOKEN,
                      pad: str = PAD_TOKEN) -> SpecialTokenIds:
    """Ids of the named special tokens; None for any the vocabulary lacks."""
    return SpecialTokenIds(tokenizer.token_to_id(eos), tokenizer.token_to_id(bos), tokenizer.token_to_id(pad))


def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int,
                   dtype: np.dtype = np.int32) -> np.ndarray:
    """Pack documents into contiguous blocks of ``seq_len + 1`` tokens, shape (n_blocks, seq_len + 1).

    Each document is followed by ``eos_id`` and the documents are concatenated into one
    stream, which is cut into consecutive blocks with no padding: a document may start
    in one block and end in the next, and attention is not masked at EOS (the model
    learns that EOS starts something unrelated, as GPT-2/3 do). The tail of the stream
    shorter than a block is dropped. A block gives inputs ``block[:-1]`` and targets
    ``block[1:]``; because blocks do not overlap, the step from the last token of one
    block to the first of the next is not trained (one target in ``seq_len + 1``).
    """
    eos = np.array([eos_id], dtype=dtype)
    pieces = []
    for tokens in token_lists:
        pieces += [np.asarray(tokens, dtype=dtype), eos]
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return BlockPacker(seq_len).add(stream)
