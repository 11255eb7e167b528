"""The model to serve and its tokenizer, from one of three sources.

- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: the exported folder of an MLflow
  registered version (downloaded through ``tracking.mlflow_run.download_model_folder``);
- a training checkpoint folder (``meta.json``): consolidated from any (dp, pp, tp) layout;
- an exported Hugging Face folder (``config.json`` with raytron's model config).

The tokenizer always comes from the same artifacts (``tokenizer.json`` beside the weights), and so
do the chat format (``tokenizer_config.json``'s ``chat_template``) and the EOS set
(``generation_config.json``'s ``eos_token_id``, one id or a list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from raytron.config import TrackingConfig
from raytron.data.tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids
from raytron.export.huggingface import load_huggingface
from raytron.model.gpt import GPT, to_decode_layout
from raytron.serve.chat_template import PARAGRAPHS, ChatFormat, chat_format, read_tokenizer_config

GENERATION_CONFIG_FILE = "generation_config.json"

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
    chat: ChatFormat = PARAGRAPHS
    """How chat messages become the prompt (the folder's own template, else the paragraphs)."""
    end_ids: frozenset[int] = field(default_factory=frozenset)
    """Every id that ends generation as EOS does: the EOS set and the chat's end-of-turn token."""


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


def model_folder(source: str, tracking_uri: str | None = None) -> Path:
    """The local folder of ``source`` (a registered version is downloaded first)."""
    if source.startswith(MODEL_URI_PREFIX):
        from raytron.tracking.mlflow_run import download_model_folder  # MLflow only for registry sources

        return Path(download_model_folder(source, tracking_cfg=TrackingConfig(tracking_uri=tracking_uri)))
    return Path(source)


def load_model(source: str, tracking_uri: str | None = None, device: str = "cpu",
               weights: Callable[[Path], GPT] | None = None) -> LoadedModel:
    """Resolve ``source`` (see the module docstring) to the model on ``device`` and its tokenizer.
    ``weights`` builds the model from the folder instead (a tensor-parallel rank's shard: kept as it is)."""
    folder = model_folder(source, tracking_uri)
    if weights is not None:
        model = weights(folder)
    elif source.startswith(MODEL_URI_PREFIX):
        model = load_huggingface(folder)
    elif (folder / "meta.json").is_file():
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
    if device == "cpu" and weights is None:  # (in, out) weights: same logits, faster small-batch decode on CPU (slower on an H100)
        model = to_decode_layout(model)
    eos = special_token_ids(tokenizer).eos
    chat = chat_format(folder, tokenizer)
    return LoadedModel(model.to(device), tokenizer, eos, str(folder), chat,
                       eos_set(folder, tokenizer, eos) | chat.end_ids)


def eos_set(folder: Path, tokenizer: Tokenizer, eos: int | None) -> frozenset[int]:
    """generation_config.json's eos_token_id (an int or a list), tokenizer_config.json's eos_token and
    the tokenizer's own EOS: a model tuned for chat often ends turns with one and texts with another."""
    ids = {eos} if eos is not None else set()
    path = folder / GENERATION_CONFIG_FILE
    if path.is_file():
        listed = json.loads(path.read_text()).get("eos_token_id")
        if listed is not None and not isinstance(listed, (int, list)):
            raise ModelSourceError(f"{path}: eos_token_id must be an int or a list of ints, not {listed!r}")
        ids |= {listed} if isinstance(listed, int) else set(listed or ())
    token = read_tokenizer_config(folder).get("eos_token")
    text = token.get("content") if isinstance(token, dict) else token
    if isinstance(text, str) and tokenizer.token_to_id(text) is not None:
        ids.add(tokenizer.token_to_id(text))
    return frozenset(ids)
