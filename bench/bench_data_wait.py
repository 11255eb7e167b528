"""Data-wait share of the training step, prepared vs streaming data (goal < 2% for both).

One process starts a local Ray cluster and runs `raytron train`'s path (run_training) twice on
the tiny_smoke GPT and the demo corpus, side by side: data.mode=prepared (shards written by
`raytron prepare`'s pipeline, read back with Ray Data) and data.mode=streaming (each DP reader
tokenizes and packs the raw files online). Each step's `data_wait_share` (time in
StepBatches.next: the reader's wait for its batch plus the broadcast to its peers, over the
step's wall time) is read back from the run's MLflow history (sqlite in a temp folder).

    .venv/bin/python bench/bench_data_wait.py                  # ~3 minutes on 2 cores
    .venv/bin/python bench/bench_data_wait.py --steps 60 --dp 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ray  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from raytron.config import load_config  # noqa: E402
from raytron.train.run import run_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, args, workdir: Path) -> dict:
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(REPO / "jobs/configs/tiny_smoke.yaml", [
        f"name=wait-{mode}", f"data.mode={mode}", f"train.steps={args.steps}", f"parallel.dp={args.dp}",
        f"resources.num_workers={args.dp}", "train.threads=1", "train.eval_every=0", "train.checkpoint_every=0",
        f"data.demo_corpus_bytes={args.corpus_bytes}", f"train.storage_path={workdir / 'runs'}",
        f"tracking.tracking_uri={tracking}", f"tracking.experiment=wait-{mode}"])
    run_training(cfg, workdir=workdir)
    client = MlflowClient(tracking)
    run_id = client.search_runs([client.get_experiment_by_name(f"wait-{mode}").experiment_id])[0].info.run_id
    shares = {m.step: m.value for m in client.get_metric_history(run_id, "data_wait_share")}
    steps = {m.step: m.value for m in client.get_metric_history(run_id, "step_time_s")}
    window = [step for step in sorted(shares) if step > args.skip]
    waited = sum(shares[step] * steps[step] for step in window)
    return {"mode": mode, "steps": len(window), "median_share": statistics.median(shares[s] for s in window),
            "max_share": max(shares[s] for s in window), "total_share": waited / sum(steps[s] for s in window),
            "first_step_wait_s": shares[1] * steps[1], "step_s": statistics.median(steps[s] for s in window)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--skip", type=int, default=1, help="first steps left out (pipeline start-up)")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(mode, args, Path(tmp)) for mode in ("prepared", "streaming")]
    print(f"\n{'mode':<10} {'steps':>5} {'step s':>8} {'median wait':>12} {'max wait':>9} {'total wait':>11} "
          f"{'first step wait s':>18}")
    for r in results:
        print(f"{r['mode']:<10} {r['steps']:>5} {r['step_s']:>8.3f} {r['median_share']:>12.2%} "
              f"{r['max_share']:>9.2%} {r['total_share']:>11.2%} {r['first_step_wait_s']:>18.2f}")


if __name__ == "__main__":
    main()
