"""The raw input files of a corpus: URLs, globs and prefixes expanded, sorted, fingerprinted.

Sorting by URL makes the output independent of the order the user lists sources in.
Names starting with '.' or '_' (``_SUCCESS``, ``.DS_Store``, a corpus folder's manifest)
are not corpus files and are left out of prefix and glob listings.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from raytron.config import DataConfig, RaytronConfig
from raytron.storage import StorageError, filesystem_for, is_remote

GLOB_CHARS = "*?["
DEMO_SOURCE = "demo"


@dataclass(frozen=True)
class SourceFile:
    url: str
    size: int
    mtime_ns: int
    """Last modification (S3: LastModified); with ``size`` it decides whether prepared output is stale."""
    format: str
    """jsonl | parquet | text | chat | prompt_completion."""

    def to_dict(self) -> dict:
        return asdict(self)


def detect_format(url: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = url.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def data_filesystem(data: DataConfig, url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem for a data URL, with the config's S3 endpoint/region if given."""
    return filesystem_for(url, data.endpoint_url, data.region)


def list_sources(cfg: RaytronConfig, workdir: str | Path = ".raytron") -> list[SourceFile]:
    """Every input file of ``data.source``, each once, sorted by URL.

    'demo' builds the docstring corpus as JSONL under ``workdir`` (reused when built).
    Fails naming the URL when a source matches nothing or cannot be listed.
    """
    data = cfg.data
    urls = _demo_files(data, Path(workdir)) if data.sources == [DEMO_SOURCE] else data.sources
    found: dict[str, SourceFile] = {}
    for url in urls:
        for source in _expand(data, url):
            found[source.url] = source
    return [found[url] for url in sorted(found)]


def _demo_files(data: DataConfig, workdir: Path) -> list[str]:
    from raytron.data.corpus import build_docstring_corpus  # parses the stdlib: only when asked for

    corpus = build_docstring_corpus(workdir.absolute() / f"corpus-{data.demo_corpus_bytes}",
                                    max_bytes=data.demo_corpus_bytes,
                                    include_site_packages=data.demo_corpus_bytes > 1_500_000)
    return [str(path) for path in corpus.paths]


def _expand(data: DataConfig, url: str) -> list[SourceFile]:
    fs, path = data_filesystem(data, url)
    wildcard = next((i for i, char in enumerate(path) if char in GLOB_CHARS), None)
    try:
        if wildcard is not None:
            root = path[:wildcard].rsplit("/", 1)[0]
            infos = [info for info in _walk(fs, root) if fnmatch.fnmatchcase(info.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                infos = [info]
            elif info.type == pafs.FileType.Directory:
                infos = _walk(fs, path)
            else:
                raise StorageError(f"data.source: {url} does not exist" +
                                   (" (is the bucket name right?)" if is_remote(url) else ""))
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"data.source: cannot list {url}: {error}") from None
    if not infos:
        raise StorageError(f"data.source: {url} matches no files")
    return [SourceFile(_as_url(url, info.path), info.size, info.mtime_ns or 0,
                       detect_format(info.path, data.format)) for info in infos]


def _walk(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File and not _hidden(info.path, root)]


def _hidden(path: str, root: str) -> bool:
    relative = PurePosixPath(path).relative_to(root) if path.startswith(root) else PurePosixPath(path)
    return any(part.startswith((".", "_")) for part in relative.parts)


def _as_url(original: str, path: str) -> str:
    return f"s3://{path}" if is_remote(original) else path
