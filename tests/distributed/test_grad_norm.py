"""The gradient norm at ZeRO 0, where DeepSpeed's plain-optimizer path reports none, equals the norm
DeepSpeed's ZeRO-1 optimizer reports for the same run (1 process and dp=2 on real gloo processes)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.distributed.gloo import run_on_gloo

BASE = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "train.seq_len=16", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.steps=3",
        "train.warmup_steps=1", "train.checkpoint_every=0", "train.keep_checkpoints=1"]


def _grad_norms(out: str, dp: int, zero_stage: int) -> None:
    import deepspeed
    import torch.distributed as dist

    from raytron.config import load_config
    from raytron.parallel.topology import Topology
    from raytron.train.batches import ArraySource
    from raytron.train.loop import train
    from raytron.train.session import LocalSession

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + [f"parallel.dp={dp}", f"parallel.zero_stage={zero_stage}"])
    blocks = np.random.default_rng(0).integers(0, 256, (64, 17))
    result = train(cfg, Topology.from_world(dp, 1, 1), LocalSession(os.path.join(out, "ckpt")), ArraySource(blocks))
    if dist.get_rank() == 0:
        with open(os.path.join(out, "norms.json"), "w") as sink:
            json.dump(list(result["grad_norms"].values()), sink)


def grad_norms(tmp_path, dp: int, zero_stage: int) -> list[float | None]:
    out = tmp_path / f"dp{dp}-zero{zero_stage}"
    out.mkdir()
    run_on_gloo(dp, _grad_norms, str(out), dp, zero_stage)
    return json.loads((out / "norms.json").read_text())


@pytest.mark.parametrize("dp", [1, 2])
def test_zero0_reports_the_norm_zero1_reports(tmp_path, dp):
    zero1 = grad_norms(tmp_path, dp, 1)
    zero0 = grad_norms(tmp_path, dp, 0)
    assert len(zero1) == 3 and None not in zero1
    assert zero0 == pytest.approx(zero1, rel=1e-5)
