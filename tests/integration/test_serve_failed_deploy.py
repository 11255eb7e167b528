"""A deploy whose replicas cannot start (the folder passes the driver's check but its config.json is
no JSON) fails with RuntimeError and takes its half-deployed app down (run_app, used by raytron serve)."""

from __future__ import annotations

import pytest
from ray import serve

from raytron.data.tokenizer import save_tokenizer, train_tokenizer
from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from tests.integration.test_serve_api import TEXTS, serve_config
from tests.servers import free_port


def test_failed_deploy_removes_its_app(ray_cluster, tmp_path):
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=280, min_frequency=1), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    config = serve_config(str(tmp_path), free_port())
    config["app_name"] = "broken"
    try:
        with pytest.raises(RuntimeError):
            run_app(build_serve_config(config))
        assert "broken" not in serve.status().applications
    finally:
        serve.shutdown()
