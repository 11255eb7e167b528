"""Sweeps: `raytron tune` of the smoke sweep vs its 4 configs run one after another with `raytron train`
(goal <= 0.8), and ASHA vs the full grid on the same space (goal: best loss within 2% with <= 60% of the
grid's trial-steps).

Every run is its own command, as a user types it, each with RAY_ADDRESS=local (its own cluster) and its
own storage and MLflow store in a temp folder, so what a sweep saves (one cluster, one data preparation,
trials side by side) is what is measured. The demo corpus is built once beforehand, into the shared
workdir every command uses, so no side pays for building it.

    .venv/bin/python bench/bench_tune.py                  # ~15 minutes on 2 shared cores
    .venv/bin/python bench/bench_tune.py --parts sweep
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

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "tune_smoke.yaml"


def command(subcommand: str, storage: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "raytron.cli", subcommand, str(SMOKE), f"--set=train.storage_path={storage}",
            *(f"--set={override}" for override in overrides)]


def timed(args: list[str], workdir: Path, store: Path) -> tuple[float, str]:
    env = {**os.environ, "RAY_ADDRESS": "local", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(REPO / "platform")}
    started = time.monotonic()
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def sweep_vs_sequential(tmp: Path) -> None:
    sweep_s, _ = timed(command("tune", tmp / "sweep", []), tmp, tmp)
    grid = itertools.product((3.0e-3, 1.0e-5), (0, 2))  # tune_smoke.yaml's grid
    sequential_s = 0.0
    for lr, warmup in grid:
        seconds, _ = timed(command("train", tmp / "train", [f"train.lr={lr}", f"train.warmup_steps={warmup}"]),
                           tmp, tmp)
        sequential_s += seconds
    print(f"sweep {sweep_s:.0f} s, 4 x raytron train {sequential_s:.0f} s: ratio {sweep_s / sequential_s:.2f} "
          "(goal <= 0.8)")


def summary_and_steps(stdout: str) -> tuple[float, int]:
    """Best loss and the trial-steps of a sweep, from `raytron tune`'s ranked table and summary."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    summary = json.loads("\n".join(lines[start:]))
    table = [line.split() for line in lines[:start] if line and line.split()[0].isdigit()]
    return summary["best_loss"], sum(int(row[-2]) for row in table)


def asha_vs_grid(tmp: Path) -> None:
    results = {}
    for scheduler in ("fifo", "asha"):
        _, stdout = timed(command("tune", tmp / scheduler, [f"tune.scheduler={scheduler}",
                                                            f"tune.name=bench-{scheduler}"]), tmp, tmp)
        results[scheduler] = summary_and_steps(stdout)
    (grid_best, grid_steps), (asha_best, asha_steps) = results["fifo"], results["asha"]
    print(f"full grid: best loss {grid_best:.4f}, {grid_steps} trial-steps; ASHA: best loss {asha_best:.4f} "
          f"({100 * (asha_best / grid_best - 1):+.2f}%, goal within 2%), {asha_steps} trial-steps "
          f"({100 * asha_steps / grid_steps:.0f}% of the grid's, goal <= 60%)")


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
        print(f"load: {os.getloadavg()[0]:.1f} (1-minute average, {os.cpu_count()} cores)")
        if "sweep" in args.parts:
            sweep_vs_sequential(tmp)
        if "asha" in args.parts:
            asha_vs_grid(tmp)


if __name__ == "__main__":
    main()
