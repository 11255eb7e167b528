"""The records of one ``raytron generate`` input file as a Ray Data source, each named by where it is.

A read task reads its file (JSONL or Parquet) and yields Arrow blocks of three columns: ``record``
(the record as JSON text; null for a bad one), ``where`` (``<url>:<line>``, Parquet ``<url>:row
<n>``) and ``problem`` (null, or ``<where>: <what>`` for a line that is not a JSON object). Readers
never raise for bad content: the worker applies ``on_bad_record``, so the first problem reported
is the first in file order. With ``preserve_order`` blocks arrive in file order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from raytron.storage import filesystem_for

# Records per block: a block is one map_batches call's worth of prompts for an engine or two.
BLOCK_RECORDS = 256
SCHEMA = pa.schema([("record", pa.string()), ("where", pa.string()), ("problem", pa.string())])


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


def _table(rows: list[tuple]) -> pa.Table:
    return pa.table(list(map(list, zip(*rows))), schema=SCHEMA)


class GenerateDatasource(Datasource):
    """One input file (``url``); one read task."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.fs, self.path = filesystem_for(url)  # pickled into the task: workers may lack the driver's AWS env

    def estimate_inmemory_data_size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        url, fs, path = self.url, self.fs, self.path

        def read() -> Iterator[pa.Table]:
            with fs.open_input_file(path) as handle:
                rows = _parquet(handle, url) if url.endswith(".parquet") else _jsonl(handle.read(), url)
                block: list[tuple] = []
                for row in rows:
                    block.append(row)
                    if len(block) == BLOCK_RECORDS:
                        yield _table(block)
                        block = []
                if block:
                    yield _table(block)

        size = self.estimate_inmemory_data_size()
        return [ReadTask(read, BlockMetadata(None, size, None, None), schema=SCHEMA,
                         per_task_row_limit=per_task_row_limit)]

