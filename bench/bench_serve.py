"""Serving benchmarks, side by side in one run, on a ~30M-parameter GPT (random init; the weights, not
Python, dominate a decode step):

1. batching: 16 concurrent HTTP clients send the same seeded requests (mixed max_tokens) to four
   Serve apps on the same model: our continuous-batching engine (streamed), the same engine one
   sequence at a time (max_batch_size 1, streamed), our engine not streamed, and Ray Serve's
   @serve.batch request-level batching around `generation.generate` (a batch forms, runs to its
   longest request, then the next forms; it cannot stream, so it is compared with ours not streamed).
   Throughput = completion tokens / wall time; p50/p99 latency and time to first token per request.
   All four produce the same tokens (per-request seeds, batch-invariant engine), so they do the same work.
2. http overhead: the same requests through the continuous app (not streamed, and streamed at each
   --stream-intervals value) vs the engine called in-process at the same concurrency (asyncio tasks in
   this process, and in a Ray actor as niced as the replica), in rounds; the CPU the Serve proxy and
   the replica spent per run.
3. decode: our KV-cache `generate` vs `transformers` `generate` on the exported weights, batch 1 and 16.

    .venv/bin/python bench/bench_serve.py                 # all parts (http alone: 8-9 minutes on 2 shared cores)
    .venv/bin/python bench/bench_serve.py --parts decode  # one part
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench_model import decode, interleaved, report
from raytron.config import ModelConfig
from raytron.data.demo_data import demo_data
from raytron.export import export_huggingface
from raytron.model.generation import generate
from raytron.model.gpt import build_model, count_parameters, to_decode_layout
from raytron.model.sampling import SamplingParams
from raytron.serve.engine import Engine, EngineLimits
from raytron.serve.model_source import load_model
from raytron.serve.settings import Http

MODEL = ModelConfig(flavour="gpt", vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8,
                    max_position_embeddings=512)
CLIENTS = 16
MAX_TOKENS = (16, 32, 64, 128)
"""Cycled over the requests: mixed lengths are where request-level batching waits for the longest."""
HOST = "127.0.0.1"


@dataclass
class Outcome:
    latency: float
    ttft: float
    tokens: int
    text: str
    chunks: int = 1
    """Events that carried text (streamed); 1 for a whole reply."""


def bench_model_folder(tmp: Path) -> tuple[Path, object, list[str]]:
    """MODEL (random init) exported with a BPE tokenizer trained on the demo corpus: the folder, its
    tokenizer and 64 validation texts to make prompts of."""
    data = demo_data(tmp, 2_000_000, MODEL.vocab_size, 64)
    folder = export_huggingface(build_model(MODEL.model_copy(update={"vocab_size": data.vocab_size}), seed=0),
                                tmp / "model", data.tokenizer_path, eos_token_id=0)
    tokenizer = load_model(str(folder)).tokenizer
    return folder, tokenizer, [tokenizer.decode(block.tolist()) for block in data.validation_blocks[:64]]


def workload(texts: list[str], tokenizer, requests_per_client: int) -> list[list[dict]]:
    """Per client, its requests in order: prompts of 8-64 tokens, mixed max_tokens, seeded sampling."""
    plans = []
    for client in range(CLIENTS):
        plan = []
        for round_ in range(requests_per_client):
            index = client * requests_per_client + round_
            ids = tokenizer.encode(texts[index % len(texts)]).ids[: 8 + (index * 7) % 57]
            plan.append({"model": "bench", "prompt": tokenizer.decode(ids), "temperature": 1.0, "seed": index,
                         "max_tokens": MAX_TOKENS[index % len(MAX_TOKENS)]})
        plans.append(plan)
    return plans


def stream_request(port: int, path: str, body: dict) -> Outcome:
    """One streamed completion over HTTP: time to the first text and to [DONE], tokens from usage."""
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    ttft, text, tokens, chunks = None, [], 0, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            ttft = ttft or time.perf_counter() - start
            text.append(chunk["choices"][0]["text"])
            chunks += 1
        tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
    connection.close()
    latency = time.perf_counter() - start
    return Outcome(latency, ttft or latency, tokens, "".join(text), chunks)


def plain_request(port: int, path: str, body: dict) -> Outcome:
    """One non-streamed completion: the first token arrives with the last."""
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = json.loads(connection.getresponse().read())
    connection.close()
    latency = time.perf_counter() - start
    return Outcome(latency, latency, reply["usage"]["completion_tokens"], reply["choices"][0]["text"])


def run_clients(plans: list[list[dict]], send) -> tuple[float, list[Outcome]]:
    """Every client sends its requests one after another, all clients at once; wall time and outcomes."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(plans)) as pool:
        per_client = list(pool.map(lambda plan: [send(body) for body in plan], plans))
    return time.perf_counter() - start, [o for outcomes in per_client for o in outcomes]


def summary(name: str, seconds: float, outcomes: list[Outcome]) -> dict:
    tokens = sum(o.tokens for o in outcomes)
    latencies = sorted(o.latency for o in outcomes)
    ttfts = sorted(o.ttft for o in outcomes)
    row = {"name": name, "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
           "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
           "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}
    print(f"{name:<34} {row['tokens_per_s']:>8.1f} tok/s  ({tokens} tokens in {seconds:6.1f} s)  "
          f"latency p50 {row['p50']:6.2f} s p99 {row['p99']:6.2f} s  TTFT p50 {row['ttft_p50']:6.2f} s "
          f"p99 {row['ttft_p99']:6.2f} s", flush=True)
    return row


def request_batched_app(folder: Path, threads: int):
    """Ray Serve's request-level batching around `generate`: @serve.batch collects whole requests
    and runs them to completion together; the next batch forms only when the longest is done."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": threads})
    class RequestBatched:
        def __init__(self, folder: str):
            torch.set_num_threads(threads)
            self.loaded = load_model(folder)

        @serve.batch(max_batch_size=CLIENTS, batch_wait_timeout_s=0.05)
        async def generate_batch(self, requests: list[tuple[list[int], SamplingParams]]) -> list:
            loaded = self.loaded
            prompts, params = [ids for ids, _ in requests], [p for _, p in requests]
            return await asyncio.get_running_loop().run_in_executor(
                None, generate, loaded.model, prompts, params, loaded.eos_id, loaded.tokenizer.decode)

        async def __call__(self, request) -> dict:
            body = await request.json()
            ids = self.loaded.tokenizer.encode(body["prompt"]).ids
            params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    seed=body["seed"])
            completion = await self.generate_batch((ids, params))
            return {"choices": [{"text": completion.text, "finish_reason": completion.finish_reason}],
                    "usage": {"completion_tokens": len(completion.tokens)}}

    return RequestBatched.bind(str(folder))


def serve_config(folder: Path, batch: int, threads: int) -> dict:
    return {"model": {"source": str(folder), "name": "bench"},
            "limits": {"max_batch_size": batch, "max_tokens": max(MAX_TOKENS), "max_tokens_in_flight": 100_000},
            "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": threads}}}


def bench_batching(folder: Path, plans: list[list[dict]], port: int, threads: int, rounds: int) -> None:
    from ray import serve

    from raytron.serve.app import build_app

    # @serve.batch cannot stream, so it is compared with our app not streamed: the same request mode
    # on both sides (streaming costs proxy CPU that the model's cores pay for on a small machine)
    def ours(batch: int):
        return lambda: build_app(serve_config(folder, batch, threads))

    apps = {
        "continuous batching (ours)": ("/cb", ours(CLIENTS), stream_request),
        "one at a time": ("/single", ours(1), stream_request),
        "continuous batching (ours), not streamed": ("/cbp", ours(CLIENTS), plain_request),
        "@serve.batch request-level": ("/batch", lambda: request_batched_app(folder, threads), plain_request),
    }
    ratios = {"continuous / one at a time, both streamed (goal >= 4x)": [],
              "continuous / @serve.batch, neither streamed (goal >= 1.3x)": [],
              "continuous streamed / @serve.batch (not a goal)": []}
    texts = {}
    for round_ in range(1, rounds + 1):
        print(f"round {round_}/{rounds}, load average {os.getloadavg()[0]:.1f}", flush=True)
        tokens_per_s = []
        for name, (prefix, make_app, send) in apps.items():
            serve.run(make_app(), name=prefix.strip("/"), route_prefix=prefix)
            path = prefix if prefix == "/batch" else f"{prefix}/v1/completions"
            send(port, path, plans[0][0])  # warm-up
            seconds, outcomes = run_clients(plans, lambda body: send(port, path, body))
            tokens_per_s.append(summary(name, seconds, outcomes)["tokens_per_s"])
            texts[name] = tuple(o.text for o in outcomes)
            serve.delete(prefix.strip("/"))  # free its cores and memory for the next
        streamed, single, plain, batched = tokens_per_s
        for label, ratio in zip(ratios, (streamed / single, plain / batched, streamed / batched)):
            ratios[label].append(ratio)
    for label, values in ratios.items():
        print(f"{label}: per round {', '.join(f'{v:.2f}' for v in values)}; median {statistics.median(values):.2f}x")
    print(f"same texts from all four: {len(set(texts.values())) == 1}")


async def engine_clients(engine: Engine, tokenizer, plans: list[list[dict]]) -> tuple[float, list[Outcome]]:
    """The clients of run_clients as asyncio tasks calling the engine directly (no HTTP)."""
    async def client(plan: list[dict]) -> list[Outcome]:
        outcomes = []
        for body in plan:
            start = time.perf_counter()
            ttft, tokens = None, 0
            params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    seed=body["seed"])
            async for delta in engine.stream(tokenizer.encode(body["prompt"]).ids, params):
                ttft = ttft or (time.perf_counter() - start if delta.text else None)
                tokens = delta.completion_tokens
            latency = time.perf_counter() - start
            outcomes.append(Outcome(latency, ttft or latency, tokens, ""))
        return outcomes

    await engine.complete(tokenizer.encode(plans[0][0]["prompt"]).ids, SamplingParams(max_new_tokens=4))
    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(plan) for plan in plans))
    return time.perf_counter() - start, [o for outcomes in per_client for o in outcomes]


class InProcess:
    """An engine and its clients in one process: this one, or a Ray actor like the replica (same
    worker niceness and CPU reservation as the replica, so the comparison isolates HTTP and Serve)."""

    def __init__(self, folder: str, threads: int):
        torch.set_num_threads(threads)
        self.loaded = load_model(folder)
        self.engine = Engine(self.loaded.model, self.loaded.eos_id, self.loaded.tokenizer.decode,
                             EngineLimits(CLIENTS, 100_000, MODEL.max_position_embeddings))

    def run(self, plans: list[list[dict]]) -> tuple[float, list[Outcome]]:
        return asyncio.run(engine_clients(self.engine, self.loaded.tokenizer, plans))

    def niceness(self) -> int:
        return os.nice(0)


def process_cpu_seconds(title: str) -> float:
    """CPU seconds (user + system) so far of the processes under this one (the Ray cluster it started,
    not another one on the machine) whose title starts with ``title``."""
    import psutil

    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if (process.cmdline() or [""])[0].startswith(title):
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # ended meanwhile
            pass
    return total


def bench_http_overhead(folder: Path, plans: list[list[dict]], port: int, threads: int, rounds: int,
                        stream_intervals: list[float]) -> None:
    """Rounds of runs of the same requests, one after another: the engine in this process and in a Ray
    actor, through Serve not streamed, and streamed from one app per ``http.stream_interval_s``. Ratios
    are per round (the load of a shared machine drifts), then the median over rounds."""
    import ray
    from ray import serve

    from raytron.serve.app import build_app

    paths = []
    for number, interval in enumerate(stream_intervals):
        config = serve_config(folder, CLIENTS, threads)
        config["http"] = {"stream_interval_s": interval}
        serve.run(build_app(config), name=f"cb{number}", route_prefix=f"/cb{number}")
        paths.append(f"/cb{number}/v1/completions")
        stream_request(port, paths[-1], plans[0][0])
    here = InProcess(str(folder), threads)
    actor = ray.remote(num_cpus=threads)(InProcess).remote(str(folder), threads)
    print(f"niceness: this process {os.nice(0)}, Ray actor {ray.get(actor.niceness.remote())} "
          "(Ray starts workers, Serve replicas included, at its worker niceness)", flush=True)
    plain = "through Serve (HTTP, not streamed)"
    variants = {
        "in-process engine (this process)": here.run,
        "in-process engine (Ray actor)": lambda plans: ray.get(actor.run.remote(plans)),
        plain: lambda plans: run_clients(plans, lambda body: plain_request(port, paths[0], body)),
    }
    replicas = {plain: "ray::ServeReplica:cb0:"}  # process titles, for the CPU each variant costs
    for number, (interval, path) in enumerate(zip(stream_intervals, paths)):
        name = f"through Serve (HTTP, streamed, interval {interval} s)"
        variants[name] = lambda plans, path=path: run_clients(plans, lambda body: stream_request(port, path, body))
        replicas[name] = f"ray::ServeReplica:cb{number}:"
    rates: dict[str, list[float]] = {name: [] for name in variants}
    texts: dict[str, list[str]] = {}
    for round_ in range(rounds):
        print(f"round {round_ + 1}/{rounds}, load average {os.getloadavg()[0]:.1f}", flush=True)
        for name, run in variants.items():
            cpu = (process_cpu_seconds("ray::ProxyActor"), process_cpu_seconds(replicas.get(name, "-")),
                   time.process_time())
            seconds, outcomes = run(plans)
            rates[name].append(summary(name, seconds, outcomes)["tokens_per_s"])
            if name in replicas:  # the CPU that HTTP costs: the proxy's, and the replica's beyond the model's
                texts.setdefault(name, [o.text for o in outcomes])
                tokens, chunks = sum(o.tokens for o in outcomes), sum(o.chunks for o in outcomes)
                print(f"  {chunks} text chunks for {tokens} tokens ({tokens / chunks:.2f} tokens per chunk); "
                      f"CPU seconds: Serve proxy {process_cpu_seconds('ray::ProxyActor') - cpu[0]:.1f}, "
                      f"replica {process_cpu_seconds(replicas[name]) - cpu[1]:.1f}, "
                      f"clients {time.process_time() - cpu[2]:.1f}", flush=True)
    for number in range(len(stream_intervals)):
        serve.delete(f"cb{number}")
    ray.kill(actor)
    here.engine.close()
    print(f"streamed texts equal the plain ones: {len({tuple(t) for t in texts.values()}) == 1}")
    names = list(variants)
    for base in names[:2]:
        for name in names[2:]:
            ratios = [r / b for r, b in zip(rates[name], rates[base])]
            print(f"{name} / {base}: per round {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f} (goal >= 0.9)")


def bench_decode(threads: int, rounds: int, device: str) -> None:
    torch.set_num_threads(threads)
    plain = build_model(MODEL, seed=0).eval()
    with tempfile.TemporaryDirectory() as folder:
        export_huggingface(plain, folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval().to(device)
    served = to_decode_layout(build_model(MODEL, seed=0)).to(device)  # what serving runs (serve/model_source.py)
    plain = plain.to(device)
    data = torch.Generator().manual_seed(0)
    print(f"{'':<30} {'':<14} {'median':>10} {'best':>10}  (tokens/s; 'raytron' = decode layout, as served)")
    for batch in (1, CLIENTS):
        prompts = torch.randint(0, MODEL.vocab_size, (batch, 32), generator=data).to(device)
        runs = decode(served, theirs, prompts, 64)
        runs["nn.Linear layout"] = decode(plain, theirs, prompts, 64)["raytron"]
        seconds = interleaved(runs, warmup=1, rounds=rounds, clock=time.perf_counter)
        report(f"decode B={batch} P=32 N=64", batch * 64, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="decode,batching,http", help="comma-separated: decode, batching, http")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model (replica or in-process)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the decode comparison")
    parser.add_argument("--batching-rounds", type=int, default=3, help="rounds of the batching comparison")
    parser.add_argument("--http-rounds", type=int, default=3, help="rounds of the http comparison")
    parser.add_argument("--stream-intervals", default=f"0,{Http().stream_interval_s}",
                        help="comma-separated http.stream_interval_s values (seconds), one streamed app each, at most "
                             "3 (8 CPUs in the local cluster); 0 sends every step's text; the second default is "
                             "the config's default")
    parser.add_argument("--device", default="cpu", help="device of the decode comparison (cuda on a GPU box)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(f"model: gpt h={MODEL.hidden_size} L={MODEL.num_layers} heads={MODEL.num_heads} vocab={MODEL.vocab_size}: "
          f"{count_parameters(MODEL) / 1e6:.1f}M parameters, fp32, {args.threads} torch threads; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if "decode" in parts:
        bench_decode(args.threads, args.rounds, args.device)
    if "batching" in parts or "http" in parts:
        # imported here: the decode part runs where Ray is not installed (a GPU box)
        import ray
        from ray import serve

        with tempfile.TemporaryDirectory() as tmp:
            folder, tokenizer, texts = bench_model_folder(Path(tmp))
            plans = workload(texts, tokenizer, args.requests_per_client)
            port = 8123
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": HOST, "port": port})
            print(f"{CLIENTS} clients x {args.requests_per_client} requests, max_tokens cycling {MAX_TOKENS}, "
                  "temperature 1 with a seed per request", flush=True)
            if "batching" in parts:
                bench_batching(folder, plans, port, args.threads, args.batching_rounds)
            if "http" in parts:
                bench_http_overhead(folder, plans, port, args.threads, args.http_rounds,
                                    [float(value) for value in args.stream_intervals.split(",")])
            serve.shutdown()
            ray.shutdown()
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
