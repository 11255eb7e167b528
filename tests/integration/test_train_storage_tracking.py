"""`raytron train` end to end against real servers: checkpoints to S3 (moto on 127.0.0.1), metrics
and the registered model in a real `mlflow server`, `--resume` from S3; and bad runs that must fail
at start instead of waiting."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow import MlflowClient

from raytron.config import load_config
from raytron.data.manifest import read_manifest
from raytron.storage import StorageError, list_dirs
from raytron.tracking.mlflow_run import CONFIG_HASH_TAG, DATA_MANIFEST_TAG, RUN_ID_TAG
from raytron.train.cluster import ResourceError
from raytron.train.ray_trainer import fit
from raytron.train.run import run_training
from tests.integration.conftest import blocks_dataset

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.max_position_embeddings=64", "train.seq_len=32", "train.micro_batch_size=2", "train.threads=1",
        "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=2", "data.demo_corpus_bytes=400000"]


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return bucket


def test_train_to_s3_with_mlflow_then_resume(ray_cluster, s3_env, mlflow_server, tmp_path):
    name = f"s3run-{uuid.uuid4().hex[:6]}"
    storage = f"s3://{s3_env}/runs"
    common = TINY + [f"name={name}", f"train.storage_path={storage}",
                     f"tracking.tracking_uri={mlflow_server.url}", f"tracking.registered_model_name={name}"]
    first = run_training(load_config("jobs/configs/tiny_smoke.yaml", common + ["train.steps=4", "train.export=true"]),
                         workdir=tmp_path)
    assert sorted(first.metrics["losses"]) == [1, 2, 3, 4]
    assert list_dirs(f"{storage}/{first.run_name}")[:2] == ["checkpoint_00000002", "checkpoint_00000004"]

    client = MlflowClient(mlflow_server.url)
    run_id = first.export.lineage["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.data.params["model.hidden_size"] == "32" and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([first.metrics["losses"][s] for s in (1, 2, 3, 4)])
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [2, 4]
    version = client.get_model_version(name, first.export.model_version.version)
    assert version.tags[RUN_ID_TAG] == run_id and version.run_id == run_id
    assert version.tags[CONFIG_HASH_TAG] == run.data.tags[CONFIG_HASH_TAG]
    # trained on the demo corpus prepared into <storage>/prepared/<fingerprint>: the export names that manifest
    manifest = read_manifest(f"{storage}/prepared/{run.data.tags[DATA_MANIFEST_TAG][:16]}")
    assert version.tags[DATA_MANIFEST_TAG] == run.data.tags[DATA_MANIFEST_TAG] == manifest.fingerprint
    assert (first.export.folder / "config.json").exists()

    resumed = run_training(load_config("jobs/configs/tiny_smoke.yaml", common + ["train.steps=6"]),
                           resume=True, workdir=tmp_path)
    assert resumed.run_name == first.run_name
    assert sorted(resumed.metrics["losses"]) == [5, 6]  # continued after the step-4 checkpoint on S3
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]  # same MLflow run


def test_impossible_resource_request_fails_fast(ray_cluster, text_blocks, tmp_path):
    cfg = load_config("jobs/configs/tiny_smoke.yaml",
                      TINY + ["resources.cpus_per_worker=512", f"train.storage_path={tmp_path}"])
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"resources.cpus_per_worker=512.*512 CPU requested, cluster has"):
        fit(cfg, blocks_dataset(text_blocks.train_blocks, 8))
    assert time.monotonic() - started < 60  # a guard against waiting for resources, not a benchmark


@pytest.mark.parametrize("storage", ["/proc/raytron-cannot-write-here", "s3://no-such-bucket-raytron/runs"])
def test_unwritable_storage_fails_at_start(ray_cluster, s3_env, text_blocks, storage):
    cfg = load_config("jobs/configs/tiny_smoke.yaml", TINY + [f"train.storage_path={storage}"])
    with pytest.raises(StorageError, match=storage):
        fit(cfg, blocks_dataset(text_blocks.train_blocks, 8))


def test_splits_too_small_for_one_step_fail_before_training(ray_cluster, tmp_path):
    """A validation split smaller than one global batch used to fail at the first evaluation, after
    the training it was meant to check; now both splits are measured against a step before fit."""
    storage = tmp_path / "runs"
    common = TINY + [f"train.storage_path={storage}", "data.validation_fraction=0.002"]
    with pytest.raises(ValueError, match=r"the validation split holds \d+ blocks .* fewer than one global batch of "
                                         r"64 \(train.micro_batch_size 64 .*raise data.validation_fraction"):
        run_training(load_config("jobs/configs/tiny_smoke.yaml", common + ["train.micro_batch_size=64"]),
                     workdir=tmp_path)
    with pytest.raises(ValueError, match=r"the train split holds \d+ blocks .* fewer than one global batch of 50000"):
        run_training(load_config("jobs/configs/tiny_smoke.yaml",
                                 common + ["train.micro_batch_size=50000", "train.eval_every=0"]), workdir=tmp_path)
    assert list_dirs(str(storage)) == ["prepared"]  # data was prepared; no training run was started
