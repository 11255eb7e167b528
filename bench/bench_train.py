"""Training throughput of Ray Train + DeepSpeed vs a bare PyTorch loop, and time to first step.

Part 1, throughput (goal >= 0.97). One process starts a local Ray cluster, then runs in turn,
round by round, order reversed every other round so drift in machine load hits each alike:

  bare     plain PyTorch in this process: build_model, torch.optim.AdamW (same param groups,
           betas, weight decay), the warmup+cosine LambdaLR, clip_grad_norm_, the same blocks
           in the same order, the same torch threads
  ray      raytron.train.ray_trainer.fit with 1 worker, fp32, and an MLflow run (sqlite in a
           temp folder), as `raytron train` does

Steady state excludes the first --warmup steps and the last step (its checkpoint lands in it):
tokens/s = tokens per step x steps in the window / wall time of the window. For the bare loop the
window is timed around the whole iteration; for Ray the train function is wrapped (see below) and
the window runs from the end of step `warmup`'s publish to the end of step `steps-1`'s, so it holds
everything a step costs: data, compute, ray.train.report (on log and checkpoint steps), MLflow,
Prometheus. The per-step losses of
bare and Ray are compared too (same model, data and optimizer must give the same numbers).

Part 2, start-up (goal <= 20 s): a child process (so the clock starts at process creation) does
what `raytron train` does -- imports, ray.init (a new local cluster with the dashboard, as
raytron.train.cluster.connect's fallback), demo data as Ray Datasets, an MLflow run, fit() with
2 workers (pp=2 by default) -- and prints the timeline up to the first finished step, with the
controller's own milestones read from Ray Train's system log.

Worker-side timestamps: the platform has no hook for them, so the bench replaces
raytron.train.ray_trainer._worker in this process with a wrapper (no file is edited). Ray pickles the
wrapper by value; in the worker it patches, for that process only, deepspeed.init_distributed,
loop.TrainingEngine (init, train_step), loop.StepBatches.next, RaySession.report/publish and
ray.train.report to note time.time(), calls the real _worker, and writes the marks to a JSON file.

    .venv/bin/python bench/bench_train.py                 # both parts (~4-5 minutes on 2 shared cores)
    .venv/bin/python bench/bench_train.py --part throughput --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()  # before the heavy imports: part 2's clock starts here
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raytron.config import RaytronConfig, load_config  # noqa: E402
from raytron.data.demo_data import demo_data  # noqa: E402
from raytron.model.gpt import build_model  # noqa: E402
from raytron.train import ray_trainer  # noqa: E402
from raytron.train.schedule import lr_multiplier  # noqa: E402

IMPORTED = time.time()
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".raytron"  # raytron train's own workdir: the demo corpus cache is shared
CORPUS_BYTES = 1_000_000


def bench_config(args, extra: list[str]) -> RaytronConfig:
    return load_config(REPO / "jobs/configs/tiny_smoke.yaml", [
        f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}", f"model.max_position_embeddings={args.seq}", f"train.seq_len={args.seq}",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1", f"train.steps={args.steps}",
        "train.warmup_steps=5", "train.grad_clip=1.0", f"train.threads={args.threads}", "train.precision=fp32",
        "parallel.zero_stage=0", *extra])


def blocks(args) -> np.ndarray:
    data = demo_data(DATA_DIR, CORPUS_BYTES, args.vocab, args.seq)
    if data.vocab_size != args.vocab:
        raise SystemExit(f"the demo tokenizer has {data.vocab_size} tokens, not --vocab {args.vocab}")
    return data.train_blocks


def as_dataset(rows: np.ndarray):
    return ray.data.from_items([{"tokens": row, "id": index} for index, row in enumerate(rows)])


def start_ray(num_cpus: int, dashboard: bool) -> None:
    # a new cluster every time (address="local"): never join another engineer's `ray start`
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=False)


# ---------------------------------------------------------------- worker-side timestamps


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


def timed_fit(cfg: RaytronConfig, dataset, marks_dir: Path, mlflow: bool, run_name: str,
              driver_marks: dict | None = None):
    """fit() with the wrapped worker; returns (result, {rank: marks})."""
    from raytron.tracking.mlflow_run import RunTracker

    shutil.rmtree(marks_dir, ignore_errors=True)
    marks_dir.mkdir(parents=True)
    tracker = RunTracker.start(cfg) if mlflow else None
    if driver_marks is not None:
        driver_marks["mlflow_run"] = time.time()
    original = ray_trainer._worker
    ray_trainer._worker = timed_worker_factory(str(marks_dir))
    try:
        result = ray_trainer.fit(cfg, dataset, mlflow_run_id=tracker.run_id if tracker else None, run_name=run_name)
    finally:
        ray_trainer._worker = original
    if tracker is not None:
        tracker.finish()
    marks = {int(p.stem[4:]): json.loads(p.read_text()) for p in marks_dir.glob("rank*.json")}
    return result, marks


# ---------------------------------------------------------------- part 1: throughput


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_bare(cfg: RaytronConfig, rows: np.ndarray) -> dict:
    train = cfg.train
    torch.manual_seed(train.seed)
    model = build_model(cfg.model, train.seed, padded_vocab=cfg.padded_vocab_size)
    optimizer = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=train.lr, betas=train.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, train=train))
    ends, losses = [], {}
    for step in range(1, train.steps + 1):
        block = torch.as_tensor(rows[(step - 1) * train.micro_batch_size: step * train.micro_batch_size]).long()
        inputs, targets = block[:, :-1], block[:, 1:]  # (mb, T) each
        loss = model.loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        losses[step] = loss.item()
        ends.append(time.time())
    return {"ends": ends, "losses": losses}


def run_ray(cfg: RaytronConfig, rows: np.ndarray, workdir: Path, tag: str) -> dict:
    result, marks = timed_fit(cfg, as_dataset(rows), workdir / "marks", True, tag)
    m = marks[0]
    return {"ends": m["report_end"], "losses": {int(k): v for k, v in result.metrics["losses"].items()},
            "report_s": m["report_s"], "ray_report_s": m["ray_report_s"], "step_end": m["step_end"],
            "batch_ready": m["batch_ready"]}


def steady(run: dict, warmup: int, tokens_per_step: int) -> dict:
    ends = run["ends"]  # ends[i] = end of step i+1
    last = len(ends) - 1  # step `len` is left out (the checkpoint lands in it)
    window = ends[last - 1] - ends[warmup - 1]
    steps = last - warmup
    periods = np.diff(ends[warmup - 1:last])
    out = {"tokens_per_s": tokens_per_step * steps / window, "step_s_mean": window / steps,
           "step_s_median": float(np.median(periods))}
    if "report_s" in run:
        # per step: data = previous report's end -> batch in hand; compute = batch -> train_step done;
        # report = RaySession.report, of which ray.train.report is one part and MLflow + Prometheus the rest
        window = slice(warmup, last)
        out["data_ms"] = 1e3 * statistics.mean(b - e for b, e in zip(run["batch_ready"][window],
                                                                      ends[warmup - 1:last - 1]))
        out["compute_ms"] = 1e3 * statistics.mean(e - b for e, b in zip(run["step_end"][window],
                                                                         run["batch_ready"][window]))
        out["ray.train.report_ms"] = 1e3 * statistics.mean(run["ray_report_s"][window])
        out["mlflow+prom_ms"] = 1e3 * statistics.mean(r - t for r, t in zip(run["report_s"][window],
                                                                            run["ray_report_s"][window]))
    return out


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def throughput(args) -> None:
    variants = args.variants.split(",")
    cfg = bench_config(args, [])
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.seq_len
    rows = blocks(args)[: cfg.train.steps * cfg.train.micro_batch_size]
    if len(rows) < cfg.train.steps * cfg.train.micro_batch_size:
        raise SystemExit(f"only {len(rows)} blocks: lower --steps")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the Ray workers started below
    workdir = Path(tempfile.mkdtemp(prefix="raytron-bench-train-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    print(f"part 1: throughput. hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, micro batch {args.micro_batch} ({tokens_per_step} tokens/step), fp32, "
          f"{args.threads} torch thread(s), {args.steps} steps/run, window steps {args.warmup + 1}..{args.steps - 1}, "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs; {load()}", flush=True)
    start_ray(num_cpus=4, dashboard=False)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    losses: dict[str, dict] = {}
    try:
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for name in order:
                cfg_run = bench_config(args, [f"train.storage_path={workdir / 'runs'}", f"name=bench-{name}"])
                before = load()
                if name == "bare":
                    run = run_bare(cfg_run, rows)
                else:
                    run = run_ray(cfg_run, rows, workdir, f"{name}-{round_index}")
                figures = steady(run, args.warmup, tokens_per_step)
                figures["load"] = f"{before} -> {load()}"
                results[name].append(figures)
                losses[name] = run["losses"]
                extra = "".join(f", {key} {figures[key]:.1f}" for key in (
                    "data_ms", "compute_ms", "ray.train.report_ms", "mlflow+prom_ms") if key in figures)
                print(f"  round {round_index + 1} {name:13s} {figures['tokens_per_s']:8.1f} tokens/s  "
                      f"step {1e3 * figures['step_s_mean']:.1f} ms mean, {1e3 * figures['step_s_median']:.1f} ms "
                      f"median{extra}  [{figures['load']}]", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n  variant        tokens/s (all rounds: total tokens / total window time)   ratio to bare")
    pooled = {name: 1.0 / statistics.mean(1.0 / f["tokens_per_s"] for f in runs) for name, runs in results.items()}
    for name, value in pooled.items():
        ratio = f"{value / pooled['bare']:.3f}" if "bare" in pooled else "-"
        per_round = " ".join(f"{f['tokens_per_s'] / b['tokens_per_s']:.3f}"
                             for f, b in zip(results[name], results.get("bare", [])))
        print(f"  {name:13s} {value:9.1f}{'':48s}{ratio}  (per round: {per_round})")
    if "bare" in losses:
        for name in variants:
            if name != "bare":
                diff = max(abs(losses[name][s] - losses["bare"][s]) for s in losses["bare"])
                print(f"  max |loss difference| {name} vs bare over {len(losses['bare'])} steps: {diff:.2e}")
    if "ray" in pooled and "bare" in pooled:
        ratio = pooled["ray"] / pooled["bare"]
        print(f"\n  RESULT throughput Ray Train + DeepSpeed / bare torch = {ratio:.3f} (goal >= 0.97: "
              f"{'met' if ratio >= 0.97 else 'NOT met'})  [{load()}]", flush=True)


# ---------------------------------------------------------------- part 2: start-up


def startup_child(args) -> None:
    """Runs in its own process; prints one JSON line of absolute timestamps."""
    t = {"process_start": PROCESS_START, "imported": IMPORTED}

    layout = [f"parallel.{axis}={n}" for axis, n in (("dp", args.startup_dp), ("pp", args.startup_pp)) if n > 1]
    workdir = Path(tempfile.mkdtemp(prefix="raytron-bench-startup-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cfg = bench_config(args, [*layout, "parallel.zero_stage=1", "train.steps=2", "train.warmup_steps=1",
                              f"train.storage_path={workdir / 'runs'}", "name=bench-startup"])
    try:
        start_ray(num_cpus=max(os.cpu_count() or 1, int(cfg.world_size * cfg.resources.cpus_per_worker) + 2),
                  dashboard=True)
        t["ray_init"] = time.time()
        rows = blocks(args)
        train_ds = as_dataset(rows[: 4 * cfg.train.micro_batch_size * cfg.parallel.dp])
        t["data"] = time.time()
        _, marks = timed_fit(cfg, train_ds, workdir / "marks", mlflow=True, run_name="bench-startup", driver_marks=t)
        t["fit_return"] = time.time()
        t["controller"] = controller_phases()
        t["world_size"] = cfg.world_size
        t["layout"] = " ".join(layout)
        t["marks"] = marks
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    print("STARTUP_JSON " + json.dumps(t), flush=True)


def controller_phases() -> list[tuple[str, float]]:
    """(message, epoch seconds) of Ray Train's controller milestones, from its system log."""
    from datetime import datetime

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())  # no public API for it
    except AttributeError:
        return []
    wanted = ("Requesting resources", "Placement group ready", "worker actors created",
              "Train context initialized", "Train function launched")
    phases = []
    for log in sorted(session.glob("logs/train/ray-train-sys-controller-*.log")):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = record.get("message", "")
            if any(key in message for key in wanted):
                stamp = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                phases.append((message.split("\n")[0].replace("[Worker Group Initialization] ", ""), stamp))
    return phases


def shm_op_builds() -> dict[str, float]:
    """mtime of every built DeepSpeed shm comm op (the JIT build every first init_distributed loads)."""
    from torch.utils.cpp_extension import _get_build_directory

    root = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent
    return {str(so): so.stat().st_mtime for so in root.glob("*/deepspeed_shm_comm.so")}


def startup(args) -> None:
    print(f"\npart 2: command start -> first finished step, {args.startup_runs} run(s), 2 workers; {load()}", flush=True)
    for run in range(args.startup_runs):
        before = load()
        builds = shm_op_builds()
        command = [sys.executable, __file__, "--part", "startup-child", *forwarded(args)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        line = next((l for l in out.stdout.splitlines() if l.startswith("STARTUP_JSON ")), None)
        if line is None:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit("start-up child failed")
        t = json.loads(line[len("STARTUP_JSON "):])
        marks = t["marks"].values()
        zero = t["process_start"]

        def latest(key, index=None):
            return max((m[key] if index is None else m[key][index]) for m in marks) - zero

        def earliest(key):
            return min(m[key] for m in marks) - zero

        phases = [
            ("driver: python + imports (torch, ray, deepspeed, mlflow, raytron)", t["imported"] - zero),
            ("driver: ray.init done (new local cluster, dashboard on)", t["ray_init"] - zero),
            ("driver: demo data (cached) -> Ray Dataset", t["data"] - zero),
            ("driver: MLflow run opened (new sqlite), fit() called", t["mlflow_run"] - zero),
            *[(f"controller log: {message[:50]}", stamp - zero) for message, stamp in t["controller"]],
            ("workers: first worker process created", earliest("process_created")),
            ("workers: last worker process created", latest("process_created")),
            ("WORKER START: train function entered (last rank)", latest("entered")),
            ("workers: deepspeed + raytron imported (last rank)", latest("imported")),
            ("workers: deepspeed.init_distributed done (last rank)", latest("init_distributed_end")),
            ("DEEPSPEED INIT: engine built (last rank)", latest("engine_built")),
            ("workers: first batch in hand (last rank)", latest("batch_ready", 0)),
            ("FIRST STEP FINISHED (last rank)", latest("step_end", 0)),
            ("workers: first step reported (last rank)", latest("report_end", 0)),
            ("driver: fit() returned (2 steps, final checkpoint, teardown)", t["fit_return"] - zero),
        ]
        print(f"  run {run + 1}: {t['layout']}  [{before} -> {load()}]")
        previous = 0.0
        for label, value in sorted(phases, key=lambda phase: phase[1]):
            print(f"    {label:66s} t={value:6.2f} s  (+{value - previous:5.2f})")
            previous = value
        if shm_op_builds() != builds:
            print("    NOTE: DeepSpeed's shm comm op was (re)built by JIT during this run: its build time is in it")
        first = latest("step_end", 0)
        print(f"  RESULT start-up: first finished step at {first:.2f} s after command start with {t['world_size']} "
              f"workers (goal <= 20 s: {'met' if first <= 20 else 'NOT met'})", flush=True)


def forwarded(args) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("part", "rounds", "startup_runs", "variants")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "throughput", "startup", "startup-child"], default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, bare loop and Ray worker alike")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="bare,ray", help="bare (plain torch loop), ray (raytron train)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--startup-runs", type=int, default=1)
    parser.add_argument("--startup-pp", type=int, default=2)
    parser.add_argument("--startup-dp", type=int, default=1)
    args = parser.parse_args()
    if args.part == "startup-child":
        startup_child(args)
        return
    if args.part in ("all", "throughput"):
        throughput(args)
    if args.part in ("all", "startup"):
        blocks(args)  # the demo data cache is built before the clock of the start-up child starts
        startup(args)


if __name__ == "__main__":
    main()
