"""Documents out of one raw file (JSONL, Parquet or text, gzip by extension), bad records named.

A record is either a document's text or a problem ``"<url>:<line>: <what>"`` (Parquet:
row number; whole-file problems: line 0). Readers never raise for bad content: they
yield the problem and go on, and the consumer applies ``data.on_bad_record``, so the
same reader serves 'fail' and 'skip' and the first problem reported is always the
first in file order.

Bad: a line that is not UTF-8 or not JSON, a JSON value that is not an object, a missing,
null, non-string or empty text field, a file with no documents (empty file), a text file
with non-UTF-8 bytes. Blank lines in JSONL are separators, not records. A text file is one
document (its whole content). SFT formats (chat, prompt_completion) yield each JSON object line
whole, with its ``where``: the SFT encoder checks its messages and names that line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytron.storage import StorageError

READ_CHUNK = 8 << 20
PARQUET_BATCH_ROWS = 4096


class BadRecordError(ValueError):
    """A bad input record under ``on_bad_record: fail``; the message names file and line."""


@dataclass(frozen=True)
class Record:
    text: str | None
    problem: str | None = None
    where: str | None = None
    """``"<url>:<line>"`` of an SFT record (its problems are found later, by the encoder)."""


def read_records(fs: pafs.FileSystem, path: str, url: str, fmt: str, text_field: str) -> Iterator[Record]:
    """Every record of one file, in file order."""
    readers = {"jsonl": _jsonl, "parquet": _parquet, "text": _text, "chat": _sft_jsonl, "prompt_completion": _sft_jsonl}
    emitted = False
    try:
        for record in readers[fmt](fs, path, url, text_field):
            emitted = True
            yield record
    except (OSError, pa.ArrowException) as error:  # unreachable, vanished, corrupt gzip: not a record
        raise StorageError(f"cannot read {url}: {error}") from None
    if not emitted:
        yield Record(None, f"{url}:0: empty file (no documents)")


def bad_record_error(problem: str) -> BadRecordError:
    return BadRecordError(f"bad input record at {problem} (set data.on_bad_record: skip to skip and count such "
                          "records)")


def checked(records: Iterator[Record], on_bad_record: str) -> Iterator[Record]:
    """Records with the policy applied: 'fail' raises at the first problem, 'skip' passes problems on."""
    for record in records:
        if record.problem is not None and on_bad_record == "fail":
            raise bad_record_error(record.problem)
        yield record


def _open(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """The file's bytes, gunzipped for ``.gz`` (by name, like pyarrow's "detect", but said here)."""
    stream = fs.open_input_stream(path, compression=None)
    return pa.CompressedInputStream(stream, "gzip") if path.endswith(".gz") else stream


def _lines(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
    """Lines without their newline; ``.gz`` files are decompressed on the fly."""
    pending = b""
    with _open(fs, path) as stream:
        while chunk := stream.read(READ_CHUNK):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            yield from lines
    if pending:
        yield pending


def _json_objects(fs: pafs.FileSystem, path: str, url: str) -> Iterator[tuple[int, str, dict | None, str | None]]:
    """(line number, line text, the line's JSON object or None, problem or None) per non-blank line."""
    for number, raw in enumerate(_lines(fs, path), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            value = json.loads(line)
        except UnicodeDecodeError as error:
            yield number, "", None, f"{url}:{number}: not valid UTF-8 (byte {error.start})"
            continue
        except ValueError as error:
            yield number, line, None, f"{url}:{number}: invalid JSON ({error})"
            continue
        if not isinstance(value, dict):
            yield number, line, None, f"{url}:{number}: a JSON {type(value).__name__}, not an object"
            continue
        yield number, line, value, None


def _jsonl(fs: pafs.FileSystem, path: str, url: str, text_field: str) -> Iterator[Record]:
    for number, _, value, problem in _json_objects(fs, path, url):
        yield Record(None, problem) if problem else _text_record(value.get(text_field), url, number, text_field)


def _sft_jsonl(fs: pafs.FileSystem, path: str, url: str, text_field: str) -> Iterator[Record]:
    """SFT records (chat / prompt_completion): the whole JSON line, checked by the SFT encoder, which
    needs ``where`` to name the line of a record whose messages are bad."""
    for number, line, _, problem in _json_objects(fs, path, url):
        yield Record(None, problem) if problem else Record(line, where=f"{url}:{number}")


def _text_record(text: object, url: str, number: int, text_field: str, where: str = "") -> Record:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            return Record(None, f"{url}:{where}{number}: field {text_field!r} is not valid UTF-8 (byte {error.start})")
    if text is None:
        return Record(None, f"{url}:{where}{number}: missing field {text_field!r}")
    if not isinstance(text, str):
        return Record(None, f"{url}:{where}{number}: field {text_field!r} is a {type(text).__name__}, not a string")
    if not text:
        return Record(None, f"{url}:{where}{number}: field {text_field!r} is empty")
    return Record(text)


def _parquet(fs: pafs.FileSystem, path: str, url: str, text_field: str) -> Iterator[Record]:
    with fs.open_input_file(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as error:
            yield Record(None, f"{url}:0: not a readable Parquet file ({error})")
            return
        if text_field not in parquet.schema_arrow.names:
            yield Record(None, f"{url}:0: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield _text_record(text, url, row, text_field, where="row ")


def _text(fs: pafs.FileSystem, path: str, url: str, text_field: str) -> Iterator[Record]:
    with _open(fs, path) as stream:
        raw = stream.read()
    if not raw:
        return
    try:
        yield Record(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        yield Record(None, f"{url}:{line}: not valid UTF-8 (byte {error.start})")
