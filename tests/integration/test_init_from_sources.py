"""model.init_from from S3, from a raytron checkpoint and from the MLflow registry, on real servers
(moto S3, `mlflow server`) and real gloo processes: a tiny Llama (GQA, tied, llama3 RoPE) with its
tokenizer files goes s3:// -> tp=2 engine -> checkpoint -> pp=2 engine -> export -> registered
version -> models:/ import and serving; every model on the way has transformers' loss on one batch,
and the tokenizer files (chat template, EOS list) arrive at the end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers

from raytron.config import ConfigError
from raytron.export.from_checkpoint import BASE_MODEL_TAG, export_checkpoint
from raytron.parallel.hf_import import load_huggingface_model, resolve_init_from
from raytron.parallel.init_source import local_folder
from raytron.serve.chat_template import PARAGRAPHS
from raytron.serve.model_source import load_model
from raytron.storage import filesystem_for
from raytron.tracking.mlflow_run import set_alias
from tests.distributed.gloo import run_on_gloo
from tests.hf_models import VOCAB, save_tiny

SEQ = 16
REGISTERED = "init-from-sources"
EOS_LIST = [1, 2]
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|eot|> {% endfor %}"


def add_tokenizer_files(folder: Path) -> None:
    """What a chat model's folder holds beside its weights: tokenizer, its config (chat template,
    special tokens), generation_config.json with two EOS ids."""
    words = ["<|endoftext|>", "<|eot|>", "<unk>", "<|user|>", "<|assistant|>", "hello", "there"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eot|>", "chat_template": TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_LIST}))


def upload(folder: Path, url: str) -> None:
    fs, root = filesystem_for(url)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(folder), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _s3_then_checkpoint(s3_url: str, checkpoint: str, block: torch.Tensor, out: str, tracking_uri: str) -> None:
    """On each of 2 ranks: a tp=2 engine from s3://, its checkpoint, then a pp=2 engine from that
    checkpoint; both engines' losses on ``block``."""
    import deepspeed
    import torch.distributed as dist

    from raytron.parallel.topology import Topology
    from raytron.train.batches import DataPosition
    from raytron.train.checkpoint import CheckpointMeta, save_checkpoint
    from raytron.train.engine import TrainingEngine

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    train = {"seq_len": SEQ, "micro_batch_size": 2, "grad_accum_steps": 1}
    tracking = {"tracking_uri": tracking_uri, "experiment": "init-from", "registered_model_name": REGISTERED}
    cfg = resolve_init_from({"model": {"init_from": s3_url}, "train": train, "tracking": tracking,
                             "parallel": {"tp": 2}})
    engine = TrainingEngine(cfg, Topology.from_world(1, 1, 2))
    losses = [engine.eval_loss([block])]
    save_checkpoint(Path(checkpoint), engine, CheckpointMeta(7, DataPosition(), cfg.to_dict(), cfg.padded_vocab_size))
    dist.barrier()  # every shard written before any rank reads the checkpoint
    cfg = resolve_init_from({"model": {"init_from": checkpoint}, "train": train, "tracking": tracking,
                             "parallel": {"pp": 2}})
    losses.append(TrainingEngine(cfg, Topology.from_world(1, 2, 1)).eval_loss([block]))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(losses))


def loss_of(logits: torch.Tensor, block: torch.Tensor) -> float:
    return F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten()).item()  # logits (mb, T, V)


@pytest.mark.slow  # ~2.5 min on 2 cores: two DeepSpeed engines on gloo, an export and a registration
def test_s3_checkpoint_registry_chain(s3_server, mlflow_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAYTRON_CACHE_DIR", str(tmp_path / "cache"))
    theirs = save_tiny("llama-tied", tmp_path / "llama")
    add_tokenizer_files(tmp_path / "llama")
    s3_server.create_bucket("init-from")
    s3_url = "s3://init-from/models/llama"
    upload(tmp_path / "llama", s3_url)
    block = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(4))  # (mb, T+1)
    with torch.no_grad():
        expected = loss_of(theirs(block[:, :-1]).logits, block)

    checkpoint, out = tmp_path / "checkpoint", tmp_path / "losses.json"
    run_on_gloo(2, _s3_then_checkpoint, s3_url, str(checkpoint), block, str(out), mlflow_server.url)
    from_s3, from_checkpoint = json.loads(out.read_text())
    assert abs(from_s3 - expected) < 1e-5 and abs(from_checkpoint - expected) < 1e-5
    # two ranks on one node, one fetch: one cached folder and no partial download left behind
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (checkpoint / name).read_bytes() == (tmp_path / "llama" / name).read_bytes(), name

    _bad_checkpoints(checkpoint, tmp_path)

    result = export_checkpoint(checkpoint, tmp_path / "export", register=True)
    assert json.loads((result.folder / "generation_config.json").read_text())["eos_token_id"] == EOS_LIST
    assert json.loads((result.folder / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert result.model_version.tags[BASE_MODEL_TAG] == s3_url
    assert MlflowClient(mlflow_server.url).get_model_version(REGISTERED, result.model_version.version) \
        .tags[BASE_MODEL_TAG] == s3_url
    set_alias(REGISTERED, "champion", result.model_version.version,
              resolve_init_from({"tracking": {"tracking_uri": mlflow_server.url}}).tracking)

    # serving reads the registered version's template and EOS list
    served = load_model(f"models:/{REGISTERED}@champion", mlflow_server.url)
    assert served.chat is not PARAGRAPHS and set(EOS_LIST) <= served.end_ids

    # models:/NAME@ALIAS as init_from: pinned to its version in the driver, the same weights
    cfg = resolve_init_from({"model": {"init_from": f"models:/{REGISTERED}@champion"}, "train": {"seq_len": SEQ},
                             "tracking": {"tracking_uri": mlflow_server.url}})
    assert cfg.model.init_from == f"models:/{REGISTERED}/{result.model_version.version}"
    assert cfg.model.hf_architecture == "LlamaForCausalLM" and cfg.model.num_kv_heads == 2
    model = load_huggingface_model(local_folder(cfg.model.init_from, cfg.tracking), SEQ)
    with torch.no_grad():
        assert abs(loss_of(model(block[:, :-1])[..., :VOCAB], block) - expected) < 1e-5


def _bad_checkpoints(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint as init_from fails before any worker: a YAML value it contradicts names both and
    meta.json, a missing shard names the file."""
    with pytest.raises(ConfigError, match=r"model.hidden_size: 32 in the config, but .*meta.json says 64"):
        resolve_init_from({"model": {"init_from": str(checkpoint), "hidden_size": 32}, "train": {"seq_len": SEQ}})
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model" / "pp0-tp1.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.init_from: .*broken: missing model/pp0-tp1.safetensors "
                                          r"\(written with pp=1, tp=2\)"):
        resolve_init_from({"model": {"init_from": str(broken)}, "train": {"seq_len": SEQ}})


@pytest.mark.parametrize("init_from", [f"models:/{REGISTERED}@no-such-alias", "models:/no-such-model/1"])
def test_registry_init_from_missing_is_one_line_naming_field_and_registry(mlflow_server, init_from):
    with pytest.raises(ConfigError) as error:
        resolve_init_from({"model": {"init_from": init_from}, "tracking": {"tracking_uri": mlflow_server.url}})
    problem = str(error.value).splitlines()[1]
    assert problem.startswith(f"  - model.init_from: {init_from!r} is not in the registry at {mlflow_server.url}")
