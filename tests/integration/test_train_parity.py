"""Every parallel layout trains like the serial model: same losses for 10 steps (fp32, 1e-5),
through the real TorchTrainer with DeepSpeed on gloo workers."""

from __future__ import annotations

import pytest

from raytron.config import load_config
from raytron.train.ray_trainer import fit
from tests.integration.conftest import blocks_dataset

STEPS = 10
TOLERANCE = 1e-5
BASE = [
    "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
    "model.max_position_embeddings=64", "train.seq_len=32", "train.steps=10", "train.micro_batch_size=2",
    "train.grad_accum_steps=2", "train.lr=1e-3", "train.warmup_steps=2", "train.grad_clip=1.0",
    "train.threads=1", "parallel.zero_stage=1",
]
# every layout keeps the global batch at 4 sequences
LAYOUTS = {
    "pp2": ["parallel.pp=2"],
    "dp2": ["parallel.dp=2", "train.grad_accum_steps=1"],
    "tp2": ["parallel.tp=2"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
}


def run(tmp_path, text_blocks, overrides, name):
    cfg = load_config("jobs/configs/tiny_smoke.yaml",
                      BASE + overrides + [f"train.storage_path={tmp_path / name}", f"name={name}"])
    result = fit(cfg, blocks_dataset(text_blocks.train_blocks, 64), run_name=name)
    return result.metrics["losses"]


@pytest.fixture(scope="module")
def serial_losses(ray_cluster, text_blocks, tmp_path_factory):
    return run(tmp_path_factory.mktemp("serial"), text_blocks, [], "serial")


@pytest.mark.parametrize("layout", [
    "pp2", "dp2", "tp2", pytest.param("pp2_tp2", marks=pytest.mark.slow),
])
def test_layout_matches_serial_losses(layout, serial_losses, ray_cluster, text_blocks, tmp_path):
    losses = run(tmp_path, text_blocks, LAYOUTS[layout], layout)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert serial_losses[STEPS] < serial_losses[1]  # it is learning, not just agreeing
    for step in range(1, STEPS + 1):
        assert abs(losses[step] - serial_losses[step]) < TOLERANCE, (step, losses[step], serial_losses[step])
