"""The model to serve and its tokenizer, from one of three sources.

- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: the exported folder of an MLflow
  registered version (downloaded through ``tracking.mlflow_run.download_model_folder``);
- a training checkpoint folder (``meta.json``): consolidated from any (dp, pp, tp) layout;
- an exported Hugging Face folder (``config.json`` with raytron's model config).

The tokenizer always comes from the same artifacts (``tokenizer.json`` beside the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from raytron.config import TrackingConfig
from raytron.data.tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids
from raytron.export.huggingface import load_huggingface
from raytron.model.gpt import GPT, to_decode_layout

MODEL_URI_PREFIX = "models:/"


class ModelSourceError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: GPT
    """TP=1 GPT in eval mode (in the decode layout on CPU)."""
    tokenizer: Tokenizer
    eos_id: int | None
    """End-of-text id (generation stops there); None when the tokenizer has no such token."""
    origin: str
    """Where it was read from: the local folder (after any download)."""


def check_source(source: str, tracking_uri: str | None = None) -> None:
    """Fail fast, in the driver, before any replica starts: ModelSourceError (one line naming
    ``model.source``, and the registry URI for models:/) when ``source`` names no registered model,
    alias or version, or no folder holding a model and its tokenizer."""
    if source.startswith(MODEL_URI_PREFIX):
        from mlflow.exceptions import MlflowException

        from raytron.tracking.mlflow_run import find_model_version, resolve_tracking_uri

        tracking = TrackingConfig(tracking_uri=tracking_uri)
        try:
            find_model_version(source, tracking)
        except (MlflowException, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelSourceError(f"model.source: {source!r} is not in the registry at "
                                   f"{resolve_tracking_uri(tracking)}: {reason}") from None
        return
    folder = Path(source)
    if not folder.is_dir():
        raise ModelSourceError(f"model.source: {source!r} is no folder (and not models:/NAME/VERSION or "
                               "models:/NAME@ALIAS)")
    if not ((folder / "meta.json").is_file() or (folder / "config.json").is_file()):
        raise ModelSourceError(f"model.source: {source!r} is neither a training checkpoint folder (meta.json) nor "
                               "an exported folder (config.json)")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ModelSourceError(f"model.source: {source!r} has no {TOKENIZER_FILE} beside the weights")


def load_model(source: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """Resolve ``source`` (see the module docstring) to the model on ``device`` and its tokenizer."""
    if source.startswith(MODEL_URI_PREFIX):
        from raytron.tracking.mlflow_run import download_model_folder  # MLflow only for registry sources

        folder = download_model_folder(source, tracking_cfg=TrackingConfig(tracking_uri=tracking_uri))
        model = load_huggingface(folder)
    else:
        folder = Path(source)
        if (folder / "meta.json").is_file():
            from raytron.export.consolidate import consolidate_checkpoint

            model = consolidate_checkpoint(folder).new_model()
        elif (folder / "config.json").is_file():
            model = load_huggingface(folder)
        else:
            raise ModelSourceError(f"model.source: {source!r} is neither models:/NAME/VERSION, models:/NAME@ALIAS, "
                                   "a training checkpoint folder (meta.json) nor an exported folder (config.json)")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ModelSourceError(f"model.source: {source!r} has no {TOKENIZER_FILE} beside the weights")
    tokenizer = load_tokenizer(folder)
    if device == "cpu":  # (in, out) weights: same logits, faster small-batch decode on CPU (slower on an H100)
        model = to_decode_layout(model)
    return LoadedModel(model.to(device), tokenizer, special_token_ids(tokenizer).eos, str(folder))
