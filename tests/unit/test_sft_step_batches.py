"""SFT columns through StepBatches in one process: micro-batches carry the mask and segments of their
rows and the loss scale of the global batch; pretraining batches carry none; streaming refuses SFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytron.config import load_config
from raytron.parallel.topology import Topology
from raytron.train.batches import ArraySource, StepBatches

CONFIG = "jobs/configs/tiny_smoke.yaml"
STEP = ["train.seq_len=8", "train.micro_batch_size=2", "train.grad_accum_steps=2"]


def test_micro_batches_carry_the_sft_columns_and_the_global_scale():
    cfg = load_config(CONFIG, STEP)
    tokens = np.arange(8 * 9).reshape(8, 9)
    loss_mask = np.zeros((8, 9), dtype=bool)
    loss_mask[:, 5:] = True  # 4 scored targets per row
    loss_mask[1, 0] = True  # position 0 is never a target: not counted
    segments = np.repeat(np.arange(8)[:, None], 9, axis=1)
    batches = StepBatches(ArraySource(tokens, loss_mask, segments), cfg, Topology.single())
    micro_batches = batches.next()
    assert len(micro_batches) == 2
    first = micro_batches[0]
    assert torch.equal(first.tokens, torch.as_tensor(tokens[:2]))
    assert first.loss_mask.dtype == torch.bool and torch.equal(first.loss_mask, torch.as_tensor(loss_mask[:2]))
    assert torch.equal(micro_batches[1].segments, torch.as_tensor(segments[2:4]))
    assert first.loss_scale == pytest.approx(2 * 1 / 16)  # accum x dp / (4 rows x 4 scored)


def test_pretraining_micro_batches_have_no_sft_columns():
    cfg = load_config(CONFIG, STEP)
    tokens = np.arange(8 * 9).reshape(8, 9)
    micro_batches = StepBatches(ArraySource(tokens), cfg, Topology.single()).next()
    assert [batch.loss_mask for batch in micro_batches] == [None, None]
    assert [batch.loss_scale for batch in micro_batches] == [None, None]
    assert torch.equal(micro_batches[1].tokens, torch.as_tensor(tokens[2:4]))


def test_a_batch_without_scored_targets_is_refused():
    cfg = load_config(CONFIG, STEP)
    tokens = np.zeros((4, 9), dtype=np.int64)
    with pytest.raises(ValueError, match="no scored tokens"):
        StepBatches(ArraySource(tokens, np.zeros((4, 9), dtype=bool)), cfg, Topology.single()).next()
