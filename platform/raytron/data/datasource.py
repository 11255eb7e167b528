"""A Ray Data source over raw corpus files: read tasks of consecutive files, blocks of records.

Each read task takes a run of consecutive files (in the sorted source order) and yields
Arrow blocks of about ``BLOCK_TEXT_BYTES`` of text with two columns: ``text`` (null for a
bad record) and ``problem`` (null for a document); SFT records add ``where`` (file:line). With ``preserve_order`` the blocks reach
the consumer in file order, whatever the read parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from raytron.data.records import read_records
from raytron.data.sft_batch import SFT_RECORD_SCHEMA
from raytron.data.sources import SourceFile
from raytron.data_config import SFT_FORMATS
from raytron.storage import filesystem_for, is_remote

# Enough text per block to amortise a block's fixed costs; small enough to keep several actors busy.
BLOCK_TEXT_BYTES = 2 << 20
# Read tasks carry at least this much input (thousands of small files must not become thousands of tasks).
MIN_TASK_BYTES = 8 << 20
RECORD_SCHEMA = pa.schema([("text", pa.string()), ("problem", pa.string())])


class CorpusDatasource(Datasource):
    def __init__(self, files: list[SourceFile], text_field: str, endpoint_url: str | None = None,
                 region: str | None = None):
        super().__init__()
        self.files = files
        self.text_field = text_field
        # built here and pickled into the read tasks: workers may lack the driver's AWS environment
        self.filesystems = {scheme: filesystem_for(url, endpoint_url, region)[0]
                            for scheme, url in (("s3", "s3://bucket"), ("local", "."))}

    def estimate_inmemory_data_size(self) -> int:
        return sum(source.size for source in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(self._reader(group), BlockMetadata(None, sum(f.size for f in group), None, None),
                         schema=block_schema(self.files), per_task_row_limit=per_task_row_limit)
                for group in self._groups(parallelism)]

    def _groups(self, parallelism: int) -> list[list[SourceFile]]:
        """Consecutive files in runs of about total/parallelism bytes (at least MIN_TASK_BYTES)."""
        target = max(MIN_TASK_BYTES, self.estimate_inmemory_data_size() // max(parallelism, 1))
        groups: list[list[SourceFile]] = [[]]
        size = 0
        for source in self.files:
            if groups[-1] and size + source.size > target:
                groups.append([])
                size = 0
            groups[-1].append(source)
            size += source.size
        return groups

    def _reader(self, group: list[SourceFile]):
        text_field, filesystems = self.text_field, self.filesystems

        def read() -> Iterator[pa.Table]:
            yield from record_blocks(group, text_field, filesystems)
        return read


def block_schema(files: list[SourceFile]) -> pa.Schema:
    """Plain documents: (text, problem); SFT records (one data.format for all files): (record, where, problem)."""
    return SFT_RECORD_SCHEMA if files and files[0].format in SFT_FORMATS else RECORD_SCHEMA


def record_blocks(files: list[SourceFile], text_field: str,
                  filesystems: dict[str, pafs.FileSystem]) -> Iterator[pa.Table]:
    schema = block_schema(files)
    text_column = schema.names[0]
    columns: dict[str, list[str | None]] = {name: [] for name in schema.names}
    size = 0
    for source in files:
        remote = is_remote(source.url)
        fs = filesystems["s3" if remote else "local"]
        path = source.url[len("s3://"):] if remote else source.url
        for record in read_records(fs, path, source.url, source.format, text_field):
            columns[text_column].append(record.text)
            columns["problem"].append(record.problem)
            if "where" in columns:
                columns["where"].append(record.where)
            size += len(record.text or "")
            if size >= BLOCK_TEXT_BYTES:
                yield pa.table(columns, schema=schema)
                columns, size = {name: [] for name in schema.names}, 0
    if columns["problem"]:
        yield pa.table(columns, schema=schema)
