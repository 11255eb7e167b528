"""``make demo``: the lifecycle on a local Ray cluster, then generation from the exported model.

Docstring corpus -> BPE tokenizer -> packed blocks -> Ray Train + DeepSpeed (two pipeline
stages) -> checkpoints -> Hugging Face export -> MLflow run and registered model version ->
alias "demo" -> Ray Serve (OpenAI-compatible HTTP) -> one completion with curl.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

from ray import serve

from raytron.config import load_config
from raytron.data.tokenizer import load_tokenizer, special_token_ids
from raytron.export.huggingface import load_huggingface
from raytron.model.generation import generate
from raytron.model.sampling import SamplingParams
from raytron.serve.app import run_app
from raytron.serve.settings import ServeConfig, load_serve_config
from raytron.tracking.mlflow_run import resolve_tracking_uri, set_alias
from raytron.train.cluster import connect
from raytron.train.run import run_training

CONFIG = Path("jobs/configs/demo_smoke.yaml")
WORKDIR = Path(".demo")
PROMPTS = ["Return the", "This module provides", "Raises ValueError if"]
SERVE_CONFIG = Path("jobs/configs/serve/gpt_smoke.yaml")
"""Serves models:/raytron-demo-gpt@demo, the alias this demo sets."""
SERVE_ALIAS = "demo"
PREFERRED_PORT = 8000


def complete(folder: Path) -> None:
    model = load_huggingface(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    eos = special_token_ids(tokenizer).eos
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    for mode, params in (("greedy", SamplingParams(max_new_tokens=24, temperature=0)),
                         ("sampled", SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7))):
        for text, completion in zip(PROMPTS, generate(model, prompts, params, eos, tokenizer.decode)):
            print(f"  [{mode}] {text!r} -> {completion.text!r}")


def free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else one the OS picks."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_curl(cfg: ServeConfig) -> str:
    """Serve the alias over HTTP, send one completion with curl, print request and text; the URL."""
    url = run_app(cfg)
    body = {"model": cfg.model.name, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.8, "seed": 7}
    command = ["curl", "-sS", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d", json.dumps(body)]
    print(f"\n$ {shlex.join(command)}")
    reply = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"  -> {reply['choices'][0]['text']!r} (finish_reason {reply['choices'][0]['finish_reason']}, "
          f"usage {reply['usage']})")
    return url


def main() -> None:
    cfg = load_config(CONFIG)
    started = time.perf_counter()
    # The demo owns its cluster: `auto` would join whatever cluster another process on this
    # machine started last (a test session's, say) and die with it. $RAY_ADDRESS still wins.
    os.environ.setdefault("RAY_ADDRESS", "local")
    dashboard = connect(cfg)
    result = run_training(cfg, workdir=WORKDIR)
    losses = result.metrics["losses"]
    print(f"\ntrained {len(losses)} steps in {time.perf_counter() - started:.0f} s: "
          f"loss {losses[min(losses)]:.3f} (step {min(losses)}) -> {losses[max(losses)]:.3f} (step {max(losses)}), "
          f"validation loss {result.metrics.get('val_loss', float('nan')):.3f}")
    print("\ncompletions from the exported model:")
    complete(result.export.folder)
    version = result.export.model_version
    set_alias(version.name, SERVE_ALIAS, version.version, cfg.tracking)
    print(f"\nserving models:/{version.name}@{SERVE_ALIAS} with Ray Serve ({SERVE_CONFIG}):")
    serve_cfg = load_serve_config(SERVE_CONFIG, [f"http.port={free_port(PREFERRED_PORT)}"])
    url = serve_and_curl(serve_cfg)
    print(f"""
where to look:
  checkpoints       {result.checkpoint.path}
  Hugging Face dir  {result.export.folder}
  MLflow            {resolve_tracking_uri(cfg.tracking)}  (UI: `make mlflow-ui`, then http://127.0.0.1:5000)
  registered model  {version.name} version {version.version} (run {version.run_id})
  Ray dashboard     {f"http://{dashboard}" if dashboard else "not running (Ray could not start it; see /tmp/ray/session_latest/logs)"} (while this process runs)
  HTTP endpoint     {url}/v1 (OpenAI-compatible; the demo removes it as it ends,
                    `raytron serve {SERVE_CONFIG}` serves it again)""")
    serve.delete(serve_cfg.app_name)


if __name__ == "__main__":
    main()
