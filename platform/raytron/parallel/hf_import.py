"""``model.init_from``: the model config from the source, checks made before any worker starts, and
the weights loaded into any (pp, tp) part of the model.

The source (``parallel/init_source.py``: a folder, s3://, models:/) is a Hugging Face folder, whose
config.json decides the model, or a raytron checkpoint, whose meta.json does. The YAML may repeat
``model.*`` values; one that disagrees with the source is an error naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raytron.config import ConfigError, RaytronConfig, TrackingConfig, TrainConfig, build_config
from raytron.model.gpt import GPT
from raytron.model.hf_config import HuggingFaceConfigError, disagreements, model_fields
from raytron.model.layer_factory import LayerFactory, SerialLayers
from raytron.parallel.checkpoint_layout import META_FILE
from raytron.parallel.checkpoint_weights import check_checkpoint, checkpoint_model_fields, load_checkpoint_weights
from raytron.parallel.hf_load import LoadStats, WeightFilesError, check_shapes, load_hf_weights
from raytron.parallel.init_source import (InitSourceError, default_tokenizer, is_checkpoint, local_folder,
                                         pin_registry_version)

CONFIG_FILE = "config.json"


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise HuggingFaceConfigError(f"model.init_from: {folder} has no {CONFIG_FILE} (not a Hugging Face folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise HuggingFaceConfigError(f"{path}: not valid JSON: {error}") from None


def imported_fields(folder: str | Path, seq_len: int) -> dict[str, Any]:
    """ModelConfig fields a (local) Hugging Face folder's config.json or a checkpoint's meta.json decides."""
    if is_checkpoint(Path(folder)):
        return checkpoint_model_fields(Path(folder))
    return model_fields(read_config_json(folder), str(Path(folder) / CONFIG_FILE), seq_len)


def _described_by(folder: Path) -> str:
    return str(folder / (META_FILE if is_checkpoint(folder) else CONFIG_FILE))


def resolve_init_from(raw: dict[str, Any], source: str = "<dict>") -> RaytronConfig:
    """Build the run config from a raw mapping, its model fields filled from ``model.init_from``'s
    config.json (or meta.json) and an unset data.tokenizer from its folder (``default_tokenizer``); a
    registry alias is pinned to its version here, in the driver. Errors (ConfigError) name the
    disagreeing values or the unsupported key."""
    model = dict(raw.get("model") or {})
    if not model.get("init_from"):
        return build_config(raw, source)
    seq_len = (raw.get("train") or {}).get("seq_len", TrainConfig().seq_len)
    tracking = TrackingConfig(**{k: v for k, v in (raw.get("tracking") or {}).items() if k == "tracking_uri"})
    try:
        model["init_from"] = pin_registry_version(model["init_from"], tracking)
        folder = local_folder(model["init_from"], tracking)
        fields = imported_fields(folder, seq_len)
    except (HuggingFaceConfigError, WeightFilesError, InitSourceError) as error:
        raise ConfigError(f"invalid config {source}:\n  - {error}") from None
    problems = disagreements(model, fields, _described_by(folder))
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    data = dict(raw.get("data") or {})
    if not data.get("tokenizer") and default_tokenizer(folder):
        data["tokenizer"] = default_tokenizer(folder)
    cfg = build_config({**raw, "model": {**model, **fields}, "data": data}, source)
    check_init_from(cfg)
    return cfg


def check_init_from(cfg: RaytronConfig) -> None:
    """Before any worker starts: the config agrees with the source, and the weight files are all there
    with the shapes the source's config implies (headers only). Raises ConfigError naming file and key."""
    if cfg.model.init_from is None:
        return
    try:
        folder = local_folder(cfg.model.init_from, cfg.tracking)
        fields = imported_fields(folder, cfg.train.seq_len)
        problems = disagreements(cfg.model.model_dump(), fields, _described_by(folder))
        if problems:
            raise HuggingFaceConfigError("\n  - ".join(problems))
        if is_checkpoint(folder):
            check_checkpoint(folder, cfg.model)
        else:
            check_shapes(folder, cfg.model)
    except (HuggingFaceConfigError, WeightFilesError) as error:
        raise ConfigError(f"model.init_from: {error}") from None
    except InitSourceError as error:
        raise ConfigError(str(error)) from None


def load_init_from(named_parameters, cfg: RaytronConfig, layers: LayerFactory, tp_rank: int) -> LoadStats:
    """Overwrite this rank's parameters (serial GPT names) with their part of init_from's weights
    (fetched to this node first when remote: once per node)."""
    folder = local_folder(cfg.model.init_from, cfg.tracking)
    if is_checkpoint(folder):
        return load_checkpoint_weights(named_parameters, folder, layers.full_shape, tp_rank, layers.tp_size)
    return load_hf_weights(named_parameters, cfg.model, folder, layers.full_shape, tp_rank, layers.tp_size)


def load_huggingface_model(folder: str | Path, seq_len: int = 1, layers: LayerFactory | None = None,
                           tp_rank: int = 0) -> GPT:
    """A GPT (serial by default) holding the folder's weights, never initialised at random."""
    cfg = build_config({"model": {**imported_fields(folder, seq_len), "init_from": str(folder)},
                        "parallel": {"tp": (layers or SerialLayers()).tp_size}}).model
    layers = layers or SerialLayers()
    if layers.tp_size == 1:  # no throwaway init; TP shards keep their tp_split only when built for real
        with torch.device("meta"):
            model = GPT(cfg, layers)
        model.to_empty(device="cpu")
    else:
        model = GPT(cfg, layers)
    load_hf_weights(model.named_parameters(), cfg, folder, layers.full_shape, tp_rank, layers.tp_size)
    return model.eval()
