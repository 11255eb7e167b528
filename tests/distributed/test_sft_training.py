"""SFT training on real gloo processes through the training loop and the DeepSpeed engines.

The same global batches of packed rows with uneven scored counts, split as (micro 4, accum 1),
(micro 1, accum 4), dp=2, pp=2, tp=2, pp=2 x tp=2 and pp=2 with activation checkpointing (the
segments recomputed with the blocks), give the same losses, gradient norms and validation loss; the first step's loss and norm are those of plain torch (masked mean cross-entropy of the
freshly initialised serial model over the whole global batch). At tp=2 a packed row's logits
equal each sample's alone, as in the serial model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytron.config import load_config
from raytron.model.gpt import build_model
from tests.distributed.gloo import run_on_gloo

SEQ, VOCAB, STEPS, GLOBAL = 16, 256, 3, 4
BASE = [f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        f"train.seq_len={SEQ}", f"train.steps={STEPS}", "train.warmup_steps=1", "train.lr=1e-2",
        "train.grad_clip=0.0", "parallel.zero_stage=1", "train.checkpoint_every=0", "train.keep_checkpoints=1",
        f"train.eval_every={STEPS}"]
LAYOUTS = {  # every split keeps the global batch at GLOBAL rows
    "micro4_accum1": ["train.micro_batch_size=4", "train.grad_accum_steps=1"],
    "micro1_accum4": ["train.micro_batch_size=1", "train.grad_accum_steps=4"],
    "dp2": ["train.micro_batch_size=1", "train.grad_accum_steps=2", "parallel.dp=2"],
    "pp2": ["train.micro_batch_size=2", "train.grad_accum_steps=2", "parallel.pp=2"],
    "tp2": ["train.micro_batch_size=2", "train.grad_accum_steps=2", "parallel.tp=2"],
    "pp2_tp2": ["train.micro_batch_size=2", "train.grad_accum_steps=2", "parallel.pp=2", "parallel.tp=2"],
    "pp2_recompute": ["train.micro_batch_size=2", "train.grad_accum_steps=2", "parallel.pp=2",
                      "train.activation_checkpointing=true"],
}


def sft_rows(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Packed rows per the SFT shard contract: 1-3 samples per row then padding (segment 0), each
    sample a prompt (unscored) and an answer (scored); scored counts differ widely between rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, SEQ + 1))
    loss_mask = np.zeros((rows, SEQ + 1), dtype=bool)
    segments = np.zeros((rows, SEQ + 1), dtype=np.int64)
    for row in range(rows):
        start = 0
        for segment in range(1, rng.integers(1, 4) + 1):
            length = int(rng.integers(3, 9))
            if start + length > SEQ + 1:
                break
            prompt = int(rng.integers(1, length))  # the sample's first token is never a target
            segments[row, start:start + length] = segment
            loss_mask[row, start + prompt:start + length] = True
            start += length
    return {"tokens": tokens, "loss_mask": loss_mask, "segments": segments}


def _train(out: str, layout: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from raytron.parallel.topology import Topology
    from raytron.train.batches import ArraySource
    from raytron.train.loop import train
    from raytron.train.session import LocalSession

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + LAYOUTS[layout])
    parallel = cfg.parallel
    result = train(cfg, Topology.from_world(parallel.dp, parallel.pp, parallel.tp),
                   LocalSession(os.path.join(out, "ckpt")), ArraySource(**sft_rows(GLOBAL * STEPS, seed=0)),
                   val_source=ArraySource(**sft_rows(GLOBAL, seed=1)))
    if dist.get_rank() == 0:
        with open(os.path.join(out, f"{layout}.json"), "w") as sink:
            json.dump({"losses": list(result["losses"].values()), "grad_norms": list(result["grad_norms"].values()),
                       "val_loss": result["val_loss"]}, sink)


def run_layout(tmp_path, layout: str) -> dict:
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + LAYOUTS[layout])
    parallel = cfg.parallel
    run_on_gloo(parallel.dp * parallel.pp * parallel.tp, _train, str(tmp_path), layout)
    return json.loads((tmp_path / f"{layout}.json").read_text())


def torch_first_step() -> tuple[float, float]:
    """Masked mean cross-entropy of the first global batch and its gradient norm, in plain torch."""
    cfg = load_config("jobs/configs/tiny_smoke.yaml", BASE + LAYOUTS["micro4_accum1"])
    model = build_model(cfg.model, cfg.train.seed, padded_vocab=cfg.padded_vocab_size)
    batch = {name: torch.as_tensor(column[:GLOBAL]) for name, column in sft_rows(GLOBAL * STEPS, seed=0).items()}
    logits = model(batch["tokens"][:, :-1], segments=batch["segments"][:, :-1])  # (B, T, V)
    targets = batch["tokens"][:, 1:].masked_fill(~batch["loss_mask"][:, 1:], -100)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    norm = torch.cat([param.grad.flatten() for param in model.parameters()]).norm()
    return loss.item(), norm.item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("sft"), "micro4_accum1")


def test_first_step_is_the_global_masked_mean(reference):
    loss, norm = torch_first_step()
    assert reference["losses"][0] == pytest.approx(loss, abs=1e-5)
    assert reference["grad_norms"][0] == pytest.approx(norm, rel=1e-4)
    assert reference["losses"][-1] < reference["losses"][0]  # it learns


@pytest.mark.parametrize("layout", ["micro1_accum4", "dp2", "pp2", "tp2", "pp2_tp2", "pp2_recompute"])
def test_every_split_trains_like_one_micro_batch(layout, reference, tmp_path):
    result = run_layout(tmp_path, layout)
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)


def _tp_packed_logits(flavour: str) -> None:
    from tests.distributed.test_tensor_parallel import serial_and_parallel, tiny
    from tests.unit.test_sft_packing import packed_row

    cfg = tiny(flavour, **({"num_kv_heads": 2} if flavour == "llama" else {}))
    serial, parallel, _ = serial_and_parallel(cfg, tp=2)
    tokens, segments, samples = packed_row(cfg.vocab_size)
    with torch.no_grad():
        packed = parallel.layers.gather_logits(parallel(tokens, segments=segments))[0]  # (ROW, V)
        start = 0
        for sample in samples:
            torch.testing.assert_close(packed[start:start + len(sample)], serial(sample[None])[0], atol=1e-5, rtol=0)
            start += len(sample)


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_tp2_packed_row_logits_equal_each_sample_alone(flavour):
    run_on_gloo(2, _tp_packed_logits, flavour)
