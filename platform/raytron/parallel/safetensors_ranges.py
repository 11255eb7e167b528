"""Read row and column ranges of tensors in safetensors files with ``pread``, straight into tensors.

safetensors' own ``safe_open`` memory-maps the whole file: every page a slice touches (for a column
slice, the whole tensor) then counts in the process's RSS until the map is closed, and its
``get_slice`` returns a fresh tensor that must be copied again into the parameter. A sharded load
wants neither, so this reads the file's header (an 8-byte little-endian length, then JSON: dtype,
shape and data offsets per tensor, as the safetensors format specifies) and ``pread``s exactly the
bytes of a range into the caller's tensor. The page cache holds what was read; the process does not.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
HEADER_LENGTH_BYTES = 8
CHUNK_BYTES = 16 * 2**20
"""Most a temporary holds when a range cannot be read straight into its destination."""


class WeightFilesError(ValueError):
    """Weights missing from, or shaped unlike, what their files or config.json describe; names file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the tensor's first element in the file (row-major, little-endian)."""

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _header_json(path: Path) -> tuple[dict, int, int]:
    """(the header's JSON, where the data starts, the file's size)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(HEADER_LENGTH_BYTES), "little")
        if size < HEADER_LENGTH_BYTES or length > size - HEADER_LENGTH_BYTES:
            raise WeightFilesError(f"{path}: not a safetensors file (header length {length}, file {size} bytes)")
        try:
            return json.loads(file.read(length)), HEADER_LENGTH_BYTES + length, size
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise WeightFilesError(f"{path}: safetensors header is not JSON: {error}") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The header's ``__metadata__`` (string to string), {} when it has none."""
    return _header_json(path)[0].get("__metadata__") or {}


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and offset, checked against the file's size."""
    header, data_start, size = _header_json(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightFilesError(f"{path}: {name} has dtype {info.get('dtype')!r}, expected one of {sorted(DTYPES)}")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
            raise WeightFilesError(f"{path}: {name} ({info['dtype']} {list(shape)}) has data offsets "
                                         f"[{begin}, {end}), which do not fit its shape or the file's {size} bytes")
        entries[name] = TensorEntry(dtype, shape, data_start + begin)
    return entries


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory (any dtype, bfloat16 included)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):  # one call may return fewer bytes than asked (large reads, signals)
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise WeightFilesError(f"{path}: ends at byte {offset + done}, inside a tensor's data")
        done += count


class RangeReader:
    """Reads ranges of named tensors from their files; one descriptor per file, no memory map."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        """Tensor name -> the file holding it."""
        self.headers: dict[Path, dict[str, TensorEntry]] = {}
        self.descriptors: dict[Path, int] = {}
        self.bytes_read = 0

    def entry(self, name: str) -> TensorEntry:
        path = self.files[name]
        if path not in self.headers:
            self.headers[path] = read_header(path)
        if name not in self.headers[path]:
            raise WeightFilesError(f"{path}: has no tensor {name} (the index says it does)")
        return self.headers[path][name]

    def close(self) -> None:
        for fd in self.descriptors.values():
            os.close(fd)
        self.descriptors.clear()

    def read(self, name: str, rows: tuple[int, int], columns: tuple[int, int] | None, out: torch.Tensor) -> None:
        """Rows [a, b) and columns [c, d) (all when None) of a 1-D or 2-D tensor into ``out``: contiguous,
        the tensor's dtype, shape (b - a,) or (b - a, d - c)."""
        entry, path = self.entry(name), self.files[name]
        if path not in self.descriptors:
            self.descriptors[path] = os.open(path, os.O_RDONLY)
        fd, target = self.descriptors[path], _bytes_of(out)
        start = entry.offset + rows[0] * entry.row_bytes
        if columns is None or (columns[0], columns[1]) == (0, entry.shape[1]):  # one contiguous block
            _pread_into(fd, target, start, path)
        else:  # a run of bytes per row
            width = (columns[1] - columns[0]) * entry.dtype.itemsize
            skip = columns[0] * entry.dtype.itemsize
            for row in range(rows[1] - rows[0]):
                _pread_into(fd, target[row * width:(row + 1) * width], start + row * entry.row_bytes + skip, path)
        self.bytes_read += len(target)

    def read_into(self, name: str, rows: tuple[int, int], columns: tuple[int, int] | None, dest: torch.Tensor,
                  transpose: bool = False) -> None:
        """Our rows [a, b) and columns [c, d) (all when None) of tensor ``name`` into ``dest``, any dtype and
        strides: straight in when it can, else through chunks of at most CHUNK_BYTES (a cast, a strided
        ``dest``, or ``transpose``: the file holds the tensor as (in, out) where ours is (out, in))."""
        entry = self.entry(name)
        if not transpose and entry.dtype == dest.dtype and dest.is_contiguous():
            self.read(name, rows, columns, dest)  # the common case: no copy at all
            return
        # chunked along their rows
        their_rows, their_columns = ((columns or (0, entry.shape[0])), rows) if transpose else (rows, columns)
        width = () if len(entry.shape) == 1 else (entry.shape[1] if their_columns is None
                                                  else their_columns[1] - their_columns[0],)
        step = max(1, CHUNK_BYTES // (math.prod(width) * entry.dtype.itemsize))
        for first in range(their_rows[0], their_rows[1], step):
            last = min(first + step, their_rows[1])
            chunk = torch.empty((last - first, *width), dtype=entry.dtype)
            self.read(name, (first, last), their_columns, chunk)
            at = slice(first - their_rows[0], last - their_rows[0])
            if transpose:
                dest[:, at].copy_(chunk.t())
            else:
                dest[at].copy_(chunk)
