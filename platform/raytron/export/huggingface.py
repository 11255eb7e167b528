"""TP=1 raytron GPT <-> Hugging Face folder (`config.json` + `model.safetensors`).

``gpt`` becomes ``GPT2LMHeadModel`` and ``llama`` becomes ``LlamaForCausalLM``. The
parameter names are mapped by one table per flavour; every row says how one of our
tensors becomes one or more of theirs (fused q|k|v and gate|up are split along the
output rows; GPT-2's Conv1D keeps weights as (in, out), so those are transposed).
The folder also records our ModelConfig, so ``load_huggingface`` rebuilds the exact model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from raytron.config import ModelConfig
from raytron.model.gpt import GPT

WEIGHTS_FILE = "model.safetensors"
RAYTRON_CONFIG_KEY = "raytron_model_config"


@dataclass(frozen=True)
class Rule:
    ours: str
    """Our parameter name; ``{i}`` stands for the block index."""
    theirs: tuple[str, ...]
    """Hugging Face names; several when ours is fused (equal row chunks, in this order)."""
    transpose: bool = False
    """GPT-2 Conv1D stores weights as (in, out); ours are nn.Linear (out, in)."""


def _linear(ours: str, theirs: str, transpose: bool = False, bias: bool = True) -> tuple[Rule, ...]:
    weight = Rule(f"{ours}.weight", (f"{theirs}.weight",), transpose)
    return (weight, Rule(f"{ours}.bias", (f"{theirs}.bias",))) if bias else (weight,)


GPT2_RULES = (
    Rule("embed.tokens.weight", ("transformer.wte.weight",)),
    Rule("embed.positions.weight", ("transformer.wpe.weight",)),
    *_linear("blocks.{i}.norm1", "transformer.h.{i}.ln_1"),
    *_linear("blocks.{i}.attn.qkv", "transformer.h.{i}.attn.c_attn", transpose=True),
    *_linear("blocks.{i}.attn.proj", "transformer.h.{i}.attn.c_proj", transpose=True),
    *_linear("blocks.{i}.norm2", "transformer.h.{i}.ln_2"),
    *_linear("blocks.{i}.mlp.up", "transformer.h.{i}.mlp.c_fc", transpose=True),
    *_linear("blocks.{i}.mlp.down", "transformer.h.{i}.mlp.c_proj", transpose=True),
    *_linear("head.norm", "transformer.ln_f"),
    # lm_head is tied to wte: transformers re-ties it on load
)

LLAMA_RULES = (
    Rule("embed.tokens.weight", ("model.embed_tokens.weight",)),
    Rule("blocks.{i}.norm1.weight", ("model.layers.{i}.input_layernorm.weight",)),
    Rule("blocks.{i}.attn.qkv.weight", tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv")),
    Rule("blocks.{i}.attn.proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    Rule("blocks.{i}.norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    Rule("blocks.{i}.mlp.up.weight", ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")),
    Rule("blocks.{i}.mlp.down.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
    Rule("head.norm.weight", ("model.norm.weight",)),
    Rule("head.output.weight", ("lm_head.weight",)),
)

RULES = {"gpt": GPT2_RULES, "llama": LLAMA_RULES}


def _expanded(cfg: ModelConfig) -> list[Rule]:
    """The flavour's table with ``{i}`` filled in for every block."""
    rules = []
    for rule in RULES[cfg.flavour]:
        indices = range(cfg.num_layers) if "{i}" in rule.ours else [None]
        rules += [Rule(rule.ours.format(i=i), tuple(t.format(i=i) for t in rule.theirs), rule.transpose)
                  for i in indices]
    return rules


def to_huggingface_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    theirs = {}
    for rule in _expanded(cfg):
        tensor = state[rule.ours].detach()
        if rule.transpose:
            tensor = tensor.t()
        for name, part in zip(rule.theirs, tensor.chunk(len(rule.theirs), dim=0)):
            # own, contiguous storage: safetensors refuses views and shared memory
            theirs[name] = part.clone(memory_format=torch.contiguous_format)
    return theirs


def from_huggingface_state(theirs: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = {}
    for rule in _expanded(cfg):
        tensor = torch.cat([theirs[name] for name in rule.theirs], dim=0)
        state[rule.ours] = tensor.t().contiguous() if rule.transpose else tensor
    return state


def huggingface_config(cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype,
                       eos_token_id: int | None = None) -> dict:
    """config.json contents. The vocab is the padded one: the embedding has that many rows."""
    common = {
        "vocab_size": padded_vocab,
        "dtype": str(dtype).removeprefix("torch."),
        # without these, transformers falls back to GPT-2's 50256, outside small vocabularies;
        # as in GPT-2, the end-of-text token also opens a text
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        RAYTRON_CONFIG_KEY: cfg.model_dump(mode="json"),
    }
    if cfg.flavour == "gpt":
        return common | {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.ffn_size, "n_positions": cfg.max_position_embeddings,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_epsilon,
            # export is for inference; dropout 0 keeps train() and eval() outputs equal
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
        }
    return common | {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        # transformers 5 reads RoPE settings from rope_parameters (rope_theta alone is legacy)
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }


def export_huggingface(model: GPT | Mapping[str, torch.Tensor], out_dir: str | Path,
                       tokenizer_path: str | Path | None = None, *, cfg: ModelConfig | None = None,
                       eos_token_id: int | None = None) -> Path:
    """Write a folder `transformers` loads with AutoModelForCausalLM.from_pretrained.

    ``model`` is a TP=1 GPT, or a full (consolidated) state dict with its ``cfg``.
    ``tokenizer_path`` is a `tokenizers` tokenizer.json, copied next to the weights."""
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
    config = huggingface_config(cfg, embedding.shape[0], embedding.dtype, eos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_huggingface_state(state, cfg), out / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer_path is not None:
        _copy_tokenizer(Path(tokenizer_path), out, cfg, eos_token_id)
    return out


def _copy_tokenizer(tokenizer_path: Path, out: Path, cfg: ModelConfig, eos_token_id: int | None) -> None:
    """tokenizer.json as is, and the smallest tokenizer_config.json that lets AutoTokenizer load it."""
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings}
    if eos_token_id is not None:
        # transformers names special tokens by their text, not their id
        tokenizer_config["eos_token"] = Tokenizer.from_file(str(tokenizer_path)).id_to_token(eos_token_id)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def load_huggingface(folder: str | Path) -> GPT:
    """Rebuild the GPT from a folder written by ``export_huggingface`` (for serving)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if RAYTRON_CONFIG_KEY not in config:
        raise ValueError(f"{folder}: config.json has no '{RAYTRON_CONFIG_KEY}'; not exported by raytron")
    cfg = ModelConfig(**config[RAYTRON_CONFIG_KEY])
    state = from_huggingface_state(load_file(folder / WEIGHTS_FILE), cfg)
    with torch.device("meta"):  # no throwaway init: the loaded tensors are assigned in place
        model = GPT(cfg, padded_vocab=config["vocab_size"])
    model.load_state_dict(state, assign=True)
    return model.eval()
