"""The records of ``raytron generate``'s input files as one Ray Data source, each named by where it is.

One read task per file (JSONL or Parquet) yields Arrow blocks of five columns: ``record`` (the
record as JSON text; null for a bad one), ``where`` (``<url>:<line>``, Parquet ``<url>:row <n>``),
``problem`` (null, or ``<where>: <what>`` for a line that is not a JSON object), ``file`` (the
file's index in the source's list) and ``last`` (true on the file's last record only: the driver
writes a file as soon as that record is back, without waiting for the next file). Readers never
raise for bad content: the worker applies ``on_bad_record``, so the first problem reported is the
first in file order. With ``preserve_order`` blocks arrive in file order, files in list order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from raytron.storage import filesystem_for

# Records per block: a block is one map_batches call's worth of prompts for an engine or two.
BLOCK_RECORDS = 256
SCHEMA = pa.schema([("record", pa.string()), ("where", pa.string()), ("problem", pa.string()),
                    ("file", pa.int32()), ("last", pa.bool_())])


def _jsonl(raw: bytes, url: str) -> Iterator[tuple[str | None, str, str | None]]:
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines separate records
        where = f"{url}:{number}"
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            yield None, where, f"{where}: not a JSON line ({error})"
            continue
        if not isinstance(value, dict):
            yield None, where, f"{where}: a JSON {type(value).__name__}, not an object"
            continue
        yield json.dumps(value), where, None


def _parquet(handle: pa.NativeFile, url: str) -> Iterator[tuple[str | None, str, str | None]]:
    for number, row in enumerate(pq.read_table(handle).to_pylist(), start=1):
        # null columns are a Parquet file's way of leaving a field out (a prompt row in a file with messages)
        yield json.dumps({key: value for key, value in row.items() if value is not None}), f"{url}:row {number}", None


def _table(rows: list[tuple], file: int, ends_file: bool) -> pa.Table:
    columns = list(map(list, zip(*rows)))
    return pa.table(columns + [[file] * len(rows), [False] * (len(rows) - 1) + [ends_file]], schema=SCHEMA)


def _reader(url: str, fs: pafs.FileSystem, path: str, file: int) -> Callable[[], Iterator[pa.Table]]:
    def read() -> Iterator[pa.Table]:
        with fs.open_input_file(path) as handle:
            rows = _parquet(handle, url) if url.endswith(".parquet") else _jsonl(handle.read(), url)
            block: list[tuple] = []
            for row in rows:
                if len(block) == BLOCK_RECORDS:  # a full block, and more to come: not the file's last record
                    yield _table(block, file, ends_file=False)
                    block = []
                block.append(row)
            if block:
                yield _table(block, file, ends_file=True)
    return read


class GenerateDatasource(Datasource):
    """The input files ``urls`` in this order; one read task each."""

    def __init__(self, urls: list[str]):
        super().__init__()
        # (url, filesystem, path) pickled into the tasks: workers may lack the driver's AWS env
        self.files = [(url, *filesystem_for(url)) for url in urls]

    def estimate_inmemory_data_size(self) -> int:
        return sum(fs.get_file_info(path).size for _, fs, path in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(_reader(url, fs, path, file), BlockMetadata(None, fs.get_file_info(path).size, None, None),
                         schema=SCHEMA, per_task_row_limit=per_task_row_limit)
                for file, (url, fs, path) in enumerate(self.files)]

