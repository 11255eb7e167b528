"""The training loop: short, and the same under Ray Train, torchrun or one process."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from raytron.config import RaytronConfig
from raytron.parallel.topology import Topology
from raytron.train.batches import BlockSource, StepBatches
from raytron.train.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from raytron.train.engine import TrainingEngine
from raytron.train.metrics import StepMeter
from raytron.train.session import Session


class NonFiniteLoss(RuntimeError):
    pass


def record_consumed(ledger: Path, dp_index: int, step: int, ids: list[int]) -> None:
    ledger.mkdir(parents=True, exist_ok=True)
    with open(ledger / f"dp{dp_index}.jsonl", "a") as out:
        out.write(json.dumps({"step": step, "ids": ids}) + "\n")


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def evaluate(engine: TrainingEngine, source: BlockSource, cfg: RaytronConfig, topology: Topology) -> dict[str, float]:
    batches = StepBatches(source, cfg, topology, split="validation")
    loss = engine.eval_loss(batches.next())
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def train(cfg: RaytronConfig, topology: Topology, session: Session, train_source: BlockSource,
          val_source: BlockSource | None = None, tokenizer_json: str | None = None,
          mlflow_run_id: str | None = None, data_manifest_hash: str | None = None) -> dict:
    """Run to ``cfg.train.steps``, resuming from the session's latest checkpoint.
    Returns the last step's metrics plus ``losses`` and ``grad_norms``: {step: value} of the steps this call ran."""
    engine = TrainingEngine(cfg, topology)
    batches = StepBatches(train_source, cfg, topology)
    step = 0
    with session.latest_checkpoint() as folder:
        if folder is not None:
            step = load_checkpoint(folder, engine, batches).step
    meter = StepMeter(cfg)
    metrics: dict = {"step": step}
    losses, grad_norms = {}, {}
    while step < cfg.train.steps:
        meter.start()
        micro_batches = batches.next()
        loss = engine.train_step(micro_batches)
        step += 1
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step}; stopped without checkpointing, "
                                "the last good checkpoint is intact")
        metrics = meter.finish(step, loss, engine.lr, engine.grad_norm, batches.wait_seconds)
        losses[step], grad_norms[step] = loss, metrics.get("grad_norm")
        if val_source is not None and cfg.train.eval_every and _due(step, cfg.train.eval_every, cfg.train.steps):
            metrics.update(evaluate(engine, val_source, cfg, topology))
        checkpoint = None
        if _due(step, cfg.train.checkpoint_every, cfg.train.steps):
            started = time.perf_counter()
            meta = CheckpointMeta(step, batches.position, cfg.to_dict(), cfg.padded_vocab_size, mlflow_run_id,
                                  {"data_manifest_hash": data_manifest_hash} if data_manifest_hash else {})
            checkpoint = save_checkpoint(session.scratch_dir(step), engine, meta, tokenizer_json)
            metrics["checkpoint_time_s"] = time.perf_counter() - started
        if cfg.train.data_ledger and batches.is_reader:
            record_consumed(Path(cfg.train.data_ledger), topology.dp_index, step, batches.last_ids)
        if checkpoint is not None or _due(step, cfg.train.log_every, cfg.train.steps):
            session.report(metrics, checkpoint)
        session.publish(metrics)
    return {**metrics, "losses": losses, "grad_norms": grad_norms}
