"""Sweeps: `raytron tune` of the smoke sweep vs its 4 configs run one after another with `raytron train`
(goal <= 0.8), and ASHA vs the full grid on the same space (goal: best loss within 2% with <= 60% of the
grid's trial-steps).

Every run is its own command, as a user types it, each with RAY_ADDRESS=local (its own cluster) and its
own storage and MLflow store in a temp folder, so what a sweep saves (one cluster, one data preparation,
trials side by side) is what is measured. The demo corpus is built once beforehand, into the shared
workdir every command uses, so no side pays for building it. The ASHA sweep (tune_smoke.yaml as it is)
runs once and serves both parts; the full-grid sweep does the same steps as the 4 `raytron train`s, so
its ratio to them is what one cluster, data once and 2 trials at once save without early stopping.

    .venv/bin/python bench/bench_tune.py                  # ~7 min: ASHA sweep, grid sweep, 4 x train
    .venv/bin/python bench/bench_tune.py --parts sweep    # ASHA sweep and 4 x train
    .venv/bin/python bench/bench_tune.py --parts asha     # ASHA sweep and grid sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from raytron.tune.tracking import PARENT_TAG

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "tune_smoke.yaml"


def command(subcommand: str, storage: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "raytron.cli", subcommand, str(SMOKE), f"--set=train.storage_path={storage}",
            *(f"--set={override}" for override in overrides)]


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def timed(args: list[str], workdir: Path, store: Path) -> tuple[float, str]:
    env = {**os.environ, "RAY_ADDRESS": "local", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": tracking_uri(store), "PYTHONPATH": str(REPO / "platform")}
    started = time.monotonic()
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def sweep(tmp: Path, scheduler: str) -> dict:
    """One `raytron tune` of the smoke sweep: wall time, best loss, and its trial-steps twice: the steps the
    scheduler charged (the ranked table's STEP column) and the steps the workers ran (the child runs' loss
    histories; a stopped trial's workers notice a step or two late)."""
    seconds, stdout = timed(command("tune", tmp / scheduler, [f"tune.scheduler={scheduler}",
                                                              f"tune.name=bench-{scheduler}"]), tmp, tmp)
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    summary, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))  # Ray may print after it
    table = [line.split() for line in lines[:start] if line and line.split()[0].isdigit()]
    client = MlflowClient(tracking_uri(tmp))
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    ran = sum(len(client.get_metric_history(child.info.run_id, "loss")) for child in children)
    return {"seconds": seconds, "best_loss": summary["best_loss"], "charged": sum(int(row[-2]) for row in table),
            "ran": ran, "trials": len(table)}


def sequential(tmp: Path) -> float:
    """The smoke sweep's 4 configs, one `raytron train` command after another (each all train.steps)."""
    total = 0.0
    for lr, warmup in itertools.product((3.0e-3, 1.0e-5), (0, 2)):  # tune_smoke.yaml's grid
        seconds, _ = timed(command("train", tmp / "train", [f"train.lr={lr}", f"train.warmup_steps={warmup}"]),
                           tmp, tmp)
        print(f"  raytron train lr={lr:g} warmup={warmup}: {seconds:.0f} s", flush=True)
        total += seconds
    return total


def report_sweep(run: dict, name: str) -> None:
    print(f"{name}: {run['seconds']:.0f} s, best loss {run['best_loss']:.4f}, {run['trials']} trials, "
          f"{run['charged']} trial-steps charged by the scheduler, {run['ran']} run by the workers", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("sweep", "asha"), default=["sweep", "asha"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        tmp = Path(tmp)
        # build the demo corpus once, where every command looks for it (.raytron under its cwd)
        subprocess.run([sys.executable, "-c", "from raytron.config import load_config;"
                        "from raytron.data.sources import list_sources;"
                        f"list_sources(load_config({str(SMOKE)!r}), '.raytron')"],
                       cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO / "platform")}, check=True)
        print(f"load: {os.getloadavg()[0]:.1f} (1-minute average, {os.cpu_count()} cores)", flush=True)
        runs = {"asha": sweep(tmp, "asha")}  # the smoke sweep as configured
        report_sweep(runs["asha"], "raytron tune, ASHA (tune_smoke.yaml)")
        if "asha" in args.parts:
            runs["fifo"] = sweep(tmp, "fifo")
            report_sweep(runs["fifo"], "raytron tune, full grid (fifo)")
        if "sweep" in args.parts:
            sequential_s = sequential(tmp)
            print(f"4 x raytron train: {sequential_s:.0f} s")
            for scheduler, what in (("asha", "ASHA sweep"), ("fifo", "full-grid sweep, the same steps")):
                if scheduler in runs:
                    print(f"{what} / sequential: {runs[scheduler]['seconds'] / sequential_s:.2f} (goal <= 0.8)")
        if "asha" in args.parts:
            grid, asha = runs["fifo"], runs["asha"]
            print(f"ASHA vs full grid: best loss {100 * (asha['best_loss'] / grid['best_loss'] - 1):+.2f}% (goal "
                  f"within 2%); trial-steps charged {100 * asha['charged'] / grid['charged']:.0f}%, run by the "
                  f"workers {100 * asha['ran'] / grid['ran']:.0f}% of the grid's (goal <= 60%)")
        print(f"load at the end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
