"""Engine options against the plain fp32 run on the same data: activation checkpointing recomputes
exactly the same thing (with and without pipelining); bf16 on CPU trains close to fp32;
torch.compile (train.compile) changes nothing but speed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.distributed.gloo import run_on_gloo

BASE = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "train.seq_len=16", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.steps=4",
        "train.warmup_steps=1", "parallel.zero_stage=1"]


def _losses(out: str, pp: int, overrides: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    from raytron.config import load_config
    from raytron.parallel.topology import Topology
    from raytron.train.batches import ArraySource
    from raytron.train.loop import train
    from raytron.train.session import LocalSession

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + [f"parallel.pp={pp}", "train.checkpoint_every=0",
                                                              "train.keep_checkpoints=1"] + overrides)
    blocks = np.random.default_rng(0).integers(0, 256, (64, 17))
    result = train(cfg, Topology.from_world(1, pp, 1), LocalSession(os.path.join(out, "ckpt")), ArraySource(blocks))
    if dist.get_rank() == 0:
        with open(os.path.join(out, "losses.json"), "w") as sink:
            json.dump(result["losses"], sink)


def losses(tmp_path, name: str, pp: int, overrides: list[str]) -> list[float]:
    out = tmp_path / name
    out.mkdir()
    run_on_gloo(pp, _losses, str(out), pp, overrides)
    return list(json.loads((out / "losses.json").read_text()).values())


@pytest.fixture(scope="module")
def plain_fp32(tmp_path_factory):
    """The reference: one process, fp32, no recomputation."""
    return losses(tmp_path_factory.mktemp("plain"), "plain", 1, [])


@pytest.mark.parametrize("pp", [1, 2])
def test_activation_checkpointing_matches_plain_run(tmp_path, pp, plain_fp32):
    recomputed = losses(tmp_path, "recomputed", pp, ["train.activation_checkpointing=true"])
    assert len(plain_fp32) == 4
    assert recomputed == pytest.approx(plain_fp32, abs=1e-5)  # pp=2 also reorders float sums


def test_bf16_on_cpu_trains_close_to_fp32(tmp_path, plain_fp32):
    fp32 = plain_fp32
    bf16 = losses(tmp_path, "bf16", 1, ["train.precision=bf16"])
    assert all(np.isfinite(bf16))
    assert bf16 == pytest.approx(fp32, abs=5e-2)
    assert bf16 != fp32  # it really ran in bf16


@pytest.mark.slow  # inductor compiles C++ kernels for CPU: about a minute here
def test_compiled_model_matches_plain_run(tmp_path, plain_fp32):
    compiled = losses(tmp_path, "compiled", 1, ["train.compile=true"])
    assert compiled == pytest.approx(plain_fp32, abs=1e-5)
