"""Serving models:/NAME@ALIAS from a real `mlflow server`: a tiny model registered through the
export code path (Hugging Face folder -> MLflow model version -> alias), then served over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest
import ray
import yaml
from ray import serve

from raytron.config import RaytronConfig
from raytron.model.sampling import SamplingParams
from raytron.serve.app import run_app
from raytron.serve.model_source import ModelSourceError, load_model
from raytron.serve.settings import build_serve_config
from raytron.tracking.mlflow_run import RunTracker, register_model_version, set_alias
from tests.integration.test_serve_api import API_KEY, MODEL_NAME, TEXTS, reference, serve_config, tiny_export
from tests.servers import free_port

REGISTERED = "serve-test-gpt"


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    folder = tiny_export(tmp_path_factory.mktemp("registry-model"))
    cfg = RaytronConfig(name="serve-registry", tracking={"tracking_uri": mlflow_server.url, "experiment": "serve"})
    tracker = RunTracker.start(cfg)
    version = register_model_version(tracker, folder, REGISTERED)
    tracker.finish()
    set_alias(REGISTERED, "production", version.version, cfg.tracking)
    return folder


def test_serves_a_registered_alias_through_mlflow(ray_cluster, mlflow_server, registered):
    source = f"models:/{REGISTERED}@production"
    cfg = build_serve_config(serve_config(source, free_port(), tracking_uri=mlflow_server.url))
    try:
        url = run_app(cfg)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        text = client.completions.create(model=MODEL_NAME, prompt=TEXTS[3], max_tokens=10, temperature=0).choices[0].text
    finally:
        serve.shutdown()
    # the served weights are the registered ones: the same greedy text as the exported folder in-process
    assert text == reference(load_model(str(registered)), TEXTS[3], SamplingParams(max_new_tokens=10, temperature=0))
    downloaded = load_model(source, mlflow_server.url)
    assert downloaded.origin != str(registered) and downloaded.tokenizer.get_vocab_size() > 256


def replicas() -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA")]


@pytest.mark.parametrize("source", [f"models:/no-such-model@production", f"models:/{REGISTERED}@no-such-alias",
                                    f"models:/{REGISTERED}/99"])
def test_a_source_the_registry_lacks_fails_before_any_replica_starts(ray_cluster, mlflow_server, registered, source):
    cfg = build_serve_config(serve_config(source, free_port(), tracking_uri=mlflow_server.url))
    before = replicas()
    with pytest.raises(ModelSourceError) as error:
        run_app(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.source:") and source in message
    assert mlflow_server.url in message
    assert replicas() == before


def test_a_missing_folder_fails_in_the_cli_with_one_line_and_no_ray(tmp_path):
    config = serve_config(str(tmp_path / "nothing-here"), free_port())
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "raytron.cli", "serve", str(tmp_path / "serve.yaml")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("raytron serve: model.source:") and "nothing-here" in line
