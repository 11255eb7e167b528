"""Storage URLs: a local path or s3://bucket/prefix, opened with pyarrow's filesystems.

S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so the
same URL works against AWS and any S3-protocol server (MinIO, Ceph, R2, moto).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(RuntimeError):
    pass


def is_remote(url: str) -> bool:
    return urlparse(url).scheme == "s3"


def filesystem_for(url: str, endpoint_url: str | None = None,
                   region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URL; local paths are made absolute.

    ``endpoint_url`` / ``region`` override the AWS environment (config-given S3 servers).
    """
    if not is_remote(url):
        return pafs.LocalFileSystem(), str(Path(url).expanduser().absolute())
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    parsed = urlparse(endpoint) if endpoint else None
    fs = pafs.S3FileSystem(
        # explicit keys travel with the pickled filesystem to Ray workers started without them
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"), secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        endpoint_override=parsed.netloc if parsed else None,
        scheme=parsed.scheme if parsed else "https",
        region=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        # fail in seconds, not minutes, when the endpoint is down
        connect_timeout=5, request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
    bucket_and_key = url[len("s3://"):].rstrip("/")
    return fs, bucket_and_key


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(url: str, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    fs, path = filesystem_for(url, endpoint_url, region)
    try:
        with fs.open_input_stream(path, compression=None) as stream:  # the bytes as stored, even for .gz
            return stream.read()
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot read {url}: {error}") from None


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None, region: str | None = None) -> None:
    fs, path = filesystem_for(url, endpoint_url, region)
    try:
        fs.create_dir(str(Path(path).parent), recursive=True)
        with fs.open_output_stream(path, compression=None) as stream:  # pyarrow would gzip a .gz path again
            stream.write(data)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot write {url}: {error}") from None


def delete(url: str, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Remove a file or a whole folder; nothing there is fine."""
    fs, path = filesystem_for(url, endpoint_url, region)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot delete {url}: {error}") from None


def check_writable(url: str) -> None:
    """Write and delete a probe object so a bad storage path fails at start, naming the URL."""
    fs, path = filesystem_for(url)
    probe = f"{path}/.raytron-write-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"storage path {url} is not writable: {error}") from None


def list_dirs(url: str) -> list[str]:
    """Names of the folders directly under a URL (empty when it does not exist)."""
    fs, path = filesystem_for(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"cannot list {url}: {error}") from None
    return sorted(Path(info.path).name for info in infos if info.type == pafs.FileType.Directory)


def checkpoint_url(storage: str, path_inside: str) -> str:
    """A Ray checkpoint's path (inside its filesystem) back as a URL of the same kind as ``storage``."""
    return f"s3://{path_inside}" if is_remote(storage) else path_inside


def cache_root() -> Path:
    """Node-local cache of fetched folders: $RAYTRON_CACHE_DIR, else ~/.cache/raytron."""
    return Path(os.environ.get("RAYTRON_CACHE_DIR") or Path.home() / ".cache" / "raytron").expanduser()


def cached_folder(key: str, fill: Callable[[Path], None]) -> Path:
    """The cache's folder for ``key``, filled once per node: of all processes asking at once, the one
    that holds the lock runs ``fill(empty folder)`` and renames it into place (atomic), the others
    wait for the lock and find it there. A failed fill leaves nothing behind."""
    folder = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:32]
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not folder.is_dir():
            partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.partial-"))
            try:
                fill(partial)
                partial.rename(folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return folder


def _listing(url: str, skip: tuple[str, ...]) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """Every file under a prefix but those in its top-level folders ``skip``; StorageError if none."""
    fs, root = filesystem_for(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot list {url}: {error}") from None
    files = [info for info in infos if info.type == pafs.FileType.File
             and info.path[len(root) + 1:].split("/")[0] not in skip]
    if not files:
        raise StorageError(f"{url}: no files there")
    return fs, root, sorted(files, key=lambda info: info.path)


def fetch_prefix(url: str, skip: tuple[str, ...] = ()) -> Path:
    """An s3:// prefix's files (not those under its top-level folders ``skip``) as a node-local folder,
    downloaded once per node. The cache key is the URL and each file's path, size and mtime: a
    prefix whose files changed is fetched again."""
    fs, root, files = _listing(url, skip)
    key = json.dumps([url] + [(info.path, info.size, str(info.mtime)) for info in files])

    def fill(folder: Path) -> None:
        for info in files:
            destination = folder / info.path[len(root) + 1:]
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                pafs.copy_files(info.path, str(destination), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            except (OSError, pa.ArrowException) as error:
                raise StorageError(f"cannot fetch s3://{info.path}: {error}") from None

    return cached_folder(key, fill)
