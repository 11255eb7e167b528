"""What the dashboards test watches, run as a driver of its own cluster ($RAY_ADDRESS):
`python -m tests.integration.dashboard_load WORKDIR` serves a tiny model (one replica of TENSOR_PARALLEL
ranks) under steady streaming load and trains tiny_smoke with eval_every and checkpoint_every, until
killed. Prints READY once both run."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import ray

from raytron.config import load_config
from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from raytron.train.ray_trainer import fit
from tests.integration.test_serve_api import API_KEY, MODEL_NAME, serve_config, tiny_export
from tests.servers import free_port

CLIENTS = 3
TENSOR_PARALLEL = 2
"""Ranks of the served replica: the TP-ranks panel must show them."""


def keep_streaming(base_url: str) -> None:
    """Streams one completion after another; every tenth request is a bad one (top_p > 1), as real clients
    send now and then, so the error series exist, and another in ten asks for logprobs (their series)."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    for count in itertools.count():
        try:
            for _ in client.completions.create(model=MODEL_NAME, prompt="Return the value", max_tokens=24,
                                               stream=True, top_p=3.0 if count % 10 == 9 else 1.0,
                                               logprobs=1 if count % 10 == 4 else None):
                pass
        except openai.BadRequestError:
            pass


def main(workdir: Path) -> None:
    ray.init()
    config = serve_config(str(tiny_export(workdir / "model")), free_port())
    config["deployment"]["tensor_parallel"] = TENSOR_PARALLEL
    url = run_app(build_serve_config(config))
    for _ in range(CLIENTS):
        threading.Thread(target=keep_streaming, args=(url,), daemon=True).start()
    cfg = load_config("jobs/configs/tiny_smoke.yaml", [
        "train.steps=100000", "train.eval_every=5", "train.checkpoint_every=10", "train.log_every=5",
        "train.keep_checkpoints=1", f"train.storage_path={workdir / 'runs'}", "train.micro_batch_size=2"])
    blocks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (4096, cfg.train.seq_len + 1))
    train = ray.data.from_items([{"tokens": row} for row in blocks[:3584]])
    validation = ray.data.from_items([{"tokens": row} for row in blocks[3584:]])
    print("READY", url, flush=True)
    started = time.monotonic()
    fit(cfg, train, validation, run_name="dashboards")
    print(f"training ended after {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
