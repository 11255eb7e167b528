"""Sharded import of a Hugging Face Llama: peak RSS and bytes read per rank at tp=2 and at pp=2
(real gloo processes) against `transformers.AutoModelForCausalLM.from_pretrained` of the whole model
in one process; also raytron's own tp=1 load. Goal: peak RSS per rank / transformers' <= 0.6.

Fair on both sides:
- each measurement runs in a fresh process (spawned: nothing inherited), and every process imports
  the same modules (torch, transformers, DeepSpeed, raytron's loader) before its peak-RSS mark is
  reset (``/proc/self/clear_refs`` 5), so "load peak" compares like with like and "above imports"
  is what building and loading the model adds;
- both load fp32 (the files' dtype) and then touch every weight (a sum over each tensor, as a first
  forward would): transformers 5 leaves its weights on the safetensors memory map, whose untouched
  pages RSS does not count;
- the peak is the kernel's VmHWM of the process (/proc/self/status), read after that touch.
The model is random (no download), built and saved here with 100 MB shards; building it is not timed.

    .venv/bin/python bench/bench_hf_load.py            # ~2-4 minutes on 2 cores
    .venv/bin/python bench/bench_hf_load.py --size 1b  # TinyLlama-1.1B's shape, 4.4 GB fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

MB = 2**20
SHAPES = {
    "small": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
              "tie_word_embeddings": False},
    # TinyLlama-1.1B's shape: a real ~1B model, where the imported runtime weighs less against the weights
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
           "tie_word_embeddings": False},
}


def _status(key: str) -> int:
    """A /proc/self/status memory line in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS; returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _import_both_sides() -> None:
    """What either side imports, imported by both before the mark is reset."""
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    import raytron.parallel.hf_import  # noqa: F401
    import raytron.parallel.pipeline  # noqa: F401


@torch.no_grad()
def _touch(tensors) -> float:
    """Read every element once (a lazily mapped weight is paged in, as a first forward would)."""
    return float(sum(tensor.float().sum() for tensor in tensors))


def _record(out: str, name: str, before: int, bytes_read: int | None, started: float) -> None:
    """One load's row; ``started``: perf_counter at the peak reset (build + load + touch are timed)."""
    seconds = time.perf_counter() - started
    with open(out, "a") as sink:
        sink.write(json.dumps({"name": name, "before": before, "peak": _status("VmHWM"), "anon": _status("RssAnon"),
                               "file": _status("RssFile"), "bytes_read": bytes_read, "seconds": seconds}) + "\n")


def transformers_load(folder: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    _import_both_sides()
    before, started = _reset_peak(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _touch(model.parameters())
    _record(out, "transformers from_pretrained", before, None, started)


def raytron_rank(folder: str, pp: int, tp: int, out: str) -> None:
    """One rank of a (pp, tp) layout: the engine's model build (no random init) and load_init_from."""
    import deepspeed
    import torch.distributed as dist

    from raytron.model.gpt import GPT
    from raytron.parallel.hf_import import load_init_from, resolve_init_from
    from raytron.parallel.pipeline import build_pipeline, gpt_name
    from raytron.parallel.tensor_parallel import TensorParallelLayers
    from raytron.parallel.topology import Topology

    _import_both_sides()
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = resolve_init_from({"model": {"init_from": folder}, "train": {"seq_len": 512},
                             "parallel": {"pp": pp, "tp": tp}})
    topology = Topology.from_world(1, pp, tp)
    before, started = _reset_peak(), time.perf_counter()
    layers = TensorParallelLayers(topology, 0)
    if pp > 1:
        with torch.no_grad():
            module = build_pipeline(cfg.model, topology, layers, cfg.padded_vocab_size, 0)
        named = ((gpt_name(name, cfg.model.num_layers), param) for name, param in module.named_parameters())
    else:
        module = GPT(cfg.model, layers, cfg.padded_vocab_size)
        named = module.named_parameters()
    stats = load_init_from(named, cfg, layers, topology.tp_index)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    _touch(module.parameters())
    _record(out, f"raytron pp={pp} tp={tp} rank {dist.get_rank()}", before, stats.bytes_read, started)


def _gloo_entry(rank: int, world: int, port: int, folder: str, pp: int, tp: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        raytron_rank(folder, pp, tp, out)
    finally:
        dist.destroy_process_group()


def run_layout(folder: str, pp: int, tp: int, out: str) -> None:
    from tests.distributed.gloo import free_port

    mp.spawn(_gloo_entry, args=(pp * tp, free_port(), folder, pp, tp, out), nprocs=pp * tp, join=True)


def build(folder: Path, shape: dict) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(folder, max_shard_size="100MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=["transformers", "layout"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SHAPES), default="small",
                        help="model shape: small (476 MB fp32) or 1b (TinyLlama-1.1B's, 4.4 GB fp32)")
    args = parser.parse_args()
    if args.step == "transformers":
        return transformers_load(args.folder, args.out)
    if args.step == "layout":
        return run_layout(args.folder, args.pp, args.tp, args.out)
    print(f"load at start: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-hf-load-") as tmp:
        folder, out = Path(tmp) / "llama", Path(tmp) / "results.jsonl"
        shape = SHAPES[args.size]
        weights = build(folder, shape)
        print(f"random Llama {shape['hidden_size']}x{shape['num_hidden_layers']}, vocab {shape['vocab_size']}, "
              f"fp32 weights {weights / MB:.0f} MB in {len(list(folder.glob('*.safetensors')))} files")
        # transformers first and last: its figure is the median of the two (the machine is shared)
        steps = [("transformers", 1, 1), ("layout", 1, 1), ("layout", 1, 2), ("layout", 2, 1), ("transformers", 1, 1)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "platform"),
                                                           str(Path(__file__).parents[1])])}
        for step, pp, tp in steps:
            subprocess.run([sys.executable, __file__, "--step", step, "--folder", str(folder), "--pp", str(pp),
                            "--tp", str(tp), "--out", str(out)], check=True, env=env)
        report([json.loads(line) for line in out.read_text().splitlines()], weights)
    print(f"load at end: {os.getloadavg()[0]:.1f}")


def report(rows: list[dict], weights: int) -> None:
    hf = [row for row in rows if row["name"].startswith("transformers")]
    hf_peak = sorted(row["peak"] for row in hf)[len(hf) // 2]
    hf_above = sorted(row["peak"] - row["before"] for row in hf)[len(hf) // 2]
    print(f"{'':32s} {'load peak MB':>12s} {'above imports MB':>16s} {'/ HF peak':>9s} {'/ HF above':>10s} "
          f"{'load s':>7s} {'anon MB':>8s} {'file MB':>8s} {'read MB':>8s} {'read / files':>12s}")
    for row in rows:
        above = row["peak"] - row["before"]
        read = "" if row["bytes_read"] is None else f"{row['bytes_read'] / MB:8.0f} {row['bytes_read'] / weights:12.2f}"
        print(f"{row['name']:32s} {row['peak'] / MB:12.0f} {above / MB:16.0f} {row['peak'] / hf_peak:9.2f} "
              f"{above / hf_above:10.2f} {row['seconds']:7.1f} {row['anon'] / MB:8.0f} {row['file'] / MB:8.0f} {read}")
    sharded = [row for row in rows if "tp=2" in row["name"] or "pp=2" in row["name"]]
    worst_peak = max(row["peak"] for row in sharded) / hf_peak
    worst_above = max(row["peak"] - row["before"] for row in sharded) / hf_above
    print(f"worst sharded rank / transformers: load peak {worst_peak:.2f}, above imports {worst_above:.2f} "
          f"(goal <= 0.6); anon/file MB: RSS after the touch, anonymous / file-mapped pages; load s: build + load + "
          f"touch (the ranks of a layout share the cores)")


if __name__ == "__main__":
    main()
