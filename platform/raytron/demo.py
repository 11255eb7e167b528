"""``make demo``: the lifecycle on a local Ray cluster, then generation from the exported model.

Docstring corpus -> BPE tokenizer -> packed blocks -> Ray Train + DeepSpeed (two pipeline
stages) -> checkpoints -> Hugging Face export -> MLflow run and registered model version.
"""

from __future__ import annotations

import time
from pathlib import Path

from raytron.config import load_config
from raytron.data.tokenizer import load_tokenizer, special_token_ids
from raytron.export.huggingface import load_huggingface
from raytron.model.generation import generate
from raytron.model.sampling import SamplingParams
from raytron.tracking.mlflow_run import resolve_tracking_uri
from raytron.train.cluster import connect
from raytron.train.run import run_training

CONFIG = Path("jobs/configs/demo_smoke.yaml")
WORKDIR = Path(".demo")
PROMPTS = ["Return the", "This module provides", "Raises ValueError if"]


def complete(folder: Path) -> None:
    model = load_huggingface(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    eos = special_token_ids(tokenizer).eos
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    for mode, params in (("greedy", SamplingParams(max_new_tokens=24, temperature=0)),
                         ("sampled", SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7))):
        for text, completion in zip(PROMPTS, generate(model, prompts, params, eos, tokenizer.decode)):
            print(f"  [{mode}] {text!r} -> {completion.text!r}")


def main() -> None:
    cfg = load_config(CONFIG)
    started = time.perf_counter()
    dashboard = connect(cfg)
    result = run_training(cfg, workdir=WORKDIR)
    losses = result.metrics["losses"]
    print(f"\ntrained {len(losses)} steps in {time.perf_counter() - started:.0f} s: "
          f"loss {losses[min(losses)]:.3f} (step {min(losses)}) -> {losses[max(losses)]:.3f} (step {max(losses)}), "
          f"validation loss {result.metrics.get('val_loss', float('nan')):.3f}")
    print("\ncompletions from the exported model:")
    complete(result.export.folder)
    version = result.export.model_version
    print(f"""
where to look:
  checkpoints       {result.checkpoint.path}
  Hugging Face dir  {result.export.folder}
  MLflow            {resolve_tracking_uri(cfg.tracking)}  (UI: `make mlflow-ui`, then http://127.0.0.1:5000)
  registered model  {version.name} version {version.version} (run {version.run_id})
  Ray dashboard     http://{dashboard} (while this process runs)
  HTTP endpoint     serving lands with the Ray Serve issue; until then `transformers` loads the folder above""")


if __name__ == "__main__":
    main()
