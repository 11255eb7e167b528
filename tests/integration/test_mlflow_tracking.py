"""MLflow tracking against a real `mlflow server` (and the embedded sqlite store), read back
through MlflowClient; plus the moto S3 server that later S3 tests rely on."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import mlflow
import pytest
import s3fs
import torch
from mlflow import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

from raytron.config import RaytronConfig, TrackingConfig, schema_rows
from raytron.tracking.metric_sender import BackgroundMetricSender
from raytron.tracking.mlflow_run import (CONFIG_HASH_TAG, DATA_MANIFEST_TAG, FAST_FAILURE_ENV, GIT_COMMIT_TAG,
                                         RUN_ID_TAG, RunTracker, download_model_folder, register_model_version,
                                         resolve_tracking_uri, set_alias)
from tests.servers import free_port

WORDS = ["<unk>", "the", "cat", "sat", "on", "mat"]


def run_config(tracking_uri: str | None, experiment: str, **train) -> RaytronConfig:
    return RaytronConfig(name=f"{experiment}-run", model={"hidden_size": 64, "num_heads": 4},
                         train={"steps": 5, **train},
                         tracking=TrackingConfig(tracking_uri=tracking_uri, experiment=experiment))


def losses(steps: range) -> dict[int, float]:
    return {step: 10.0 / (step + 1) for step in steps}


def log_losses(tracker: RunTracker, steps: range) -> None:
    for step, loss in losses(steps).items():
        tracker.log_metrics({"loss": loss, "tokens_per_s": 100.0 + step}, step)


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}


def git_repository(path: Path) -> str:
    """A fresh repository with one commit; returns the commit id."""
    path.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "start")
    return git("rev-parse", "HEAD")


def tiny_huggingface_folder(path: Path) -> Path:
    """A real (random) GPT-2 with a word-level tokenizer, as an export writes it. No end-of-text
    token, so greedy decoding always produces exactly max_new_tokens words."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(WORDS), n_positions=64,
                        bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def test_run_records_config_metrics_and_lineage(mlflow_server, tmp_path, monkeypatch):
    commit = git_repository(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    cfg = run_config(mlflow_server.url, "tracking")

    tracker = RunTracker.start(cfg)
    log_losses(tracker, range(4))
    tracker.finish()

    assert tracker.errors == 0
    run = MlflowClient(mlflow_server.url).get_run(tracker.run_id)
    assert run.info.run_name == cfg.name and run.info.status == "FINISHED"
    params = run.data.params
    assert set(params) == {path for path, *_ in schema_rows()}
    assert params["model.hidden_size"] == "64" and params["model.flavour"] == "gpt"
    assert params["train.betas"] == "[0.9, 0.95]" and params["model.ffn_hidden_size"] == "null"
    assert params["tracking.tracking_uri"] == mlflow_server.url
    client = MlflowClient(mlflow_server.url)
    assert history(client, tracker.run_id, "loss") == losses(range(4))
    assert history(client, tracker.run_id, "tokens_per_s") == {step: 100.0 + step for step in range(4)}
    assert run.data.tags[CONFIG_HASH_TAG] == cfg.digest()
    assert run.data.tags[GIT_COMMIT_TAG] == commit


def test_steps_sent_in_one_batch_keep_their_own_times(mlflow_server):
    """Rank 0 sends several steps at once; MLflow's charts against wall time need each step's end."""
    tracker = RunTracker.start(run_config(mlflow_server.url, "batched"))
    ended_ms = {step: 1_700_000_000_000 + 1_500 * step for step in range(3)}
    tracker.log_metric_steps([({"loss": losses(range(3))[step]}, step, ended_ms[step]) for step in range(3)])
    tracker.finish()

    metrics = MlflowClient(mlflow_server.url).get_metric_history(tracker.run_id, "loss")
    assert tracker.errors == 0
    assert {metric.step: metric.timestamp for metric in metrics} == ended_ms


def test_background_sender_delivers_every_batch_by_drain(mlflow_server):
    """Rank 0 hands batches to a thread and goes on training; drain (the last step) returns only once
    all of them are in MLflow, each step with its own time."""
    tracker = RunTracker.start(run_config(mlflow_server.url, "background"))
    sender = BackgroundMetricSender(tracker)
    ended_ms = {step: 1_700_000_000_000 + 700 * step for step in range(20)}
    for first in range(0, 20, 5):
        sender.send([({"loss": losses(range(20))[step]}, step, ended_ms[step]) for step in range(first, first + 5)])
    sender.drain()

    metrics = MlflowClient(mlflow_server.url).get_metric_history(tracker.run_id, "loss")
    assert tracker.errors == 0
    assert {metric.step: metric.timestamp for metric in metrics} == ended_ms
    assert {metric.step: metric.value for metric in metrics} == losses(range(20))


def test_git_commit_is_unknown_outside_a_repository(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker.start(run_config(mlflow_server.url, "no-repository"))
    assert MlflowClient(mlflow_server.url).get_run(tracker.run_id).data.tags[GIT_COMMIT_TAG] == "unknown"


def test_resume_continues_the_same_run(mlflow_server):
    cfg = run_config(mlflow_server.url, "resume")
    first = RunTracker.start(cfg)
    log_losses(first, range(3))  # then the training process dies: no finish()

    # The restarted run may extend the schedule: params keep their first values, the hash tag follows.
    longer = run_config(mlflow_server.url, "resume", steps=8)
    second = RunTracker.start(longer, run_id=first.run_id)
    log_losses(second, range(3, 6))
    second.finish()

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first.run_id)
    assert second.run_id == first.run_id and first.errors == second.errors == 0
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "loss") == losses(range(6))
    assert run.data.params["train.steps"] == "5"
    assert run.data.tags[CONFIG_HASH_TAG] == longer.digest()
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_registered_version_has_lineage_and_serves_its_folder(mlflow_server, tmp_path, monkeypatch):
    cfg = run_config(mlflow_server.url, "registry")
    tracker = RunTracker.start(cfg)
    folder = tiny_huggingface_folder(tmp_path / "hf")

    version = register_model_version(tracker, folder, "tiny-gpt", {DATA_MANIFEST_TAG: "manifest-123"})
    set_alias("tiny-gpt", "champion", version.version, cfg.tracking)
    tracker.finish()

    assert version.status == "READY" and version.run_id == tracker.run_id
    assert version.tags[RUN_ID_TAG] == tracker.run_id
    assert version.tags[CONFIG_HASH_TAG] == cfg.digest()
    assert version.tags[DATA_MANIFEST_TAG] == "manifest-123"
    downloaded = download_model_folder("models:/tiny-gpt@champion", tmp_path / "by-alias", cfg.tracking)
    assert (downloaded / "config.json").is_file()
    for name in ("model.safetensors", "tokenizer.json"):
        assert (downloaded / name).read_bytes() == (folder / name).read_bytes()
    by_number = download_model_folder(f"models:/tiny-gpt/{version.version}", tmp_path / "by-number", cfg.tracking)
    assert (by_number / "config.json").read_bytes() == (downloaded / "config.json").read_bytes()

    # MLflow's own loader (which reads the global tracking URI) gets a model that completes text.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    model = mlflow.pyfunc.load_model("models:/tiny-gpt@champion")
    completions = model.predict([{"prompt": "the cat", "max_new_tokens": 3},
                                 {"prompt": "on the", "max_new_tokens": 3}])
    assert len(completions) == 2
    assert all(len(text.split()) == 3 and set(text.split()) <= set(WORDS) for text in completions)


@pytest.mark.timeout(120)
def test_unreachable_server_never_stops_training(tmp_path, monkeypatch, caplog):
    for name in FAST_FAILURE_ENV:  # the tracker's fast-failure defaults apply, and are undone after
        monkeypatch.delenv(name, raising=False)
    cfg = run_config(f"http://127.0.0.1:{free_port()}", "unreachable")

    with caplog.at_level(logging.WARNING, logger="raytron.tracking"):
        tracker = RunTracker.start(cfg)
        log_losses(tracker, range(3))
        tracker.set_tags({"phase": "train"})
        tracker.log_artifacts(tmp_path)
        tracker.finish("FAILED")

    assert tracker.run_id is None
    assert tracker.errors >= 6  # start, three metric logs, tags, artifacts, finish
    failed_kinds = [record.getMessage().split()[1] for record in caplog.records
                    if record.name.startswith("raytron.tracking")]
    assert sorted(failed_kinds) == sorted(set(failed_kinds))  # one warning per kind of call
    with pytest.raises(RuntimeError, match="never started"):
        register_model_version(tracker, tmp_path, "unreachable")


def test_user_http_settings_win_over_fast_failure_defaults(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    RunTracker(f"http://127.0.0.1:{free_port()}")  # building a tracker talks to no server
    assert mlflow.environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5
    assert mlflow.environment_variables.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == int(FAST_FAILURE_ENV[
        "MLFLOW_HTTP_REQUEST_TIMEOUT"])


def test_embedded_default_is_sqlite_with_artifacts_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = run_config(None, "embedded")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.txt").write_text("ok")

    tracker = RunTracker.start(cfg)
    log_losses(tracker, range(2))
    tracker.log_artifacts(tmp_path / "report", "report")
    version = register_model_version(tracker, tiny_huggingface_folder(tmp_path / "hf"), "embedded-gpt")
    tracker.finish()

    uri = resolve_tracking_uri(cfg.tracking)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" and tracker.tracking_uri == uri
    assert tracker.errors == 0
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    artifacts = (tmp_path / "mlruns" / "artifacts").resolve()
    assert client.get_experiment(run.info.experiment_id).artifact_location == artifacts.as_uri()
    assert history(client, tracker.run_id, "loss") == losses(range(2))
    assert [path.read_text() for path in artifacts.rglob("summary.txt")] == ["ok"]
    downloaded = download_model_folder(f"models:/embedded-gpt/{version.version}", tmp_path / "dl")
    assert (downloaded / "config.json").is_file()
    assert downloaded.resolve().is_relative_to(tmp_path.resolve() / "dl")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dl", "hf", "mlruns", "report"]  # nothing strays


def test_moto_s3_server_serves_s3fs(s3_server):
    s3_server.create_bucket("raytron-test")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url, key=s3_server.env["AWS_ACCESS_KEY_ID"],
                           secret=s3_server.env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    with fs.open("raytron-test/shards/part-0.txt", "wb") as handle:
        handle.write(b"tokens")

    assert fs.cat("raytron-test/shards/part-0.txt") == b"tokens"
    assert fs.ls("raytron-test/shards") == ["raytron-test/shards/part-0.txt"]
