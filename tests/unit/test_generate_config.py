"""`raytron generate`'s config: its decode batch defaults above serving's, and a bad one is refused
naming the field."""

from __future__ import annotations

import pytest
import yaml

from raytron.config import ConfigError
from raytron.serve.batch_generate import GENERATE_BATCH, load_generate_config
from raytron.serve.settings import Limits


def write(tmp_path, **extra):
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "models:/m/1"}, "input": "in", "output": "out", **extra}))
    return path


def test_generate_decodes_a_larger_batch_than_serving_by_default(tmp_path):
    cfg = load_generate_config(write(tmp_path))
    assert cfg.limits.max_batch_size == GENERATE_BATCH > Limits().max_batch_size
    assert load_generate_config(write(tmp_path), ["limits.max_batch_size=8"]).limits.max_batch_size == 8


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_a_bad_decode_batch_is_refused_naming_the_field(tmp_path, value):
    with pytest.raises(ConfigError, match=rf"limits\.max_batch_size: .*\(got {value!r}\)"):
        load_generate_config(write(tmp_path, limits={"max_batch_size": value}))
