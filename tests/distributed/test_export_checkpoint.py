"""Export from a dp=1 x pp=2 x tp=2 checkpoint written by the real training loop on 4 gloo
processes: the consolidated TP=1 GPT and the Hugging Face folder give the trained pipeline's
logits (1e-5; the Hugging Face folder without the padded vocab rows), broken checkpoints fail naming what is wrong, s3://
checkpoints export like local ones, and a registered version carries the run's lineage."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import deepspeed
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from raytron import cli
from raytron.config import RaytronConfig, load_config
from raytron.data.tokenizer import EOS_TOKEN
from raytron.export.consolidate import CheckpointError, consolidate_checkpoint
from raytron.export.from_checkpoint import CHECKPOINT_STEP_TAG, LINEAGE_FILE, RegistrationError, export_checkpoint
from raytron.model.gpt import build_model
from raytron.parallel.topology import Topology
from raytron.storage import filesystem_for
from raytron.tracking.mlflow_run import CONFIG_HASH_TAG, DATA_MANIFEST_TAG, RUN_ID_TAG, RunTracker
from raytron.train.batches import ArraySource, StepBatches
from raytron.train.checkpoint import META_FILE, CheckpointMeta, load_checkpoint
from raytron.train.engine import TrainingEngine
from raytron.train.loop import train
from raytron.train.session import LocalSession
from tests.distributed.gloo import run_on_gloo
from tests.servers import free_port

FLAVOURS = ("gpt", "llama")
TOL = 1e-5
VOCAB = 500  # padded to 512 for tp=2: the padding rows travel through export too
PADDED_VOCAB = 512
SEQ, MICRO, STEPS = 16, 2, 3
LOGITS_FILE = "pipeline_logits.pt"
TOKENIZER_WORDS = [EOS_TOKEN, "<unk>", "the", "cat", "sat"]


def config(flavour: str, root: str | Path) -> RaytronConfig:
    return load_config("jobs/configs/tiny_smoke.yaml", [
        f"model.flavour={flavour}", f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}", "train.grad_accum_steps=2",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.threads=1", "parallel.pp=2", "parallel.tp=2",
        "parallel.zero_stage=1", f"train.storage_path={root}", f"name=export-{flavour}",
        "tracking.experiment=export-checkpoint", "tracking.registered_model_name=export-checkpoint-gpt",
    ])


def probe_tokens() -> torch.Tensor:
    """One micro-batch the pipeline and the exports are all asked about: (MICRO, SEQ+1)."""
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(7))


def write_tokenizer(path: Path) -> Path:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TOKENIZER_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def latest_checkpoint(root: Path) -> Path:
    return sorted(root.glob("checkpoint_*"))[-1]


def _train_then_record_logits(roots: dict[str, str], tokenizer_path: str, probe: torch.Tensor) -> None:
    """On each gloo rank: train every flavour with the real loop, then reload the final checkpoint's
    DeepSpeed state into a fresh pipeline engine (an independent path from the safetensors shards
    that export reads) and save its TP-gathered logits on ``probe`` from the last stage."""
    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # PipelineModule requires it
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the group run_on_gloo started
    blocks = np.random.default_rng(0).integers(0, VOCAB, (STEPS * 2 * MICRO, SEQ + 1))  # (N, T+1)
    for flavour, root in roots.items():
        cfg = config(flavour, root)
        topology = Topology.from_world(dp=1, pp=2, tp=2)
        train(cfg, topology, LocalSession(root), ArraySource(blocks), tokenizer_json=Path(tokenizer_path).read_text())
        engine = TrainingEngine(cfg, topology)
        load_checkpoint(latest_checkpoint(Path(root)), engine, StepBatches(None, cfg, topology))
        micro_batch = iter([(probe[:, :-1], probe[:, 1:])])
        _, logits = engine.engine.eval_batch(micro_batch, return_logits=True, num_micro_batches=1)
        if engine.engine.is_last_stage():
            logits = engine.layers.gather_logits(logits)  # (MICRO, SEQ, V_pad)
            if topology.tp_index == 0:
                torch.save(logits, Path(root) / LOGITS_FILE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """flavour -> (final checkpoint folder, the trained pipeline's logits on probe_tokens())."""
    roots = {flavour: tmp_path_factory.mktemp(flavour) for flavour in FLAVOURS}
    tokenizer = write_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    run_on_gloo(4, _train_then_record_logits, {f: str(root) for f, root in roots.items()}, str(tokenizer),
                probe_tokens())
    return {flavour: (latest_checkpoint(root), torch.load(root / LOGITS_FILE)) for flavour, root in roots.items()}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_consolidated_model_gives_the_pipeline_logits(trained, flavour):
    checkpoint, pipeline_logits = trained[flavour]
    consolidated = consolidate_checkpoint(checkpoint)
    model = consolidated.new_model()
    assert consolidated.meta.step == STEPS
    assert pipeline_logits.shape == (MICRO, SEQ, PADDED_VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(model(probe_tokens()[:, :-1]), pipeline_logits, atol=TOL, rtol=0)
    # the weights are the trained ones, not the initial draw the pipeline would share with them
    initial = build_model(consolidated.config.model, consolidated.config.train.seed, padded_vocab=PADDED_VOCAB)
    name = "blocks.0.attn.qkv.weight"
    assert not torch.equal(initial.state_dict()[name], consolidated.state[name])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cli_export_loads_in_transformers_with_the_pipeline_logits(trained, flavour, tmp_path, capsys):
    checkpoint, pipeline_logits = trained[flavour]
    assert cli.main(["export", str(checkpoint), str(tmp_path / "hf"), "--no-register"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["folder"] == str(tmp_path / "hf") and "version" not in printed

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        # export cuts the padded vocabulary rows: transformers sees the true vocabulary
        torch.testing.assert_close(theirs(probe_tokens()[:, :-1]).logits, pipeline_logits[..., :VOCAB], atol=TOL,
                                   rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == EOS_TOKEN
    lineage = json.loads((tmp_path / "hf" / LINEAGE_FILE).read_text())
    assert lineage["config"]["parallel"] == {"dp": 1, "pp": 2, "tp": 2, "zero_stage": 1}
    assert lineage["lineage"]["checkpoint_step"] == STEPS
    assert lineage["lineage"]["config_hash"] == config(flavour, checkpoint.parent).digest()  # the training run's


def copy_for_export(checkpoint: Path, destination: Path) -> Path:
    """What export reads of a checkpoint, copied so a test can damage or re-label it."""
    shutil.copytree(checkpoint / "model", destination / "model")
    for name in (META_FILE, "tokenizer.json"):
        shutil.copy(checkpoint / name, destination / name)
    return destination


def rewrite_meta(folder: Path, **changes) -> None:
    meta = dataclasses.replace(CheckpointMeta.read(folder), **changes)
    (folder / META_FILE).write_text(json.dumps(dataclasses.asdict(meta)))


def test_missing_shard_file_is_named(trained, tmp_path):
    folder = copy_for_export(trained["gpt"][0], tmp_path / "checkpoint")
    (folder / "model" / "pp1-tp1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) model/pp1-tp1\.safetensors"):
        consolidate_checkpoint(folder)


def test_shape_mismatch_names_parameter_and_file(trained, tmp_path):
    folder = copy_for_export(trained["gpt"][0], tmp_path / "checkpoint")
    rewrite_meta(folder, padded_vocab_size=640)
    with pytest.raises(CheckpointError, match=r"embed\.tokens\.weight: shape \(512, 32\) in "
                                              r"model/pp0-tp\*\.safetensors, model/pp1-tp\*\.safetensors, "
                                              r"the model expects \(640, 32\)"):
        consolidate_checkpoint(folder)


def test_s3_checkpoint_exports_like_the_local_one(trained, s3_server, monkeypatch, tmp_path):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3_server.create_bucket("export-checkpoints")
    local = copy_for_export(trained["llama"][0], tmp_path / "checkpoint")
    url = "s3://export-checkpoints/run/checkpoint_00000003"
    fs, path = filesystem_for(url)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    remote_state, local_state = consolidate_checkpoint(url).state, consolidate_checkpoint(local).state
    assert remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[name], local_state[name]) for name in local_state)
    export_checkpoint(url, tmp_path / "hf", register=False)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (local / "tokenizer.json").read_text()


def test_export_registers_a_version_with_the_runs_lineage(trained, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the checkpoint's config names no server
    folder = copy_for_export(trained["gpt"][0], tmp_path / "checkpoint")
    cfg = consolidate_checkpoint(folder).config
    tracker = RunTracker.start(cfg)  # the training run, as `raytron train` would have opened it
    rewrite_meta(folder, mlflow_run_id=tracker.run_id)

    result = export_checkpoint(folder, tmp_path / "hf")

    client = MlflowClient(mlflow_server.url)
    version = client.get_model_version(cfg.tracking.registered_model_name, result.model_version.version)
    assert version.run_id == tracker.run_id
    assert version.tags[RUN_ID_TAG] == tracker.run_id
    assert version.tags[CONFIG_HASH_TAG] == cfg.digest()
    assert version.tags[DATA_MANIFEST_TAG] == "none"
    assert version.tags[CHECKPOINT_STEP_TAG] == str(STEPS)
    assert client.get_run(tracker.run_id).outputs.model_outputs  # logged to the training run


def test_registration_failure_says_where_and_keeps_the_folder(trained, tmp_path, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after minutes of backoff
    folder = copy_for_export(trained["gpt"][0], tmp_path / "checkpoint")
    rewrite_meta(folder, mlflow_run_id="0" * 32)
    with pytest.raises(RegistrationError, match=f"registering it as export-checkpoint-gpt at {re.escape(closed)}"):
        export_checkpoint(folder, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
