"""Serve config (strict, dotted-field errors, shipped YAMLs), deployment options, request parsing and
the chat template. No Ray cluster: build_app only builds the application."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raytron.config import ConfigError
from raytron.serve.app import build_app
from raytron.serve.chat_template import TURN_STOPS, render_chat
from raytron.serve.protocol import ApiError, ChatCompletionRequest, ChatMessage, CompletionRequest, parse_request
from raytron.serve.settings import build_serve_config, load_serve_config, serve_resources

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = REPO / "jobs" / "configs" / "serve"
SERVE_APP = SERVE_CONFIGS / "serve_app.yaml"
RAYTRON_SERVE_CONFIGS = sorted(path for path in SERVE_CONFIGS.glob("*.yaml") if path != SERVE_APP)


@pytest.mark.parametrize("path", RAYTRON_SERVE_CONFIGS, ids=lambda path: path.name)
def test_shipped_serve_configs_load(path):
    cfg = load_serve_config(path)
    if path.stem.endswith("smoke"):
        assert cfg.deployment.ray_actor_options.num_gpus == 0 and cfg.http.host == "127.0.0.1"
    else:
        assert (SERVE_CONFIGS / f"{path.stem}_smoke.yaml").is_file(), "every real config needs a _smoke twin"


def test_serve_config_file_is_valid_and_points_at_build_app():
    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_APP.read_text()))
    (app,) = schema.applications
    assert app.import_path == "raytron.serve.app:build_app" and schema.http_options.host == "127.0.0.1"
    assert (REPO / app.args["config"]).is_file()


def test_defaults_listen_on_localhost_only():
    cfg = build_serve_config({"model": {"source": "models:/m@a"}})
    assert cfg.http.host == "127.0.0.1" and cfg.http.api_key is None


BAD = [
    ({}, ["model: Field required"]),
    ({"model": {"source": "x", "nmae": "y"}}, ["model.nmae: Extra inputs", "allowed: source, name, tracking_uri"]),
    ({"model": {"source": "x"}, "limits": {"max_batch_size": 0}}, ["limits.max_batch_size"]),
    ({"model": {"source": "x"}, "limits": {"max_tokens": "many"}}, ["limits.max_tokens", "'many'"]),
    ({"model": {"source": "x"}, "sampling": {"top_p": 0}}, ["sampling.top_p"]),
    ({"model": {"source": "x"}, "deployment": {"autoscaling_config": {"max_replica": 2}}},
     ["deployment.autoscaling_config.max_replica", "allowed: min_replicas, max_replicas"]),
    ({"model": {"source": "x"}, "deployment": {"num_replicas": 2, "autoscaling_config": {}}},
     ["deployment.num_replicas: set either"]),
    ({"model": {"source": "x"}, "deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}},
     ["deployment.autoscaling_config.min_replicas: 3 exceeds max_replicas 2"]),
    ({"model": {"source": "x"}, "sampling": {"max_tokens": 300}}, ["sampling.max_tokens: default 300 exceeds"]),
    ({"model": {"source": "x"}, "limits": {"context": 64, "max_tokens": 64}}, ["limits.max_tokens: 64 leaves no room"]),
    ({"model": {"source": "x"}, "http": {"port": 70000}}, ["http.port"]),
    ({"model": {"source": "x"}, "http": {"stream_interval_s": -0.1}}, ["http.stream_interval_s"]),
]


@pytest.mark.parametrize("raw,expected", BAD, ids=[", ".join(e[:1]) for _, e in BAD])
def test_bad_serve_config_names_the_field(raw, expected):
    with pytest.raises(ConfigError) as error:
        build_serve_config(raw)
    for text in expected:
        assert text in str(error.value)


def test_overrides_and_unreadable_files(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: {source: models:/m@a}\n")
    cfg = load_serve_config(path, ["limits.max_batch_size=4", "http.api_key=secret"])
    assert cfg.limits.max_batch_size == 4 and cfg.http.api_key == "secret"
    with pytest.raises(ConfigError, match="cannot read"):
        load_serve_config(tmp_path / "missing.yaml")


def test_deployment_options_reach_the_application():
    autoscaled = build_app(build_serve_config({
        "model": {"source": "models:/m@a", "tracking_uri": "http://127.0.0.1:1"},
        "deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
                       "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}, "max_ongoing_requests": 17}}))
    deployment = autoscaled._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    assert deployment.max_ongoing_requests == 17
    fixed = build_app({"model": {"source": "some/folder"}, "deployment": {"num_replicas": 2}})._bound_deployment
    assert fixed.num_replicas == 2
    # a relative folder is resolved where the app is built, not in each replica's working dir
    assert Path(fixed.init_args[0]["model"]["source"]).is_absolute()


def test_requests_are_parsed_strictly_and_errors_name_the_parameter():
    request = parse_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "stop": "\n", "temperature": 1})
    assert request.prompt == ["a", "b"] and request.stops() == ("\n",) and request.temperature == 1.0
    for body, param in [({"model": "m", "prompt": "a", "max_tokens": 2.0}, "max_tokens"),
                        ({"model": "m", "prompt": "a", "stream": "yes"}, "stream"),
                        ({"model": "m", "prompt": "a", "stop": [str(i) for i in range(17)]}, "stop"),
                        ({"model": "m", "prompt": []}, "prompt"),
                        ({"model": "m", "messages": []}, "messages")]:
        schema = ChatCompletionRequest if "messages" in body else CompletionRequest
        with pytest.raises(ApiError) as error:
            parse_request(schema, body)
        assert error.value.status == 400 and error.value.param == param
        assert set(error.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_template_renders_turns_and_opens_the_assistant_turn():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=" Hi \n"),
                ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Why?")]
    assert render_chat(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Why?\n\nAssistant:"
    assert "\n\nUser:" in TURN_STOPS


def test_autoscaling_delays_reach_serve():
    app = build_app(build_serve_config({
        "model": {"source": "some/folder"},
        "deployment": {"autoscaling_config": {"max_replicas": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                                              "metrics_interval_s": 0.2, "look_back_period_s": 1.5}}}))
    scaling = app._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.metrics_interval_s,
            scaling.look_back_period_s) == (0.5, 2, 0.2, 1.5)


def test_tensor_parallel_replica_asks_for_one_packed_bundle_per_rank():
    cfg = build_serve_config({"model": {"source": "some/folder"},
                              "deployment": {"tensor_parallel": 4, "num_replicas": 2,
                                             "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}})
    deployment = build_app(cfg)._bound_deployment
    replica = deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 2, "GPU": 1}] * 4
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert serve_resources(cfg) == {"tensor_parallel": 4, "max_replicas": 2, "processes_per_replica": 4,
                                         "cpus_per_replica": 8, "gpus_per_replica": 4, "devices": 8, "cpus": 16,
                                         "gpus": 8}
    single = build_app({"model": {"source": "some/folder"}})._bound_deployment._replica_config
    assert single.placement_group_bundles is None


@pytest.mark.parametrize("actor, message", [({"num_cpus": 0}, "bundle needs num_cpus or num_gpus"),
                                            ({"num_gpus": 0.5}, "each rank needs a whole GPU")])
def test_tensor_parallel_bundles_that_cannot_work_are_refused(actor, message):
    with pytest.raises(ConfigError, match=message):
        build_serve_config({"model": {"source": "x"},
                            "deployment": {"tensor_parallel": 2, "ray_actor_options": actor}})


def test_raytron_info_says_what_a_serve_config_occupies(capsys):
    from raytron import cli

    assert cli.main(["info", str(SERVE_CONFIGS / "gpt_smoke.yaml"), "--set", "deployment.tensor_parallel=2",
                     "--set", "deployment.num_replicas=3"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    cpus = load_serve_config(SERVE_CONFIGS / "gpt_smoke.yaml").deployment.ray_actor_options.num_cpus
    assert (info["devices"], info["processes_per_replica"], info["cpus"]) == (6, 2, 6 * cpus)
