"""A loss that turns NaN/inf stops the run with a clear message and leaves the last good checkpoint."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from tests.distributed.gloo import run_on_gloo


def _train_until_it_blows_up(root: str) -> None:
    import deepspeed

    from raytron.config import load_config
    from raytron.parallel.topology import Topology
    from raytron.train.batches import ArraySource
    from raytron.train.loop import NonFiniteLoss, train
    from raytron.train.session import LocalSession

    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("jobs/configs/tiny_smoke.yaml", [
        "model.vocab_size=256", "model.hidden_size=32", "train.seq_len=16", "train.micro_batch_size=2",
        "train.steps=20", "train.checkpoint_every=1", "train.warmup_steps=0", "train.grad_clip=0",
        "train.lr=1e12", "train.min_lr=0"])  # an absurd lr: weights explode within a few steps
    blocks = np.random.default_rng(0).integers(0, 256, (64, 17))
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step (\d+); stopped") as stopped:
        train(cfg, Topology.from_world(1, 1, 1), LocalSession(root, keep=20), ArraySource(blocks))
    bad_step = int(re.search(r"at step (\d+)", str(stopped.value)).group(1))
    with open(os.path.join(root, "bad_step"), "w") as out:
        out.write(str(bad_step))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run_on_gloo(1, _train_until_it_blows_up, str(tmp_path))
    bad_step = int((tmp_path / "bad_step").read_text())
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint_*"))
    assert bad_step > 1
    assert checkpoints[-1] == f"checkpoint_{bad_step - 1:08d}"  # the step before the NaN, complete
    assert (tmp_path / checkpoints[-1] / "meta.json").exists()
    assert not list(tmp_path.glob(".partial_*"))
