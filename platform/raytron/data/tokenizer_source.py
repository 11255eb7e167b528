"""Where the tokenizer comes from: a given tokenizer.json (path/URL), or one trained on a corpus sample.

The sample is the first ``data.tokenizer_sample_bytes`` of document text in sorted
source order (bad records handled by ``data.on_bad_record``), read in this process:
the same sources always give the same tokenizer. Vocabulary size and special tokens
(EOS, BOS, PAD) come from the config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer

from raytron.config import ConfigError, RaytronConfig
from raytron.data.encode import eos_id
from raytron.data.records import checked, read_records
from raytron.data.sources import SourceFile, data_filesystem
from raytron.data.tokenizer import train_tokenizer
from raytron.storage import read_bytes


@dataclass(frozen=True)
class TokenizerSpec:
    json: str
    """The tokenizer.json content (what actors and checkpoints carry)."""
    sha256: str
    vocab_size: int


def spec_of(tokenizer_json: str) -> TokenizerSpec:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos_id(tokenizer)  # fails now, not in an actor, when there is no EOS
    return TokenizerSpec(tokenizer_json, hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                         tokenizer.get_vocab_size())


def load_configured(cfg: RaytronConfig) -> TokenizerSpec:
    """The tokenizer named by data.tokenizer; it may be smaller than model.vocab_size (embedding rows
    without a token are never input), never larger."""
    data = cfg.data
    spec = spec_of(read_bytes(data.tokenizer, data.endpoint_url, data.region).decode("utf-8"))
    if spec.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer: {data.tokenizer} has {spec.vocab_size} tokens, more than the embedding's "
                          f"model.vocab_size ({cfg.model.vocab_size}); make them agree")
    return spec


def sample_texts(cfg: RaytronConfig, sources: list[SourceFile]) -> Iterator[str]:
    """Documents from the start of the corpus until data.tokenizer_sample_bytes of text."""
    data = cfg.data
    taken = 0
    for source in sources:
        fs, path = data_filesystem(data, source.url)
        for record in checked(read_records(fs, path, source.url, source.format, data.text_field),
                              data.on_bad_record):
            if record.text is None:
                continue
            yield record.text
            taken += len(record.text.encode("utf-8"))
            if taken >= data.tokenizer_sample_bytes:
                return


def train_on_sample(cfg: RaytronConfig, sources: list[SourceFile]) -> TokenizerSpec:
    tokenizer = train_tokenizer(sample_texts(cfg, sources), vocab_size=cfg.model.vocab_size)
    return spec_of(tokenizer.to_str())


def resolve_tokenizer(cfg: RaytronConfig, sources: list[SourceFile]) -> TokenizerSpec:
    """data.tokenizer if set, else a tokenizer trained on the corpus sample."""
    return load_configured(cfg) if cfg.data.tokenizer else train_on_sample(cfg, sources)
