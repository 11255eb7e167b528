"""Training throughput of Ray Train + DeepSpeed vs a bare PyTorch loop (goal >= 0.97).

One process starts a local Ray cluster, then runs in turn, round by round, order reversed every
other round so drift in machine load hits each alike:

  bare     plain PyTorch in this process: build_model, torch.optim.AdamW (same param groups,
           betas, weight decay), the warmup+cosine LambdaLR, clip_grad_norm_, the same blocks
           in the same order, the same torch threads
  ray      raytron.train.ray_trainer.fit with 1 worker, fp32, and an MLflow run (sqlite in a
           temp folder), as `raytron train` does

Steady state excludes the first --warmup steps and the last step (its checkpoint lands in it):
tokens/s = tokens per step x steps in the window / wall time of the window. For the bare loop the
window is timed around the whole iteration; for Ray the train function is wrapped
(bench/worker_marks.py) and the window runs from the end of step `warmup`'s publish to the end of
step `steps-1`'s, so it holds everything a step costs: data, compute, ray.train.report (on log and
checkpoint steps), MLflow, Prometheus. The per-step losses of bare and Ray are compared too (same
model, data and optimizer must give the same numbers). Besides the pooled tokens/s, the ratio of
median step periods is printed: on a shared machine a burst of other load lengthens a few steps,
which moves the mean far more than the median. Each round also prints the CPU milliseconds per
step of every process over the window (bench/cpu_sampler.py), which other users' load hardly moves.

Time to the first step is bench/bench_startup.py.

    .venv/bin/python bench/bench_train.py                 # ~3 minutes on 2 shared cores
    .venv/bin/python bench/bench_train.py --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raytron.config import RaytronConfig, load_config  # noqa: E402
from raytron.data.demo_data import demo_data  # noqa: E402
from raytron.model.gpt import build_model  # noqa: E402
from raytron.train import ray_trainer  # noqa: E402

import worker_marks  # noqa: E402  (bench/, next to this file)
from cpu_sampler import CpuSampler  # noqa: E402
from raytron.train.schedule import lr_multiplier  # noqa: E402

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


def timed_fit(cfg: RaytronConfig, dataset, marks_dir: Path, mlflow: bool, run_name: str):
    """fit() with the wrapped worker; returns (result, {rank: marks})."""
    from raytron.tracking.mlflow_run import RunTracker

    tracker = RunTracker.start(cfg) if mlflow else None
    restore = worker_marks.install(marks_dir)
    try:
        result = ray_trainer.fit(cfg, dataset, mlflow_run_id=tracker.run_id if tracker else None, run_name=run_name)
    finally:
        restore()
    if tracker is not None:
        tracker.finish()
    return result, worker_marks.read(marks_dir)


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
           "step_s_median": float(np.median(periods)), "window": (ends[warmup - 1], ends[last - 1]), "steps": steps}
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
    sampler = CpuSampler([os.getpid()], driver=os.getpid())
    sampler.start()
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
                time.sleep(2 * sampler.period)  # a sample past the window's end
                cpu = sampler.cpu_by_kind(*figures["window"])
                figures["cpu_ms_per_step"] = {kind: 1e3 * seconds / figures["steps"] for kind, seconds in cpu.items()}
                results[name].append(figures)
                losses[name] = run["losses"]
                extra = "".join(f", {key} {figures[key]:.1f}" for key in (
                    "data_ms", "compute_ms", "ray.train.report_ms", "mlflow+prom_ms") if key in figures)
                print(f"  round {round_index + 1} {name:13s} {figures['tokens_per_s']:8.1f} tokens/s  "
                      f"step {1e3 * figures['step_s_mean']:.1f} ms mean, {1e3 * figures['step_s_median']:.1f} ms "
                      f"median{extra}  [{figures['load']}]", flush=True)
                busiest = sorted(figures["cpu_ms_per_step"].items(), key=lambda item: -item[1])
                print("      CPU ms per step, all processes: " + f"{sum(v for _, v in busiest):.0f} = " +
                      ", ".join(f"{kind} {ms:.0f}" for kind, ms in busiest if ms >= 1), flush=True)
    finally:
        sampler.running = False
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
    medians = {name: statistics.median(f["step_s_median"] for f in runs) for name, runs in results.items()}
    if "ray" in medians and "bare" in medians:
        print(f"  median step period: bare {1e3 * medians['bare']:.1f} ms, ray {1e3 * medians['ray']:.1f} ms; "
              f"ratio of tokens/s at the median step {medians['bare'] / medians['ray']:.3f}")
    if "ray" in pooled and "bare" in pooled:
        ratio = pooled["ray"] / pooled["bare"]
        print(f"\n  RESULT throughput Ray Train + DeepSpeed / bare torch = {ratio:.3f} (goal >= 0.97: "
              f"{'met' if ratio >= 0.97 else 'NOT met'})  [{load()}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    throughput(parser.parse_args())


if __name__ == "__main__":
    main()
