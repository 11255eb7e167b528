"""Hugging Face ``config.json`` <-> our ModelConfig, both directions in one place.

Import reads the four architectures we can compute exactly and refuses, naming the key, every
option that would make our model compute something else (MoE, sliding windows shorter than the
training sequence, other activations or RoPE types). Export writes the class the weights came
from (``model.hf_architecture``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from raytron.config import ModelConfig, RopeScaling

ARCHITECTURES = {"GPT2LMHeadModel": "gpt", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "llama"}
MODEL_TYPES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2"}
MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts")
RAYTRON_CONFIG_KEY = "raytron_model_config"


class HuggingFaceConfigError(ValueError):
    """A config.json we cannot import; the message names the file and the key."""


def _refuse(where: str, key: str, value: Any, why: str) -> HuggingFaceConfigError:
    return HuggingFaceConfigError(f"{where}: {key} = {value!r} is not supported: {why}")


def architecture_of(config: dict, where: str) -> str:
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise _refuse(where, "architectures", names, f"expected one of {', '.join(ARCHITECTURES)}")
    return names[0]


def _rope_scaling(config: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5's rope_parameters or the legacy rope_theta/rope_scaling."""
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    params = config.get(key) or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise _refuse(where, f"{key}.rope_type", kind, "raytron implements default, linear and llama3")
    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    try:
        return theta, RopeScaling(type=kind, **{name: params[name] for name in names if name in params})
    except ValidationError as error:
        raise HuggingFaceConfigError(f"{where}: {key}: {error}") from None


def _refuse_variants(config: dict, where: str, seq_len: int) -> None:
    for key in MOE_KEYS:
        if config.get(key):
            raise _refuse(where, key, config[key], "mixture-of-experts models cannot be imported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(where, "partial_rotary_factor", config["partial_rotary_factor"], "RoPE covers whole heads here")
    window = config.get("sliding_window")
    sliding = config.get("use_sliding_window", True) and window is not None
    if sliding and window < seq_len:
        raise _refuse(where, "sliding_window", window, f"shorter than train.seq_len ({seq_len}); raytron attends "
                      "to the whole sequence, so it would compute another model")
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if layer_types - {"full_attention"} and sliding:
        raise _refuse(where, "layer_types", sorted(layer_types), "only full_attention layers are supported")


def _gpt2_fields(config: dict, where: str) -> dict[str, Any]:
    expected = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)}
    for key, allowed in expected.items():
        if config.get(key, allowed[0]) not in allowed:
            raise _refuse(where, key, config[key], f"expected {' or '.join(map(repr, allowed))}")
    hidden = config["n_embd"]
    return {"flavour": "gpt", "hidden_size": hidden, "num_layers": config["n_layer"], "num_heads": config["n_head"],
            "ffn_hidden_size": config.get("n_inner") or 4 * hidden, "max_position_embeddings": config["n_positions"],
            "norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": config.get("tie_word_embeddings", True)}


def _llama_fields(config: dict, where: str, architecture: str) -> dict[str, Any]:
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", config["hidden_act"], "the gated MLP here uses silu")
    for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias also biases o_proj
        if config.get(key):
            raise _refuse(where, key, config[key], "only Qwen2's q/k/v biases are supported")
    theta, scaling = _rope_scaling(config, where)
    heads = config["num_attention_heads"]
    return {"flavour": "llama", "hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
            "num_heads": heads, "num_kv_heads": config.get("num_key_value_heads") or heads,
            "head_size": config.get("head_dim") or config["hidden_size"] // heads,
            "ffn_hidden_size": config["intermediate_size"],
            "max_position_embeddings": config["max_position_embeddings"],
            "norm_epsilon": config.get("rms_norm_eps", 1e-6), "rope_theta": theta, "rope_scaling": scaling,
            "qkv_bias": architecture == "Qwen2ForCausalLM",
            "tie_embeddings": config.get("tie_word_embeddings", False)}


def model_fields(config: dict, where: str, seq_len: int) -> dict[str, Any]:
    """ModelConfig fields of a Hugging Face config.json (``where`` names it in errors)."""
    architecture = architecture_of(config, where)
    _refuse_variants(config, where, seq_len)
    try:
        fields = (_gpt2_fields(config, where) if ARCHITECTURES[architecture] == "gpt"
                  else _llama_fields(config, where, architecture))
    except KeyError as error:
        raise HuggingFaceConfigError(f"{where}: missing key {error.args[0]} (needed for {architecture})") from None
    return fields | {"vocab_size": config["vocab_size"], "hf_architecture": architecture}


def disagreements(given: dict[str, Any], imported: dict[str, Any], where: str) -> list[str]:
    """Fields the YAML gives that differ from what ``where`` says, compared as validated values."""
    problems = []
    for key, value in imported.items():
        if key not in given:
            continue
        try:
            ours = getattr(ModelConfig.model_validate({key: given[key]}), key)
        except ValidationError:
            continue  # build_config reports the bad value itself
        theirs = getattr(ModelConfig.model_validate({key: value}), key)
        if ours != theirs:
            problems.append(f"model.{key}: {given[key]!r} in the config, but {where} says {value!r}")
    return problems


def export_architecture(cfg: ModelConfig) -> str:
    if cfg.hf_architecture is not None:
        return cfg.hf_architecture
    if cfg.flavour == "gpt":
        return "GPT2LMHeadModel"
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = cfg.rope_scaling.model_dump()
    kind = scaling.pop("type")
    if kind == "linear":
        scaling = {"factor": scaling["factor"]}
    return {"rope_type": kind, "rope_theta": cfg.rope_theta, **scaling}


def huggingface_config(cfg: ModelConfig, dtype: torch.dtype, eos_token_id: int | list[int] | None = None,
                       bos_token_id: int | None = None) -> dict:
    """config.json contents; vocab_size is the true vocabulary (padded rows are cut on export)."""
    architecture = export_architecture(cfg)
    first_eos = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    common = {
        "architectures": [architecture], "model_type": MODEL_TYPES[architecture],
        "vocab_size": cfg.vocab_size, "dtype": str(dtype).removeprefix("torch."),
        # without these, transformers falls back to GPT-2's 50256, outside small vocabularies;
        # as in GPT-2, the end-of-text token also opens a text unless the tokenizer says otherwise
        "bos_token_id": first_eos if bos_token_id is None else bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": cfg.tied,
        RAYTRON_CONFIG_KEY: cfg.model_dump(mode="json"),
    }
    if cfg.flavour == "gpt":
        return common | {
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.ffn_size, "n_positions": cfg.max_position_embeddings,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_epsilon,
            # export is for inference; dropout 0 keeps train() and eval() outputs equal
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }
    llama = common | {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        # transformers 5 reads RoPE settings from rope_parameters (rope_theta alone is legacy)
        "rope_parameters": _rope_parameters(cfg), "attention_dropout": 0.0,
    }
    if architecture == "LlamaForCausalLM":
        return llama | {"attention_bias": False, "mlp_bias": False}
    # Mistral and Qwen2: full attention, as trained here
    return llama | {"sliding_window": None, "use_sliding_window": False}
