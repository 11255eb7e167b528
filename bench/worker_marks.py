"""Worker-side timestamps for the training benchmarks, without editing the platform.

The platform has no hook for them, so a bench replaces raytron.train.ray_trainer._worker in its own
process with a wrapper (``install``). Ray pickles the wrapper by value; in the worker it patches, for
that process only, deepspeed.init_distributed, loop.TrainingEngine (init, train_step),
loop.StepBatches.next, RaySession.report/publish and ray.train.report to note time.time(), calls the
real _worker, and writes the marks to <marks_dir>/rank<N>.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from raytron.train import ray_trainer


def install(marks_dir: Path):
    """Put the wrapper in place; returns the function that puts the real _worker back."""
    shutil.rmtree(marks_dir, ignore_errors=True)
    marks_dir.mkdir(parents=True)
    original = ray_trainer._worker
    ray_trainer._worker = timed_worker_factory(str(marks_dir))

    def restore() -> None:
        ray_trainer._worker = original
    return restore


def read(marks_dir: Path) -> dict[int, dict]:
    """{rank: marks} written by the wrapped workers."""
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in marks_dir.glob("rank*.json")}


def timed_worker_factory(marks_dir: str):
    """The wrapper put in place of ray_trainer._worker (a closure: Ray ships it by value)."""

    def timed_worker(payload: dict) -> dict:
        entered = time.time()
        import deepspeed
        import psutil
        import ray.train
        from raytron.train import loop, ray_session
        from raytron.train import ray_trainer as real

        marks = {"process_created": psutil.Process().create_time(), "entered": entered, "imported": time.time(),
                 "step_end": [], "batch_ready": [], "report_end": [], "report_s": [], "ray_report_s": []}
        saved = (deepspeed.init_distributed, loop.TrainingEngine, loop.StepBatches,
                 ray_session.RaySession.report, ray_session.RaySession.publish, ray.train.report)
        init_distributed, engine_cls, batches_cls, session_report, session_publish, train_report = saved

        def timed_init_distributed(*a, **k):
            marks["init_distributed_start"] = time.time()
            out = init_distributed(*a, **k)
            marks["init_distributed_end"] = time.time()
            return out

        class TimedEngine(engine_cls):
            def __init__(self, *a, **k):
                marks["engine_start"] = time.time()
                super().__init__(*a, **k)
                marks["engine_built"] = time.time()

            def train_step(self, micro_batches):
                loss = super().train_step(micro_batches)
                marks["step_end"].append(time.time())
                return loss

        class TimedBatches(batches_cls):
            def next(self):
                out = super().next()
                marks["batch_ready"].append(time.time())
                return out

        pending = {"report_s": 0.0, "ray_report_s": 0.0}  # report time since the last publish

        def timed_session_report(self, metrics, checkpoint):
            started = time.perf_counter()
            session_report(self, metrics, checkpoint)
            pending["report_s"] += time.perf_counter() - started

        def timed_session_publish(self, metrics):
            # every step ends with publish (the loop reports to Ray only on log/checkpoint steps)
            started = time.perf_counter()
            session_publish(self, metrics)
            marks["report_s"].append(pending["report_s"] + time.perf_counter() - started)
            marks["ray_report_s"].append(pending["ray_report_s"])
            pending.update(report_s=0.0, ray_report_s=0.0)
            marks["report_end"].append(time.time())

        def timed_train_report(*a, **k):
            started = time.perf_counter()
            train_report(*a, **k)
            pending["ray_report_s"] += time.perf_counter() - started

        deepspeed.init_distributed = timed_init_distributed
        loop.TrainingEngine, loop.StepBatches = TimedEngine, TimedBatches
        ray_session.RaySession.report = timed_session_report
        ray_session.RaySession.publish = timed_session_publish
        ray.train.report = timed_train_report
        try:
            return real._worker(payload)
        finally:
            (deepspeed.init_distributed, loop.TrainingEngine, loop.StepBatches,
             ray_session.RaySession.report, ray_session.RaySession.publish, ray.train.report) = saved
            rank = ray.train.get_context().get_world_rank()
            Path(marks_dir, f"rank{rank}.json").write_text(json.dumps(marks))

    return timed_worker
