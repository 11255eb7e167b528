"""SFT throughput in scored tokens/s: packed rows ÷ one padded sample per row (goal >= 1.5).

One process, one local Ray cluster, the same chat data (jobs/make_sft_smoke_inputs.py: a tiny imported
Llama and arithmetic chats), the same model, seq_len and batch; only ``data.packing`` differs. Each
variant is prepared (its manifest counts the rows and the scored, i.e. assistant, tokens of the training
split) and then trained with ``raytron train``'s own path for --steps steps at pp=1, the two runs
alternating round by round so drift in machine load hits each alike.

    scored tokens/s = (scored tokens per row, from the manifest) x rows per step / median step time

The median step time is read back from the run's MLflow history (``step_time_s``), first two steps left out.

    .venv/bin/python bench/bench_sft_packing.py          # ~4 minutes on 2 shared cores
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

from jobs.make_sft_smoke_inputs import make_inputs  # noqa: E402
from raytron.config import load_config, read_run_mapping  # noqa: E402
from raytron.data.manifest import read_manifest  # noqa: E402
from raytron.parallel.hf_import import resolve_init_from  # noqa: E402
from raytron.train.run import run_training  # noqa: E402

SKIP_STEPS = 2


def run(root: Path, model: Path, chats: Path, packing: bool, steps: int, tag: str) -> tuple[float, float]:
    """(scored tokens per row, median step seconds) of one training run."""
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    cfg = resolve_init_from(*read_run_mapping("jobs/configs/sft_smoke.yaml", [
        f"name=sft-bench-{tag}", f"model.init_from={model}", f"data.source={chats}", f"data.tokenizer={model}",
        f"data.packing={str(packing).lower()}", "parallel.pp=1", f"train.steps={steps}", "train.eval_every=0",
        "train.checkpoint_every=0", "train.export=false", "train.log_every=1",
        f"train.storage_path={root / 'runs'}", f"tracking.tracking_uri={tracking}"]))
    run_training(cfg, workdir=root)
    client = MlflowClient(tracking)
    # the runs go one after another: this one is the experiment's newest
    run_id = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    times = [m.value for m in sorted(client.get_metric_history(run_id, "step_time_s"), key=lambda m: m.step)]
    split = _train_split(root, packing)  # the default data.prepared lies under train.storage_path by fingerprint
    return split.scored_tokens / split.rows, statistics.median(times[SKIP_STEPS:])


def _train_split(root: Path, packing: bool):
    for folder in sorted((root / "runs" / "prepared").iterdir()):
        manifest = read_manifest(str(folder))
        if manifest and manifest.settings["sft"]["packing"] == packing:
            return manifest.splits["train"]
    raise RuntimeError(f"no prepared split with packing={packing} under {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"load at start: {open('/proc/loadavg').read().split()[:3]}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model, chats = make_inputs(root)
        seen: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for index in range(args.rounds):
            for packing in ((True, False) if index % 2 == 0 else (False, True)):
                seen[packing].append(run(root, model, chats, packing, args.steps, f"{packing}-{index}"))
    ray.shutdown()
    rows_per_step = load_config("jobs/configs/sft_smoke.yaml").global_batch_size
    rates = {}
    for packing, results in seen.items():
        scored_per_row = results[0][0]
        step = statistics.median(seconds for _, seconds in results)
        rates[packing] = scored_per_row * rows_per_step / step
        print(f"packing={str(packing):5}  scored tokens/row {scored_per_row:6.1f}  median step {step:.3f} s  "
              f"scored tokens/s {rates[packing]:8.1f}")
    print(f"packed / padded scored tokens/s: {rates[True] / rates[False]:.2f}x (goal >= 1.5)")
    print(f"load at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
