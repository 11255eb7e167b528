"""Where ``model.init_from`` points, as a folder on this node.

- a local folder: as it is;
- ``s3://bucket/prefix``: fetched once per node into the node-local cache (``storage.fetch_prefix``;
  a checkpoint's optimizer and RNG folders are not fetched);
- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: a registered version's exported folder,
  downloaded once per node. The driver pins an alias to its version (``pin_registry_version``), so
  every worker loads the same one even if the alias moves meanwhile.

What the folder holds is a Hugging Face model (``config.json``) or a raytron training checkpoint
(``meta.json``, whose weights only are taken). Its tokenizer.json (and the tokenizer_config.json /
chat_template.jinja beside it) is the run's tokenizer unless data.tokenizer names another.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from raytron.config import TrackingConfig
from raytron.parallel.checkpoint_layout import META_FILE, TOKENIZER_FILE, TRAINING_STATE
from raytron.storage import StorageError, cached_folder, fetch_prefix, is_remote

REGISTRY_PREFIX = "models:/"


class InitSourceError(ValueError):
    """init_from names nothing that can be read; the message names model.init_from."""


def is_registry(init_from: str) -> bool:
    return init_from.startswith(REGISTRY_PREFIX)


def pin_registry_version(init_from: str, tracking: TrackingConfig | None = None) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (other sources unchanged); one line naming
    model.init_from and the registry URI when the registry holds no such model, alias or version."""
    if not is_registry(init_from):
        return init_from
    from mlflow.exceptions import MlflowException  # MLflow only for registry sources

    from raytron.tracking.mlflow_run import find_model_version, resolve_tracking_uri

    try:
        version = find_model_version(init_from, tracking)
    except (MlflowException, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InitSourceError(f"model.init_from: {init_from!r} is not in the registry at "
                              f"{resolve_tracking_uri(tracking)}: {reason}") from None
    return f"{REGISTRY_PREFIX}{version.name}/{version.version}"


def local_folder(init_from: str, tracking: TrackingConfig | None = None) -> Path:
    """This node's copy of what init_from names (see the module docstring)."""
    if is_registry(init_from):
        return _registry_folder(pin_registry_version(init_from, tracking), tracking)
    if is_remote(init_from):
        try:
            return fetch_prefix(init_from.rstrip("/"), skip=TRAINING_STATE)
        except StorageError as error:
            raise InitSourceError(f"model.init_from: {error}") from None
    folder = Path(init_from).expanduser()
    if not folder.is_dir():
        raise InitSourceError(f"model.init_from: {init_from!r} is no folder (nor s3://..., models:/NAME/VERSION "
                              "or models:/NAME@ALIAS)")
    return folder


def is_checkpoint(folder: Path) -> bool:
    """A raytron training checkpoint (else a Hugging Face folder)."""
    return (folder / META_FILE).is_file()


def default_tokenizer(folder: Path) -> str | None:
    """data.tokenizer when the YAML leaves it unset: init_from's folder on this node (the copy checkpoints
    take the tokenizer files from, whatever the source) when it holds a tokenizer.json, else None."""
    return str(folder) if (folder / TOKENIZER_FILE).is_file() else None


def _registry_folder(pinned: str, tracking: TrackingConfig | None) -> Path:
    from raytron.tracking.mlflow_run import download_model_folder, resolve_tracking_uri

    def fill(folder: Path) -> None:
        # the version's artifacts hold the Hugging Face folder one level down: keep only that
        with tempfile.TemporaryDirectory(dir=folder.parent) as download:
            exported = download_model_folder(pinned, download, tracking)
            for item in exported.iterdir():
                shutil.move(str(item), folder / item.name)

    # a version number never changes what it names; the registry URI tells two registries apart
    return cached_folder(f"{resolve_tracking_uri(tracking)} {pinned}", fill)
