"""`raytron generate` (a Ray Data actor pool of engines, no HTTP) vs the Serve endpoint saturated by
concurrent clients, side by side in one run: the same ~30M-parameter GPT (bench_serve.MODEL), the same
seeded requests (prompts of 8-64 tokens, temperature 1, a seed per request, one max_tokens), the same
CPUs for the model (one actor / one replica of --threads CPUs and torch threads), the same engine limits
but the decode batch: each side runs its own (--endpoint-batch, default serving's 16; --generate-batch,
default generate's GENERATE_BATCH), both named in the output.

The endpoint gets --clients concurrent clients (default: as many as its batch, which keeps every slot
busy) sending non-streamed requests one after another (what offline work would do through HTTP); the
requests are dealt out to them in turn. Generate reads the same requests as --files JSONL files
(default 1; consecutive slices, one actor pool for all of them) and writes as many. Throughput =
completion tokens / wall time (for generate: from Ray Data's start to the last written file, what
`raytron generate` takes once connected). Rounds alternate the two; the ratio is per round, then the
median. Both must give the same texts (seeded, batch-invariant engine): checked and printed.

    .venv/bin/python bench/bench_generate.py    # about 3 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_serve import CLIENTS, HOST, MODEL, bench_model_folder, plain_request, run_clients, serve_config, workload
from raytron.model.gpt import count_parameters
from raytron.serve.batch_generate import GENERATE_BATCH

MAX_TOKENS = 64
"""One max_tokens for every request: generate takes its request parameters from the config, for every record."""


def endpoint_round(port: int, path: str, plans: list[list[dict]]) -> tuple[float, int, dict[int, str]]:
    seconds, outcomes = run_clients(plans, lambda body: plain_request(port, path, body))
    seeds = [body["seed"] for plan in plans for body in plan]  # run_clients keeps plan order
    return seconds, sum(o.tokens for o in outcomes), dict(zip(seeds, (o.text for o in outcomes)))


def generate_round(folder: Path, records: Path, output: Path, threads: int,
                   batch: int) -> tuple[float, int, dict[int, str]]:
    """``records``: the folder of input files."""
    from raytron.serve.batch_generate import GenerateConfig, run_generate

    cfg = GenerateConfig(model={"source": str(folder), "name": "bench"}, input=str(records), output=str(output),
                         request={"temperature": 1.0, "max_tokens": MAX_TOKENS},
                         limits=serve_config(folder, batch, threads)["limits"], actors=1,
                         num_cpus_per_actor=threads)
    start = time.perf_counter()
    summary = run_generate(cfg)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for entry in summary for line in Path(entry["output"]).read_text().splitlines()]
    return seconds, sum(entry["tokens"] for entry in summary), {row["seed"]: row["text"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=4,
                        help=f"requests = this x {CLIENTS} (bench_serve's workload), whatever --clients is")
    parser.add_argument("--endpoint-batch", type=int, default=CLIENTS, help="the replica's limits.max_batch_size")
    parser.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (default --endpoint-batch)")
    parser.add_argument("--generate-batch", type=int, default=GENERATE_BATCH, help="generate's limits.max_batch_size")
    parser.add_argument("--threads", type=int, default=2, help="CPUs and torch threads of the replica / the actor")
    parser.add_argument("--files", type=int, default=1, help="input files the requests are split into for generate")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ray
    from ray import serve

    from raytron.serve.app import build_app

    print(f"model: gpt h={MODEL.hidden_size} L={MODEL.num_layers}: {count_parameters(MODEL) / 1e6:.1f}M parameters, "
          f"{args.threads} CPUs per replica / actor; load average at start {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer, texts = bench_model_folder(Path(tmp))
        requests = [{**body, "max_tokens": MAX_TOKENS} for plan in workload(texts, tokenizer, args.requests_per_client)
                    for body in plan]
        clients = args.clients or args.endpoint_batch
        plans = [requests[client::clients] for client in range(clients)]
        records = Path(tmp) / "in"
        records.mkdir()
        per_file = -(-len(requests) // args.files)
        for file in range(args.files):
            (records / f"requests-{file:03d}.jsonl").write_text("".join(
                json.dumps({"prompt": b["prompt"], "seed": b["seed"]}) + "\n"
                for b in requests[file * per_file:(file + 1) * per_file]))
        port = 8124
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": HOST, "port": port})
        endpoint = serve_config(folder, args.endpoint_batch, args.threads)
        endpoint["deployment"]["max_ongoing_requests"] = max(64, clients)  # every client's request reaches the engine
        serve.run(build_app(endpoint), name="endpoint", route_prefix="/ep")
        path = "/ep/v1/completions"
        plain_request(port, path, plans[0][0])  # warm-up
        print(f"{len(requests)} requests x max_tokens {MAX_TOKENS}; endpoint: max_batch_size {args.endpoint_batch}, "
              f"{clients} concurrent clients; generate: max_batch_size {args.generate_batch}, {args.files} input file(s)",
              flush=True)
        ratios = []
        for round_ in range(1, args.rounds + 1):
            ep_s, ep_tokens, ep_texts = endpoint_round(port, path, plans)
            gen_s, gen_tokens, gen_texts = generate_round(folder, records, Path(tmp) / f"out{round_}", args.threads,
                                                          args.generate_batch)
            ratio = (gen_tokens / gen_s) / (ep_tokens / ep_s)
            ratios.append(ratio)
            print(f"round {round_}/{args.rounds} (load {os.getloadavg()[0]:.1f}): endpoint {ep_tokens / ep_s:7.1f} tok/s "
                  f"({ep_tokens} in {ep_s:5.1f} s), generate {gen_tokens / gen_s:7.1f} tok/s ({gen_tokens} in "
                  f"{gen_s:5.1f} s), ratio {ratio:.2f}, same texts: {ep_texts == gen_texts}", flush=True)
        print(f"raytron generate / saturated endpoint: median {statistics.median(ratios):.2f} (goal >= 1.2)")
        serve.shutdown()
        ray.shutdown()
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
