"""The training engine with model.init_from: a pipelined (pp=2) DeepSpeed engine over a tied Llama with
GQA and llama3 RoPE starts from the folder's weights: its loss equals transformers' on the same batch."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from tests.distributed.gloo import run_on_gloo
from tests.hf_models import VOCAB, save_tiny

SEQ = 16


def _engine_loss(folder: str, block: torch.Tensor, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from raytron.parallel.hf_import import resolve_init_from
    from raytron.parallel.topology import Topology
    from raytron.train.engine import TrainingEngine

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = resolve_init_from({"model": {"init_from": folder},
                             "train": {"seq_len": SEQ, "micro_batch_size": 2, "grad_accum_steps": 1},
                             "parallel": {"pp": 2, "zero_stage": 1}})
    engine = TrainingEngine(cfg, Topology.from_world(1, 2, 1))
    loss = engine.eval_loss([block])
    if dist.get_rank() == 0:
        with open(out, "w") as sink:
            json.dump(loss, sink)


def test_pipelined_engine_starts_from_the_imported_weights(tmp_path):
    theirs = save_tiny("llama-tied", tmp_path / "llama")
    block = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(4))  # (mb, T+1)
    with torch.no_grad():
        logits = theirs(block[:, :-1]).logits  # (mb, T, V)
    expected = F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten()).item()
    out = tmp_path / "loss.json"
    run_on_gloo(2, _engine_loss, str(tmp_path / "llama"), block, str(out))
    assert abs(json.loads(out.read_text()) - expected) < 1e-5
