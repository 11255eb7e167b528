"""The manifest of a prepared dataset: written last, so its presence means the output is complete.

Layout under the prepared URL::

    manifest.json                  this file
    tokenizer.json                 the tokenizer the shards were made with
    tokenizer_config.json          a given tokenizer's Hugging Face files, when it has them
    chat_template.jinja                (special tokens, chat template)
    train/shard-00000.parquet      tokens: list<int32> of exactly seq_len + 1 ids; id: int64
    validation/shard-00000.parquet     (block index within the split, in prepare order);
                                   SFT adds loss_mask: list<bool> (and, packed, segments: list<int32>)

``fingerprint`` hashes everything the shards depend on (sources with sizes and mtimes,
tokenizer and its document separator, seq_len, split and format settings, bad-record policy, shard size); equal
fingerprints mean the output can be reused as is. Shard paths are stored relative to the
prepared URL (the folder can be moved or copied); ``ShardInfo.url`` is absolute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from raytron.storage import StorageError, join_url, read_bytes, write_bytes

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the prepared URL."""
    rows: int
    url: str = ""
    """Absolute URL (filled in by read_manifest)."""


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    """Blocks of seq_len + 1 ids."""
    documents: int
    tokens: int
    """Ids in blocks (EOS included)."""
    dropped_tokens: int
    """Ids at the end of the split that did not fill a block (SFT: ids cut off truncated samples)."""
    shards: list[ShardInfo]
    # SFT splits only (0 for pretraining, and in manifests written before they existed)
    samples: int = 0
    """Samples in the rows (documents: the split's good records, these and the ones skipped too long)."""
    scored_tokens: int = 0
    """Targets the loss counts (loss_mask true)."""
    truncated: int = 0
    skipped_too_long: int = 0


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    seq_len: int
    splits: dict[str, SplitInfo]
    tokenizer_sha256: str
    vocab_size: int
    sources: list[dict]
    """{url, size, mtime_ns, format} per input file, sorted by URL."""
    settings: dict
    bad_records: int
    bad_record_examples: list[str] = field(default_factory=list)
    """The first few problems, "<url>:<line>: <what>"."""
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        body = asdict(self)
        for split in body["splits"].values():
            for shard in split["shards"]:
                del shard["url"]  # derived from where the manifest lies
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def fingerprint(identity: dict) -> str:
    canonical = json.dumps({"version": MANIFEST_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(prepared_url: str, endpoint_url: str | None = None, region: str | None = None) -> Manifest | None:
    """The manifest of a complete prepared dataset, or None when there is none (never built, or interrupted)."""
    try:
        raw = json.loads(read_bytes(join_url(prepared_url, MANIFEST_FILE), endpoint_url, region))
    except (StorageError, ValueError):  # absent, or cut short while being written
        return None
    if raw.get("version") != MANIFEST_VERSION:
        return None
    splits = {name: SplitInfo(**{**split, "shards": [ShardInfo(**shard, url=join_url(prepared_url, shard["path"]))
                                                     for shard in split["shards"]]})
              for name, split in raw.pop("splits").items()}
    return Manifest(splits=splits, **raw)


def write_manifest(prepared_url: str, manifest: Manifest, endpoint_url: str | None = None,
                   region: str | None = None) -> None:
    write_bytes(join_url(prepared_url, MANIFEST_FILE), manifest.to_json().encode(), endpoint_url, region)
