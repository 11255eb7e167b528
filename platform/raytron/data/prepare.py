"""``raytron prepare``: raw corpus -> tokenized, packed shards + manifest, reused when unchanged.

Output goes to ``data.prepared`` (default ``<train.storage_path>/prepared/<fingerprint>``).
If a manifest there has the same fingerprint, nothing is recomputed. Otherwise the old
manifest is deleted first (the folder no longer looks complete), then the shards and
tokenizer, and everything is written again at the same paths; the manifest comes last.
A run killed at any point leaves no manifest, and since every file is a pure function
of the inputs, a rerun writes exactly what a clean run writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from raytron.config import RaytronConfig
from raytron.data.encode import split_tokens
from raytron.data.manifest import (MANIFEST_FILE, SPLITS, Manifest, SplitInfo, fingerprint, read_manifest,
                                   write_manifest)
from raytron.data.packing import BlockPacker
from raytron.data.sft_prepare import write_sft_splits
from raytron.data.sft_setup import SftSetup, sft_setup
from raytron.data.shards import ShardWriter
from raytron.data.sources import SourceFile, data_filesystem, list_sources
from raytron.data.stream import BadRecords, document_dataset
from raytron.data.tokenizer import TOKENIZER_FILE
from raytron.data.tokenizer_source import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TokenizerConfig, TokenizerSpec,
                                          given_tokenizer, train_on_sample)
from raytron.storage import delete, is_remote, join_url, write_bytes


class PrepareError(RuntimeError):
    """The corpus cannot give a usable dataset (no documents, too few tokens for one block)."""


@dataclass(frozen=True)
class PrepareResult:
    url: str
    manifest: Manifest
    reused: bool
    seconds: float
    """Wall time of this call (listing, tokenizer, pipeline, writes)."""

    @property
    def tokens(self) -> int:
        return sum(split.tokens for split in self.manifest.splits.values())

    def summary_rows(self) -> list[tuple[str, ...]]:
        """What the summary table shows: per-split documents/tokens/blocks (SFT: samples, scored tokens, rows,
        truncated and skipped samples), bad records, throughput, URL."""
        m = self.manifest
        if "sft" in m.settings:
            rows = [("", "samples", "tokens", "scored tokens", "rows", "truncated", "skipped too long")]
            rows += [(name, f"{s.samples:,}", f"{s.tokens:,}", f"{s.scored_tokens:,}", f"{s.rows:,}",
                      f"{s.truncated:,}", f"{s.skipped_too_long:,}") for name, s in m.splits.items()]
        else:
            rows = [("", "documents", "tokens", "blocks", "dropped tokens")]
            rows += [(name, f"{s.documents:,}", f"{s.tokens:,}", f"{s.rows:,}", f"{s.dropped_tokens:,}")
                     for name, s in m.splits.items()]
        rate = "reused, nothing computed" if self.reused else f"{self.tokens / self.seconds:,.0f} tokens/s"
        blank = ("",) * (len(rows[0]) - 2)
        rows += [("bad records", f"{m.bad_records:,}", *blank),
                 ("time", f"{self.seconds:.1f} s", rate, *blank[1:]),
                 ("output", self.url, *blank)]
        return rows


TOKENIZER_CONFIG_FILES = (TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)
FINGERPRINT_DIR_CHARS = 16
"""Hex digits of the fingerprint that name the default prepared folder (64 bits: no collision in practice)."""


def prepared_url(cfg: RaytronConfig, digest: str) -> str:
    """data.prepared, else <train.storage_path>/prepared/<fingerprint>: located by what the shards hold, not by
    the run's name, so runs (and sweeps) of one corpus under different names tokenize it once. Local paths are
    made absolute (workers read them)."""
    url = cfg.data.prepared or join_url(cfg.train.storage_path, "prepared", digest[:FINGERPRINT_DIR_CHARS])
    return url if is_remote(url) else str(Path(url).expanduser().absolute())


def identity(cfg: RaytronConfig, sources: list[SourceFile], tokenizer: TokenizerSpec | None,
             sft: SftSetup | None = None) -> dict:
    """Everything the shards depend on (and nothing they do not, such as the actor count). SFT formats add
    the settings of ``sft`` (resolved from the config and tokenizer when not given): the chat template's
    text and source, the tokenizer files' hash; pretraining with a tokenizer whose documents end otherwise
    than raytron's (its own EOS, a BOS) adds that separator."""
    data = cfg.data
    if data.is_sft and sft is None:
        sft = sft_setup(data, tokenizer)
    return {
        "sources": [source.to_dict() for source in sources],
        "tokenizer": {"sha256": tokenizer.sha256} if tokenizer else
                     {"trained": {"vocab_size": cfg.model.vocab_size, "sample_bytes": data.tokenizer_sample_bytes}},
        "seq_len": cfg.train.seq_len, "validation_fraction": data.validation_fraction,
        "text_field": data.text_field, "on_bad_record": data.on_bad_record, "shard_blocks": data.shard_blocks,
        # SFT keys only for SFT formats, and the document separator only when it is not raytron's <|endoftext|>
        # alone, so the fingerprints (and folders) of data prepared before either existed stay as they were
        **({"sft": sft.settings(data)} if sft else {}),
        **({"documents": tokenizer.ends.settings()} if tokenizer and not sft and not tokenizer.ends.is_raytrons
           else {}),
    }


def prepare(cfg: RaytronConfig, workdir: str | Path = ".raytron") -> PrepareResult:
    """Prepare data.source into prepared_url(cfg, fingerprint), or reuse what is there when the fingerprint matches.

    Connects nothing itself: under a connected Ray cluster it uses that one, otherwise Ray
    Data starts a local one. 'demo' builds the docstring corpus as JSONL under ``workdir``.
    """
    started = time.monotonic()
    data = cfg.data
    sources = list_sources(cfg, workdir)
    given = given_tokenizer(cfg)
    sft = sft_setup(data, given) if data.is_sft else None
    settings = identity(cfg, sources, given, sft)
    digest = fingerprint(settings)
    url = prepared_url(cfg, digest)
    existing = read_manifest(url, data.endpoint_url, data.region)
    if existing is not None and existing.fingerprint == digest:
        return PrepareResult(url, existing, True, time.monotonic() - started)
    for name in (MANIFEST_FILE, TOKENIZER_FILE, *TOKENIZER_CONFIG_FILES, *SPLITS):  # manifest first: incomplete now
        delete(join_url(url, name), data.endpoint_url, data.region)
    tokenizer = given or train_on_sample(cfg, sources)
    write_bytes(join_url(url, TOKENIZER_FILE), tokenizer.json.encode(), data.endpoint_url, data.region)
    _write_tokenizer_config(url, tokenizer.config, cfg)
    splits, bad = _write_splits(cfg, url, sources, tokenizer, sft)
    manifest = Manifest(fingerprint=digest, seq_len=cfg.train.seq_len, splits=splits,
                        tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
                        sources=settings.pop("sources"), settings=settings, bad_records=bad.count,
                        bad_record_examples=bad.examples)
    write_manifest(url, manifest, data.endpoint_url, data.region)
    return PrepareResult(url, manifest, False, time.monotonic() - started)


def _write_tokenizer_config(url: str, config: TokenizerConfig | None, cfg: RaytronConfig) -> None:
    """A given tokenizer's Hugging Face files go next to its tokenizer.json: the special tokens (and chat
    template) the documents or samples were made with travel with the shards."""
    for name, text in zip(TOKENIZER_CONFIG_FILES, (config.text, config.template_text) if config else ()):
        if text:
            write_bytes(join_url(url, name), text.encode(), cfg.data.endpoint_url, cfg.data.region)


def _write_splits(cfg: RaytronConfig, url: str, sources: list[SourceFile], tokenizer: TokenizerSpec,
                  sft: SftSetup | None) -> tuple[dict[str, SplitInfo], BadRecords]:
    fs, base_path = data_filesystem(cfg.data, url)
    writers = {name: ShardWriter(fs, base_path, url, name, cfg.data.shard_blocks) for name in SPLITS}
    if sft:
        splits, bad, documents = write_sft_splits(cfg, writers, sources, tokenizer, sft)
    else:
        splits, bad, documents = _write_text_splits(cfg, writers, sources, tokenizer)
    if not documents:
        raise PrepareError(f"data.source: no {'samples' if sft else 'documents'} in {len(sources)} input file(s) "
                           f"({bad.count} bad records, e.g. {bad.examples[:3]}"
                           + (f"; {sum(s.skipped_too_long for s in splits.values())} longer than train.seq_len + 1)"
                              if sft else ")"))
    if not splits["train"].rows:
        raise PrepareError(f"data.source: no training samples ({documents} in validation: lower "
                           "data.validation_fraction)" if sft else
                           f"data.source: {splits['train'].dropped_tokens} training tokens do not fill one block of "
                           f"train.seq_len + 1 = {cfg.train.seq_len + 1}")
    return splits, bad


def _write_text_splits(cfg: RaytronConfig, writers: dict[str, ShardWriter], sources: list[SourceFile],
                       tokenizer: TokenizerSpec) -> tuple[dict[str, SplitInfo], BadRecords, int]:
    """Documents concatenated and cut into blocks; (per-split info, bad records, documents in all)."""
    packers = {name: BlockPacker(cfg.train.seq_len) for name in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    bad = BadRecords(cfg.data.on_bad_record)
    for table in document_dataset(cfg, sources, tokenizer).iter_batches(batch_size=None,
                                                                             batch_format="pyarrow"):
        bad.add(table)
        for name in SPLITS:
            tokens, count = split_tokens(table, name == "validation")
            documents[name] += count
            writers[name].add(packers[name].add(tokens))
    splits = {}
    for name in SPLITS:
        shards = writers[name].close()
        rows = sum(shard.rows for shard in shards)
        splits[name] = SplitInfo(rows, documents[name], rows * (cfg.train.seq_len + 1), packers[name].dropped, shards)
    return splits, bad, sum(documents.values())
