"""Bad model.init_from input fails at config time (before Ray or any worker), naming the file and key."""

from __future__ import annotations

import json

import pytest

from raytron.config import ConfigError
from raytron.data.tokenizer import save_tokenizer, train_tokenizer
from raytron.data.tokenizer_source import load_configured
from raytron.parallel.hf_import import check_init_from, resolve_init_from
from raytron.parallel.hf_load import INDEX_FILE
from tests.hf_models import VOCAB, save_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_tiny("llama-untied", folder)
    return folder


def copy_with(source, target, **config_changes):
    """A copy of a Hugging Face folder (weights linked) with config.json keys changed (None deletes)."""
    target.mkdir()
    for path in source.iterdir():
        if path.name != "config.json":
            (target / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def resolve(folder, **model):
    return resolve_init_from({"model": {"init_from": str(folder), **model}, "train": {"seq_len": 64}}, "run.yaml")


def test_good_folder_resolves(llama):
    cfg = resolve(llama, flavour="llama", num_kv_heads=2)  # values that agree may be repeated
    assert (cfg.model.num_heads, cfg.model.kv_heads, cfg.model.ffn_size, cfg.model.vocab_size) == (4, 2, 96, VOCAB)


def test_disagreeing_yaml_value_names_both(llama):
    with pytest.raises(ConfigError, match=r"model.hidden_size: 32 in the config, but .*config.json says 64"):
        resolve(llama, hidden_size=32)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["FalconForCausalLM"]}, r"architectures = \['FalconForCausalLM'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"rope_parameters.rope_type = 'yarn'"),
    ({"num_local_experts": 8}, r"num_local_experts = 8 .*mixture-of-experts"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu'"),
    ({"attention_bias": True}, r"attention_bias = True"),
    ({"sliding_window": 16}, r"sliding_window = 16 .*shorter than train.seq_len \(64\)"),
])
def test_unsupported_option_names_the_key(llama, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve(copy_with(llama, tmp_path / "changed", **change))
    assert "config.json" in str(error.value)


def test_missing_weight_file_is_named(llama, tmp_path):
    folder = copy_with(llama, tmp_path / "missing")
    shard = sorted(set(json.loads((llama / INDEX_FILE).read_text())["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(ConfigError, match=rf"{INDEX_FILE} lists {shard}, which do not exist"):
        resolve(folder)


def test_no_weights_at_all_is_named(llama, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        resolve(folder)


def test_shapes_disagreeing_with_config_json_are_named(llama, tmp_path):
    folder = copy_with(llama, tmp_path / "wider", intermediate_size=128)
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight in model-\d+-of-\d+.safetensors: "
                                          r"shape \(96, 64\), config.json implies \(128, 64\)"):
        resolve(folder)


def test_tp_must_divide_kv_heads(llama):
    with pytest.raises(ConfigError, match=r"model.num_kv_heads: 2 must be divisible by parallel.tp \(4\)"):
        resolve_init_from({"model": {"init_from": str(llama)}, "parallel": {"tp": 4}}, "run.yaml")


def test_check_init_from_catches_a_config_built_without_the_folder(llama):
    from raytron.config import build_config

    cfg = build_config({"model": {"init_from": str(llama), "flavour": "llama"}})  # defaults, not the folder's
    with pytest.raises(ConfigError, match="model.hidden_size: 256 in the config, but .* says 64"):
        check_init_from(cfg)


def test_tokenizer_larger_than_the_embedding_is_refused(llama, tmp_path):
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=VOCAB)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB + 10 - tokenizer.get_vocab_size())])
    path = save_tokenizer(tokenizer, tmp_path / "tokenizer")
    cfg = resolve_init_from({"model": {"init_from": str(llama)}, "data": {"tokenizer": str(path)}}, "run.yaml")
    with pytest.raises(ConfigError, match=rf"data.tokenizer: .* has {VOCAB + 10} tokens, more than the embedding"):
        load_configured(cfg)
    smaller = save_tokenizer(train_tokenizer(["a b c d"] * 5, vocab_size=100), tmp_path / "small")
    cfg = resolve_init_from({"model": {"init_from": str(llama)}, "data": {"tokenizer": str(smaller)}}, "run.yaml")
    assert load_configured(cfg).vocab_size < VOCAB  # a smaller tokenizer is fine
