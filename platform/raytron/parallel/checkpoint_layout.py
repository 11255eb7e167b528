"""Where things lie inside a raytron training checkpoint (``train/checkpoint.py`` writes it; export,
serving and ``model.init_from`` read it). Here, below train/, so that import can read weights
without reaching up."""

from __future__ import annotations

MODEL_DIR = "model"
META_FILE = "meta.json"
ENGINE_DIR = "deepspeed"
RNG_DIR = "rng"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers 5 saves a tokenizer's chat template by default (it wins over tokenizer_config.json's)."""
MODEL_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)
"""A model's files beside its weights that travel with it: from an imported Hugging Face folder into
checkpoints, from checkpoints into exports (special tokens, chat template, the EOS list)."""
TRAINING_STATE = (ENGINE_DIR, RNG_DIR)
"""Folders only ``--resume`` needs (optimizer, scheduler, RNG): importing weights skips them."""


def shard_file(pp_index: int, tp_index: int) -> str:
    """Where the (pp, tp) weight shard lives inside a checkpoint."""
    return f"{MODEL_DIR}/pp{pp_index}-tp{tp_index}.safetensors"
