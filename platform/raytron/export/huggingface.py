"""TP=1 raytron GPT <-> Hugging Face folder (`config.json` + `model.safetensors`).

``gpt`` becomes ``GPT2LMHeadModel``, ``llama`` ``LlamaForCausalLM`` (or the class an imported
model came from: ``model.hf_architecture``). Names and shapes follow the one table in
``raytron.model.hf_mapping``, config.json ``raytron.model.hf_config``; padded vocabulary rows
are cut. The folder also records our ModelConfig, so ``load_huggingface`` rebuilds the exact model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from raytron.config import ModelConfig
from raytron.model.gpt import GPT
from raytron.model.hf_config import RAYTRON_CONFIG_KEY, huggingface_config
from raytron.model.hf_mapping import from_huggingface_state, to_huggingface_state
from raytron.parallel.checkpoint_layout import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE

WEIGHTS_FILE = "model.safetensors"


def export_huggingface(model: GPT | Mapping[str, torch.Tensor], out_dir: str | Path,
                       tokenizer_path: str | Path | None = None, *, cfg: ModelConfig | None = None,
                       eos_token_id: int | None = None, model_files: str | Path | None = None) -> Path:
    """Write a folder `transformers` loads with AutoModelForCausalLM.from_pretrained.

    ``model`` is a TP=1 GPT, or a full (consolidated) state dict with its ``cfg``.
    ``tokenizer_path`` is a `tokenizers` tokenizer.json, copied next to the weights.
    ``model_files`` is a folder whose tokenizer_config.json and generation_config.json (an imported
    model's, carried by a checkpoint) are copied as they are; default: a local ``cfg.init_from``."""
    if isinstance(model, GPT):
        if model.layers.tp_size != 1:
            raise ValueError(f"model: export needs a TP=1 model, got tp={model.layers.tp_size}; "
                             "gather a full state dict first")
        cfg, state = model.cfg, model.state_dict()
    elif cfg is None:
        raise ValueError("cfg: required when exporting a state dict")
    else:
        state = model
    embedding = state["embed.tokens.weight"]  # (V_pad, h)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = huggingface_config(cfg, embedding.dtype, eos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_huggingface_state(state, cfg), out / WEIGHTS_FILE, metadata={"format": "pt"})
    if model_files is None and cfg.init_from and Path(cfg.init_from).is_dir():
        model_files = cfg.init_from
    # An imported model's files go with it: its tokenizer_config.json holds the special and added tokens
    # and the chat template (or chat_template.jinja does); generation_config.json's eos_token_id may be a list (Llama-3-Instruct's end
    # of text and end of turn), and generation must stop on every one.
    source = Path(model_files) if model_files is not None else None
    for name in (GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
        if not (out / TOKENIZER_CONFIG_FILE).is_file():
            _write_tokenizer_config(Path(tokenizer_path), out, cfg, eos_token_id)
    return out


def _write_tokenizer_config(tokenizer_path: Path, out: Path, cfg: ModelConfig, eos_token_id: int | None) -> None:
    """The smallest tokenizer_config.json that lets AutoTokenizer load tokenizer.json."""
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings}
    if eos_token_id is not None:
        # transformers names special tokens by their text, not their id
        tokenizer_config["eos_token"] = Tokenizer.from_file(str(tokenizer_path)).id_to_token(eos_token_id)
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def load_huggingface(folder: str | Path) -> GPT:
    """Rebuild the GPT from a folder written by ``export_huggingface`` (for serving)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if RAYTRON_CONFIG_KEY not in config:
        raise ValueError(f"{folder}: config.json has no '{RAYTRON_CONFIG_KEY}'; not exported by raytron")
    cfg = ModelConfig(**config[RAYTRON_CONFIG_KEY])
    # earlier exports kept the padded rows: their vocab_size is the padded one
    padded_vocab = max(cfg.padded_vocab(1), config["vocab_size"])
    state = from_huggingface_state(load_file(folder / WEIGHTS_FILE), cfg, padded_vocab)
    with torch.device("meta"):  # no throwaway init: the loaded tensors are assigned in place
        model = GPT(cfg, padded_vocab=padded_vocab)
    model.load_state_dict(state, assign=True)
    return model.eval()
