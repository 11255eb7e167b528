"""A real-text corpus built at run time from the docstrings of installed Python code.

The demo, the tests and the benchmarks need real English-and-code text on a machine
with no downloads, and the text must not be copied into the repository. Every Python
installation carries megabytes of it: the docstrings of the standard library (and of
the packages in site-packages).

Sources are *parsed* with ``ast``, never imported: importing runs arbitrary module
code (side effects, slow imports, platform-specific failures). Only statements are
visited, not expressions, which keeps the walk a small fraction of the parse time.
Test suites (``test``/``tests`` folders) are skipped: they are most of the stdlib's
source but their docstrings are short and repetitive, and skipping them halves the
build time. Files are parsed in a process pool (spawned, so it is safe to call from a
process that already runs threads, such as torch's); documents are still emitted in
file order.

The output is a folder of JSONL shards, one ``{"text": ..., "source": ...}`` per
line, ``source`` being ``module.qualname``. Documents come in a deterministic order
(sorted file paths, then source order inside a file) and each distinct text appears
once. A manifest, ``_SUCCESS``, is written last; a folder holding one built with the
same parameters is reused as is. Changes to installed packages are not detected:
delete the folder to rebuild.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "_SUCCESS"
MANIFEST_FORMAT = 1
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Compound statements whose bodies can hold definitions (``if sys.platform == ...: def f``).
_NESTED_BODIES = ("body", "orelse", "finalbody")
# Fields holding except-handlers / match-cases, each of which wraps its own body.
_NESTED_CLAUSES = ("handlers", "cases")


@dataclass(frozen=True)
class Docstring:
    text: str
    source: str
    """Dotted ``module.qualname`` the docstring belongs to."""


@dataclass(frozen=True)
class CorpusInfo:
    paths: list[Path]
    """Shard files, in order."""
    documents: int
    bytes: int
    """Total size of the shard files (UTF-8 JSONL)."""


def source_roots(include_site_packages: bool = False) -> list[Path]:
    """The standard library folder, then (optionally) this interpreter's site-packages."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if include_site_packages:
        roots += sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    return roots


def python_files(root: Path) -> list[Path]:
    """Every ``.py`` under ``root`` outside test suites, caches and nested site-packages, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_DIRS]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(found)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def docstrings_in_source(source: bytes, module: str) -> Iterator[Docstring]:
    """Docstrings of the module, its classes and functions (nested ones too), in source order.

    Files that do not parse (Python 2 leftovers, deliberately broken fixtures) yield nothing.
    """
    try:
        with warnings.catch_warnings():  # invalid escapes and the like are not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    text = ast.get_docstring(tree)
    if text:
        yield Docstring(text, module)
    yield from _definitions(tree.body, module)


def _definitions(statements: list[ast.stmt], scope: str) -> Iterator[Docstring]:
    for statement in statements:
        if isinstance(statement, _DEFINITIONS):
            qualname = f"{scope}.{statement.name}"
            text = ast.get_docstring(statement)
            if text:
                yield Docstring(text, qualname)
            yield from _definitions(statement.body, qualname)
            continue
        for field in _NESTED_BODIES:
            yield from _definitions(getattr(statement, field, ()), scope)
        for field in _NESTED_CLAUSES:
            for clause in getattr(statement, field, ()):
                yield from _definitions(clause.body, scope)


def docstrings_in_file(path_and_root: tuple[Path, Path]) -> list[Docstring]:
    path, root = path_and_root
    return list(docstrings_in_source(path.read_bytes(), module_name(path, root)))


def _parsed_files(files: list[tuple[Path, Path]], workers: int) -> Iterator[list[Docstring]]:
    """Docstrings per file, in the order of ``files``; closing the iterator stops the pool."""
    if workers <= 1:
        yield from map(docstrings_in_file, files)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(docstrings_in_file, files, chunksize=16)


def iter_docstrings(include_site_packages: bool = False, min_chars: int = 64,
                    workers: int | None = None) -> Iterator[Docstring]:
    """Distinct docstrings of at least ``min_chars`` characters, in deterministic order.

    ``workers`` parse files in parallel (default: one per CPU). Texts that cannot be
    encoded as UTF-8 (lone surrogates written as escapes) are skipped.
    """
    files = [(path, root) for root in source_roots(include_site_packages) for path in python_files(root)]
    seen: set[bytes] = set()
    for docs in _parsed_files(files, workers or os.cpu_count() or 1):
        for doc in docs:
            if len(doc.text) < min_chars:
                continue
            try:
                digest = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
            except UnicodeEncodeError:
                continue
            if digest not in seen:
                seen.add(digest)
                yield doc


def build_docstring_corpus(out_dir: str | Path, max_bytes: int | None = None, include_site_packages: bool = False,
                           docs_per_shard: int = 4096, min_chars: int = 64,
                           workers: int | None = None) -> CorpusInfo:
    """Write the docstring corpus as ``shard-00000.jsonl``... into ``out_dir``, or reuse it.

    ``max_bytes`` caps the total shard size: building stops before the first document that
    would exceed it, so a small corpus is a prefix of a larger one with the same settings.
    """
    out = Path(out_dir)
    params = {
        "format": MANIFEST_FORMAT,
        "python": list(sys.version_info[:3]),
        "roots": [str(root) for root in source_roots(include_site_packages)],
        "max_bytes": max_bytes,
        "docs_per_shard": docs_per_shard,
        "min_chars": min_chars,
    }
    existing = _read_manifest(out, params)
    if existing is not None:
        return existing
    _remove_previous_build(out)
    out.mkdir(parents=True, exist_ok=True)
    with closing(iter_docstrings(include_site_packages, min_chars, workers)) as docs:  # stops the pool early
        shards = _write_shards(out, docs, max_bytes, docs_per_shard)
    info = CorpusInfo([out / name for name, _, _ in shards], sum(n for _, n, _ in shards), sum(b for _, _, b in shards))
    manifest = {**params, "documents": info.documents, "bytes": info.bytes,
                "shards": [{"name": name, "documents": n, "bytes": b} for name, n, b in shards]}
    scratch = out / f"{MANIFEST_NAME}.tmp"
    scratch.write_text(json.dumps(manifest, indent=1))
    os.replace(scratch, out / MANIFEST_NAME)  # last and atomic: its presence means complete
    return info


def _write_shards(out: Path, docs: Iterator[Docstring], max_bytes: int | None,
                  docs_per_shard: int) -> list[tuple[str, int, int]]:
    """Write shards; return (file name, documents, bytes) per shard."""
    shards: list[tuple[str, int, int]] = []
    lines: list[bytes] = []
    total = 0

    def flush() -> None:
        name = f"shard-{len(shards):05d}.jsonl"
        data = b"".join(lines)
        (out / name).write_bytes(data)
        shards.append((name, len(lines), len(data)))
        lines.clear()

    for doc in docs:
        line = (json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n").encode("utf-8")
        if max_bytes is not None and total + len(line) > max_bytes:
            break
        lines.append(line)
        total += len(line)
        if len(lines) == docs_per_shard:
            flush()
    if lines:
        flush()
    return shards


def _read_manifest(out: Path, params: dict) -> CorpusInfo | None:
    """The finished corpus in ``out`` if it was built with ``params`` and its shards are intact."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(key) != value for key, value in params.items()):
        return None
    paths = [out / shard["name"] for shard in manifest["shards"]]
    sizes = [shard["bytes"] for shard in manifest["shards"]]
    if not all(path.is_file() and path.stat().st_size == size for path, size in zip(paths, sizes)):
        return None
    return CorpusInfo(paths, manifest["documents"], manifest["bytes"])


def _remove_previous_build(out: Path) -> None:
    for path in [out / MANIFEST_NAME, *out.glob("shard-*.jsonl")]:
        path.unlink(missing_ok=True)
