"""``model.init_from: <Hugging Face folder>``: the model config from its config.json, checks made
before any worker starts, and the weights loaded into any (pp, tp) part of the model.

The YAML may repeat ``model.*`` values; one that disagrees with config.json is an error naming
both. Everything the folder's config.json decides comes from there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raytron.config import ConfigError, RaytronConfig, TrainConfig, build_config
from raytron.model.gpt import GPT
from raytron.model.hf_config import HuggingFaceConfigError, disagreements, model_fields
from raytron.model.layer_factory import LayerFactory, SerialLayers
from raytron.parallel.hf_load import LoadStats, WeightFilesError, check_shapes, load_hf_weights

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
    """ModelConfig fields the folder's config.json decides."""
    return model_fields(read_config_json(folder), str(Path(folder) / CONFIG_FILE), seq_len)


def resolve_init_from(raw: dict[str, Any], source: str = "<dict>") -> RaytronConfig:
    """Build the run config from a raw mapping, its model fields filled from ``model.init_from``'s
    config.json; errors (ConfigError) name the disagreeing values or the unsupported key."""
    model = dict(raw.get("model") or {})
    folder = model.get("init_from")
    if not folder:
        return build_config(raw, source)
    seq_len = (raw.get("train") or {}).get("seq_len", TrainConfig().seq_len)
    try:
        fields = imported_fields(folder, seq_len)
    except HuggingFaceConfigError as error:
        raise ConfigError(f"invalid config {source}:\n  - {error}") from None
    problems = disagreements(model, fields, str(Path(folder) / CONFIG_FILE))
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    cfg = build_config({**raw, "model": {**model, **fields}}, source)
    check_init_from(cfg)
    return cfg


def check_init_from(cfg: RaytronConfig) -> None:
    """Before any worker starts: the config agrees with the folder, and the weight files are all there
    with the shapes config.json implies (headers only). Raises ConfigError naming file and key."""
    folder = cfg.model.init_from
    if folder is None:
        return
    try:
        fields = imported_fields(folder, cfg.train.seq_len)
        problems = disagreements(cfg.model.model_dump(), fields, str(Path(folder) / CONFIG_FILE))
        if problems:
            raise HuggingFaceConfigError("\n  - ".join(problems))
        check_shapes(Path(folder), cfg.model)
    except (HuggingFaceConfigError, WeightFilesError) as error:
        raise ConfigError(f"model.init_from: {error}") from None


def load_init_from(named_parameters, cfg: RaytronConfig, layers: LayerFactory, tp_rank: int) -> LoadStats:
    """Overwrite this rank's parameters (serial GPT names) with their part of init_from's weights."""
    return load_hf_weights(named_parameters, cfg.model, cfg.model.init_from, layers.full_shape, tp_rank,
                           layers.tp_size)


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
