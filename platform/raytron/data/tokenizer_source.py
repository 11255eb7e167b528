"""Where the tokenizer comes from: a given tokenizer.json (path/URL, or a model folder / s3 prefix holding
one; with model.init_from, by default that folder's), or one trained on a corpus sample (never for an
imported model: its embedding rows mean its own tokenizer's tokens).

The ``tokenizer_config.json`` beside a given tokenizer.json is read too (Hugging Face's layout: special tokens,
``add_bos_token``, ``chat_template``, and transformers 5's ``chat_template.jinja``): pretraining takes its
document separator from it (``encode.document_ends``), SFT its template and special tokens.
The sample is the first ``data.tokenizer_sample_bytes`` of document text in sorted
source order (bad records handled by ``data.on_bad_record``; SFT records give their messages' or
prompt's and completion's text), read in this process: the same sources always give the same
tokenizer. Vocabulary size and special tokens (EOS, BOS, PAD) come from the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
from tokenizers import Tokenizer

from raytron.config import ConfigError, RaytronConfig
from raytron.data.encode import DocumentEnds, document_ends
from raytron.data.records import checked, read_records
from raytron.data.sft_encode import record_texts
from raytron.data.sources import SourceFile, data_filesystem
from raytron.data.tokenizer import TOKENIZER_FILE, train_tokenizer
from raytron.parallel.checkpoint_layout import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from raytron.storage import StorageError, filesystem_for, is_remote, join_url, read_bytes



@dataclass(frozen=True)
class TokenizerConfig:
    """The Hugging Face files beside a tokenizer.json: tokenizer_config.json (special tokens, maybe the
    chat template) and chat_template.jinja, each "" when absent; hashed into the SFT fingerprint."""
    folder: str
    text: str
    template_text: str

    @property
    def content(self) -> dict:
        return json.loads(self.text) if self.text else {}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.text, self.template_text]).encode()).hexdigest()


@dataclass(frozen=True)
class TokenizerSpec:
    json: str
    """The tokenizer.json content (what actors and checkpoints carry)."""
    sha256: str
    vocab_size: int
    ends: DocumentEnds
    """What pretraining puts around each document (its BOS, its EOS)."""
    config: TokenizerConfig | None = None
    """The files beside a given tokenizer."""


def spec_of(tokenizer_json: str, config: TokenizerConfig | None = None) -> TokenizerSpec:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    # fails now, not in an actor, when there is no EOS (a tokenizer_config.json may name its own)
    ends = document_ends(tokenizer, config.content if config else {})
    return TokenizerSpec(tokenizer_json, hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                         tokenizer.get_vocab_size(), ends, config)


def tokenizer_files(url: str) -> tuple[str, str]:
    """(tokenizer.json URL, the folder beside it) of data.tokenizer: a .json file, or a folder (local) /
    prefix (s3://, any name not ending in .json) holding tokenizer.json."""
    if not is_remote(url):
        path = Path(url).expanduser()
        return (str(path / TOKENIZER_FILE), str(path)) if path.is_dir() else (url, str(path.parent))
    if not url.endswith(".json"):
        return join_url(url, TOKENIZER_FILE), url.rstrip("/")
    return url, url.rsplit("/", 1)[0]


def _read_optional(url: str, endpoint_url: str | None, region: str | None) -> str:
    fs, path = filesystem_for(url, endpoint_url, region)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return ""
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot read {url}: {error}") from None
    return read_bytes(url, endpoint_url, region).decode("utf-8")


def read_tokenizer_config(folder: str, endpoint_url: str | None = None,
                          region: str | None = None) -> TokenizerConfig | None:
    """The Hugging Face tokenizer files in folder, or None when it has neither."""
    url = join_url(folder, TOKENIZER_CONFIG_FILE)
    config = TokenizerConfig(folder, _read_optional(url, endpoint_url, region),
                             _read_optional(join_url(folder, CHAT_TEMPLATE_FILE), endpoint_url, region))
    try:
        content = config.content
    except json.JSONDecodeError as error:
        raise ConfigError(f"data.tokenizer: {url} line {error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"data.tokenizer: {url} must hold a JSON object")
    return config if config.text or config.template_text else None


def load_configured(cfg: RaytronConfig) -> TokenizerSpec:
    """The tokenizer named by data.tokenizer; it may be smaller than model.vocab_size (embedding rows
    without a token are never input), never larger."""
    data = cfg.data
    tokenizer_url, folder = tokenizer_files(data.tokenizer)
    config = read_tokenizer_config(folder, data.endpoint_url, data.region)
    try:
        spec = spec_of(read_bytes(tokenizer_url, data.endpoint_url, data.region).decode("utf-8"), config)
    except ValueError as error:
        raise ConfigError(f"data.tokenizer: {tokenizer_url}: {error}") from None
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
            for text in record_texts(record.text) if data.is_sft else [record.text]:
                yield text
                taken += len(text.encode("utf-8"))
            if taken >= data.tokenizer_sample_bytes:
                return


def train_on_sample(cfg: RaytronConfig, sources: list[SourceFile]) -> TokenizerSpec:
    tokenizer = train_tokenizer(sample_texts(cfg, sources), vocab_size=cfg.model.vocab_size)
    return spec_of(tokenizer.to_str())


def given_tokenizer(cfg: RaytronConfig) -> TokenizerSpec | None:
    """data.tokenizer's, or None when one is to be trained on the corpus: never for an imported model
    (resolve_init_from defaults data.tokenizer to init_from's folder when that holds a tokenizer)."""
    if cfg.data.tokenizer:
        return load_configured(cfg)
    if cfg.model.init_from:  # a new vocabulary would give the imported embedding rows other meanings
        raise ConfigError(f"data.tokenizer: not set, and model.init_from {cfg.model.init_from!r} holds no "
                          f"{TOKENIZER_FILE} to default to; an imported model needs the tokenizer it was trained "
                          f"with: set data.tokenizer to a {TOKENIZER_FILE} or a folder / s3 prefix holding one")
    return None


def resolve_tokenizer(cfg: RaytronConfig, sources: list[SourceFile]) -> TokenizerSpec:
    """data.tokenizer's (see given_tokenizer), else a tokenizer trained on the corpus sample."""
    return given_tokenizer(cfg) or train_on_sample(cfg, sources)
