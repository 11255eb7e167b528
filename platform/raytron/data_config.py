"""The ``data:`` section of a run YAML: the corpus, its format, the tokenizer and how samples are cut.

Pretraining text is concatenated and cut into blocks; the supervised fine-tuning formats (``chat``,
``prompt_completion``) keep each record a sample with a loss mask, so the fields that only they
read are refused with any other format.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from raytron.config_base import Section

SFT_FORMATS = ("chat", "prompt_completion")
"""data.format values that are supervised fine-tuning records."""
SFT_DEFAULTS = {"train_on_prompt": False, "too_long": "truncate", "packing": False, "chat_template": None}
"""The data fields that only SFT formats read, with their defaults (any other value needs an SFT format)."""


class DataConfig(Section):
    source: str | list[str] = "demo"
    """Corpus: 'demo' (built-in docstring corpus), or a URL / glob / prefix (local or s3://), or a list of them."""
    format: Literal["auto", "jsonl", "parquet", "text", "chat", "prompt_completion"] = "auto"
    """Input format; 'auto' by extension (.jsonl/.json, .parquet, else text; .gz gunzipped); SFT: 'chat' / 'prompt_completion' JSONL."""
    train_on_prompt: bool = False
    """SFT formats only: score the prompt (system/user) tokens too, not only the assistant/completion tokens."""
    too_long: Literal["truncate", "skip", "fail"] = "truncate"
    """SFT formats only: a sample over train.seq_len + 1 tokens is cut or dropped (counted in the manifest) or fails."""
    packing: bool = False
    """SFT formats only: pack whole samples into each row (no sample attends to another); false pads each to seq_len."""
    chat_template: str | None = None
    """data.format chat only: inline Jinja (has {{ or {%) or a template file's path/URL; default the tokenizer folder's."""
    text_field: str = "text"
    """JSONL key / Parquet column holding each document's text (text files: one document per file)."""
    tokenizer: str | None = None
    """Path/URL of a tokenizer.json or a folder holding one (SFT reads tokenizer_config.json too); default: model.init_from's folder, else trained."""
    tokenizer_sample_bytes: PositiveInt = 20_000_000
    """Text read (sorted sources, from the start) to train the tokenizer when data.tokenizer is null."""
    prepared: str | None = None
    """Output URL of the prepared shards + manifest; default <train.storage_path>/prepared/<the data's fingerprint>."""
    mode: Literal["prepared", "streaming"] = "prepared"
    """'prepared': train from `raytron prepare` shards; 'streaming': tokenize and pack the raw corpus online."""
    on_bad_record: Literal["fail", "skip"] = "fail"
    """Bad JSON line, missing/empty text, non-UTF-8 bytes, empty file: 'fail' names file and line; 'skip' counts them."""
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of documents held out for validation (chosen by a hash of each document's text)."""
    shuffle_seed: int = 0
    """Seed of the per-epoch shuffle of training blocks."""
    tokenize_actors: PositiveInt = 2
    """Size of the Ray Data actor pool that tokenizes (each actor loads the tokenizer once)."""
    tokenize_cpus: float = Field(0.5, gt=0.0)
    """Ray CPUs reserved per tokenizer actor; below 1 leaves room for read tasks on small clusters."""
    shard_blocks: PositiveInt = 8192
    """Blocks (rows of train.seq_len + 1 tokens) per output shard file."""
    endpoint_url: str | None = None
    """S3 endpoint for data URLs (MinIO, R2, ...); default $AWS_ENDPOINT_URL, else AWS."""
    region: str | None = None
    """S3 region for data URLs; default $AWS_DEFAULT_REGION, else us-east-1."""
    demo_corpus_bytes: PositiveInt = 3_000_000
    """Size of the built-in docstring corpus when source is 'demo'."""

    @field_validator("source")
    @classmethod
    def _sources_not_empty(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls or any(not url.strip() for url in urls):
            raise ValueError("needs 'demo' or at least one non-empty URL")
        if "demo" in urls and len(urls) > 1:
            raise ValueError("'demo' cannot be combined with other sources")
        return value

    @model_validator(mode="after")
    def _sft_fields_need_an_sft_format(self) -> DataConfig:
        # a setting that would be silently ignored is an error, as everywhere in the config
        if self.format in SFT_FORMATS:
            if self.format != "chat" and self.chat_template is not None:
                raise ValueError(f"data.chat_template: only for data.format chat (got format {self.format!r})")
            if self.mode == "streaming":  # samples are cut, packed and counted by prepare
                raise ValueError(f"data.mode: 'streaming' reads pretraining text only; data.format {self.format!r} "
                                 "needs data.mode: prepared")
            return self
        set_fields = [name for name, default in SFT_DEFAULTS.items() if getattr(self, name) != default]
        if set_fields:
            raise ValueError(f"data.{set_fields[0]}: only for data.format chat or prompt_completion "
                             f"(got format {self.format!r})")
        return self

    @property
    def is_sft(self) -> bool:
        """Whether the records are supervised fine-tuning samples (chat / prompt_completion)."""
        return self.format in SFT_FORMATS

    @property
    def sources(self) -> list[str]:
        """``source`` as a list."""
        return [self.source] if isinstance(self.source, str) else list(self.source)
