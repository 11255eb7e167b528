"""Strict config: every shipped YAML loads, bad files fail naming the field, the CLI prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytron.config import ConfigError, ModelConfig, load_config, schema_rows

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs" / "configs"
TINY = CONFIGS / "tiny_smoke.yaml"
REAL_CONFIGS = ("tiny_smoke", "tiny_llama_smoke", "gpt_1p3b", "mtnlg_530b")


def test_shipped_configs_exist_with_smoke_twins():
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert set(REAL_CONFIGS) <= names
    real = {name for name in names if not name.endswith("smoke")}
    assert {f"{name}_smoke" for name in real} <= names, "every real config needs a _smoke twin"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    if path.stem.endswith("smoke"):
        assert cfg.resources.gpus_per_worker == 0, "smoke configs run on CPU"


# (what is wrong, YAML text or None for tiny_smoke.yaml, --set overrides, what the message must contain)
BAD_CONFIGS = [
    ("unknown top-level key", "modle: {}\n", [], ["modle: unknown key", "allowed:", "model", "parallel"]),
    ("unknown nested key", "model: {hiden_size: 64}\n", [], ["model.hiden_size: unknown key", "hidden_size"]),
    ("wrong type", "model: {hidden_size: big}\n", [], ["model.hidden_size", "'big'"]),
    ("wrong type of section", "train: 3\n", [], ["train"]),
    ("hidden not divisible by heads", "model: {hidden_size: 66, num_heads: 4}\n", [], ["model.hidden_size: 66"]),
    ("heads not divisible by tp", "model: {num_heads: 4}\nparallel: {tp: 3}\n", [], ["model.num_heads: 4"]),
    ("layers not divisible by pp", "model: {num_layers: 3}\nparallel: {pp: 2, zero_stage: 1}\n", [],
     ["model.num_layers: 3"]),
    ("seq_len above position table", "model: {max_position_embeddings: 64}\ntrain: {seq_len: 65}\n", [],
     ["train.seq_len: 65"]),
    ("workers != dp*pp*tp", "parallel: {dp: 2}\nresources: {num_workers: 3}\n", [], ["resources.num_workers: 3"]),
    ("zero size", "model: {hidden_size: 0}\n", [], ["model.hidden_size", "greater than 0"]),
    ("negative size", "model: {num_layers: -2}\n", [], ["model.num_layers", "greater than 0"]),
    ("zero parallel degree", "parallel: {tp: 0}\n", [], ["parallel.tp", "greater than 0"]),
    ("zero steps", "train: {steps: 0}\n", [], ["train.steps", "greater than 0"]),
    ("zero stage 2 with pp", "model: {num_layers: 2}\nparallel: {pp: 2, zero_stage: 2}\n", [],
     ["parallel.zero_stage: 2"]),
    ("fp16 on CPU", "train: {precision: fp16}\nresources: {gpus_per_worker: 0}\n", [], ["train.precision"]),
    ("unknown precision", "train: {precision: fp8}\n", [], ["train.precision", "'fp32'", "'bf16'"]),
    ("malformed YAML", "model: {hidden_size: 64\n", [], ["not valid YAML", "line"]),
    ("top level not a mapping", "- model\n- train\n", [], ["top level must be a mapping", "list"]),
    ("--set unknown key", None, ["model.hiden=3"], ["model.hiden: unknown key", "hidden_size"]),
    ("--set bad value", None, ["parallel.tp=two"], ["parallel.tp", "'two'"]),
    ("--set without =", None, ["model.hidden_size"], ["model.hidden_size", "KEY.PATH=VALUE"]),
    ("--set into a scalar", None, ["name.first=x"], ["name is not a section"]),
]


@pytest.mark.parametrize("text, overrides, expected", [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_names_the_field(tmp_path, text, overrides, expected):
    path = TINY
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    for fragment in expected:
        assert fragment in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {hidden_size: 66, num_layers: 3}\nparallel: {pp: 2}\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "model.hidden_size" in message and "model.num_layers" in message


def test_set_overrides_apply_parsed_values():
    cfg = load_config(TINY, ["model.hidden_size=128", "train.betas=[0.8, 0.9]", "train.activation_checkpointing=true"])
    assert cfg.model.hidden_size == 128
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.activation_checkpointing is True
    assert cfg.model.num_layers == 2, "fields not overridden keep the file's value"


def test_defaults_load_without_a_file():
    assert load_config().world_size == 1


@pytest.mark.parametrize("vocab, tp, padded", [(50257, 1, 50304), (50257, 2, 50432), (50257, 8, 51200),
                                               (4096, 2, 4096), (1, 1, 128)])
def test_vocab_padding(vocab, tp, padded):
    assert ModelConfig(vocab_size=vocab).padded_vocab(tp) == padded


def test_every_schema_row_has_type_default_and_doc():
    rows = schema_rows()
    paths = [row[0] for row in rows]
    assert "model.hidden_size" in paths and "parallel.zero_stage" in paths and "train.seq_len" in paths
    for path, type_name, default, doc in rows:
        assert type_name and default and doc.strip(), path
    flavour = next(row for row in rows if row[0] == "model.flavour")
    assert "'llama'" in flavour[1], "Literal choices are shown"


def raytron(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytron.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_cli_schema_lists_every_field():
    result = raytron("config", "--schema")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FIELD", "TYPE", "DEFAULT", "DOC"]
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == {row[0] for row in schema_rows()}


def test_cli_config_prints_a_loadable_resolved_config_and_derived_values():
    result = raytron("config", str(TINY), "--set", "model.vocab_size=50257")
    assert result.returncode == 0, result.stderr
    expected = load_config(TINY, ["model.vocab_size=50257"])
    assert yaml.safe_load(result.stdout) == expected.to_dict()
    for derived in ("padded_vocab_size: 50304", "world_size: 1", "ffn_size: 256", f"config_digest: {expected.digest()}"):
        assert derived in result.stdout


def test_cli_info_prints_parameters_flops_and_memory():
    result = raytron("info", str(CONFIGS / "mtnlg_530b_smoke.yaml"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"parameters", "flops_per_token", "memory_per_rank_bytes", "memory_breakdown",
            "padded_vocab_size", "world_size"} <= info.keys()
    assert info["world_size"] == 4
    assert info["parameters"] > info["memory_breakdown"]["parameters_per_rank"] > 0, "tp x pp split the model"


def test_cli_bad_config_exits_2_naming_the_field():
    result = raytron("info", str(TINY), "--set", "parallel.tp=3")
    assert result.returncode == 2
    assert "model.num_heads" in result.stderr
    assert result.stdout == ""
