"""Tensor-parallel Serve replicas (issue 15, test d), on a pp=2 x tp=2 checkpoint written by the real
training loop on 4 gloo processes:

- each rank's shard, loaded straight from the checkpoint (or sliced from its Hugging Face export),
  gives the tp=1 model's prefill and KV-cache decode logits within 1e-4, with rank 1 in a Ray actor;
- a tp=2 replica behind Serve's HTTP proxy answers the same greedy text and prompt log-probabilities
  as a tp=1 replica of the same checkpoint;
- killing its rank-1 actor's process ends the stream in flight with an error event, Serve replaces
  the replica (a new rank 1), and later requests give the same text again.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray import serve

from raytron.config import load_config
from raytron.data.tokenizer import save_tokenizer, train_tokenizer
from raytron.export.consolidate import consolidate_checkpoint
from raytron.export.from_checkpoint import export_checkpoint
from raytron.model.generation import decode_step, prefill
from raytron.parallel.topology import Topology
from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from raytron.serve.tp_group import TPGroup
from raytron.train.batches import ArraySource
from raytron.train.loop import train
from raytron.train.session import LocalSession
from tests.distributed.gloo import run_on_gloo
from tests.servers import free_port

TOL = 1e-4
VOCAB, SEQ, MICRO, STEPS, CONTEXT = 500, 16, 2, 3, 512
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return the value of the parameter.",
         "This module provides a class for reading files.", "Raises ValueError if the input is empty."]
PROMPTS = ["The quick brown", "Return the", "This module provides a class"]


def _train(root: str, tokenizer_path: str) -> None:
    import deepspeed
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # PipelineModule requires it
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the group run_on_gloo started
    cfg = load_config("jobs/configs/tiny_smoke.yaml", [
        f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        f"model.max_position_embeddings={CONTEXT}", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}",
        "train.grad_accum_steps=2", f"train.steps={STEPS}", "train.warmup_steps=1", "train.threads=1",
        "parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1", f"train.storage_path={root}",
        "name=serve-tp"])
    blocks = np.random.default_rng(0).integers(0, VOCAB, (STEPS * 2 * MICRO, SEQ + 1))  # (N, T+1)
    train(cfg, Topology.from_world(dp=1, pp=2, tp=2), LocalSession(root), ArraySource(blocks),
          tokenizer_json=Path(tokenizer_path).read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-tp-run")
    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=VOCAB, min_frequency=1)
    tokenizer_path = save_tokenizer(tokenizer, tmp_path_factory.mktemp("tokenizer"))
    run_on_gloo(4, _train, str(root), str(tokenizer_path))
    return sorted(root.glob("checkpoint_*"))[-1]


@ray.remote(num_cpus=1)
class Rank0:
    """Rank 0 of a tp=2 group in a Ray actor (rank 1 in a TPRank actor beside it)."""

    def __init__(self, folder: str):
        self.group = TPGroup(folder, 2, slots=2, context=None, device="cpu", num_cpus=1, num_gpus=0)

    def logits(self, prompts: list[list[int]], next_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            model = self.group.model
            cache = model.new_cache(len(prompts), 64)
            first = prefill(model, prompts, cache)  # (B, V)
            second = decode_step(model, next_tokens, [len(p) for p in prompts], cache)  # (B, V)
        self.group.close()
        return first, second


def reference_logits(folder: Path, prompts: list[list[int]], next_tokens: list[int]):
    model = consolidate_checkpoint(folder).new_model()
    with torch.no_grad():
        cache = model.new_cache(len(prompts), 64)
        return prefill(model, prompts, cache), decode_step(model, next_tokens, [len(p) for p in prompts], cache)


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_tp2_shards_give_the_tp1_logits(ray_cluster, checkpoint, tmp_path, source):
    folder = checkpoint if source == "checkpoint" else export_checkpoint(checkpoint, tmp_path / "hf",
                                                                         register=False).folder
    prompts, next_tokens = [[5, 17, 42, 99, 3], [7, 8]], [11, 250]
    want_prefill, want_decode = reference_logits(checkpoint, prompts, next_tokens)
    probe = Rank0.remote(str(folder))
    try:
        got_prefill, got_decode = ray.get(probe.logits.remote(prompts, next_tokens))
    finally:
        ray.kill(probe)  # its rank-1 actor goes with it
    # the Hugging Face export drops the padded vocabulary rows: compare the true vocabulary
    torch.testing.assert_close(got_prefill[:, :VOCAB], want_prefill[:, :VOCAB], atol=TOL, rtol=0)
    torch.testing.assert_close(got_decode[:, :VOCAB], want_decode[:, :VOCAB], atol=TOL, rtol=0)
    assert not torch.allclose(want_decode[0], want_decode[1])  # two different rows: a real comparison


def serve_config(source: Path, port: int, tp: int) -> dict:
    return {"app_name": f"tp{tp}", "model": {"source": str(source), "name": "tiny"},
            "limits": {"max_batch_size": 4, "max_tokens": 400, "context": CONTEXT},
            "deployment": {"tensor_parallel": tp, "ray_actor_options": {"num_cpus": 1}, "health_check_period_s": 1},
            "http": {"host": "127.0.0.1", "port": port, "route_prefix": f"/tp{tp}", "stream_interval_s": 0}}


@pytest.fixture(scope="module")
def apps(ray_cluster, checkpoint):
    port = free_port()
    urls = {tp: run_app(build_serve_config(serve_config(checkpoint, port, tp))) for tp in (1, 2)}
    yield urls
    serve.shutdown()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps({"model": "tiny", **body}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def greedy(url: str) -> tuple[list[str], list[float]]:
    """Greedy texts of PROMPTS (one batched request) and the first prompt's echoed log-probabilities."""
    texts = [c["text"] for c in post(url, {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0,
                                           "ignore_eos": True})["choices"]]
    scored = post(url, {"prompt": PROMPTS[2], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    return texts, scored["choices"][0]["logprobs"]["token_logprobs"][1:]


def test_tp2_replica_answers_like_tp1(apps):
    texts1, logprobs1 = greedy(apps[1])
    texts2, logprobs2 = greedy(apps[2])
    assert texts2 == texts1 and len(set(texts1)) == len(PROMPTS)
    np.testing.assert_allclose(logprobs2, logprobs1, atol=TOL, rtol=0)
    health = json.loads(urllib.request.urlopen(f"{apps[2]}/health", timeout=10).read())
    assert health["tensor_parallel"] == 2 and len(set(health["rank_pids"])) == 2


def rank_pids(url: str) -> list[int]:
    """The process ids of the serving replica's ranks, rank 0 first (its /health)."""
    return json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())["rank_pids"]


def test_killed_rank_fails_in_flight_requests_and_serve_replaces_the_replica(apps):
    want, _ = greedy(apps[2])
    first = rank_pids(apps[2])
    victim = first[1]
    request = urllib.request.Request(
        f"{apps[2]}/v1/completions", json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400,
                                                 "ignore_eos": True, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=60) as stream:
        for line in stream:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if len(events) == 2:
                    os.kill(victim, signal.SIGKILL)
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["type"] == "server_error" and len(events) < 400  # ended early, with an error
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            replaced = rank_pids(apps[2])[1] != victim
        except (urllib.error.URLError, OSError):  # no replica to answer while Serve replaces it
            replaced = False
        if replaced:
            try:
                assert greedy(apps[2])[0] == want
                return
            except urllib.error.HTTPError:  # the old replica may still answer until Serve stops it
                pass
        time.sleep(1)
    pytest.fail(f"Serve did not replace the replica whose rank 1 (pid {victim}) was killed")
