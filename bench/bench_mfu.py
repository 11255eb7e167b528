"""Model FLOPs utilisation of the ~1.3B GPT on one GPU in bf16 at seq 2048.

Two implementations of the same training step, each in its own process (so one's memory
never shapes the other's), run one after the other by the same command:

  raytron  raytron.train.engine.TrainingEngine: the DeepSpeed engine `raytron train` builds in
           each Ray Train worker (bf16 weights, fp32 master weights and gradient accumulation)
  torch    a bare PyTorch loop on the same GPT: fp32 weights, bf16 autocast, fused AdamW,
           clip_grad_norm_ -- what a user would write by hand

Both see the same random token blocks (micro_batch x grad_accum of seq_len+1 ids per step).
MFU counts model FLOPs only (Narayanan et al. eq. 3 with c = 3: forward + backward, no
recomputation credit), over the device's dense bf16 peak from raytron.model.flops.

    python bench/bench_mfu.py                                   # both, defaults below
    python bench/bench_mfu.py --impl raytron --compile --micro-batch 8 --accum 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["raytron", "torch", "both"], default="both")
    parser.add_argument("--config", default=str(REPO / "jobs/configs/gpt_1p3b.yaml"))
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides k=v")
    return parser.parse_args()


def bench_config(args):
    from raytron.config import load_config
    return load_config(args.config, [
        "parallel.dp=1", "parallel.pp=1", "parallel.tp=1", "resources.num_workers=1",
        f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum_steps={args.accum}",
        "train.precision=bf16", f"train.compile={str(args.compile).lower()}",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}", *args.set])


def raytron_step(cfg):
    """The DeepSpeed engine of one Ray Train worker, in a world of one process."""
    import deepspeed

    from raytron.parallel.topology import Topology
    from raytron.train.engine import TrainingEngine

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl")
    engine = TrainingEngine(cfg, Topology.from_world(1, 1, 1))
    return engine.train_step


def torch_step(cfg):
    import torch

    from raytron.model.gpt import build_model
    from raytron.train.engine import _param_groups

    model = build_model(cfg.model, cfg.train.seed, padded_vocab=cfg.padded_vocab_size).cuda()
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        model.compile()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=cfg.train.betas, fused=True)

    def step(micro_batches):
        total = 0.0
        for block in micro_batches:
            block = block.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(model(block[:, :-1]), block[:, 1:]) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)
    return step


def measure(args) -> dict:
    import torch

    from raytron.model.flops import peak_bf16_flops, training_flops_per_token
    from raytron.model.gpt import count_parameters

    cfg = bench_config(args)
    train = cfg.train
    started = time.perf_counter()
    step = raytron_step(cfg) if args.impl == "raytron" else torch_step(cfg)
    setup_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    # steps x grad_accum micro-batches of (micro, T+1) ids, pinned so the copy overlaps compute
    batches = [[torch.randint(0, cfg.model.vocab_size, (train.micro_batch_size, train.seq_len + 1),
                              generator=generator).pin_memory() for _ in range(train.grad_accum_steps)]
               for _ in range(args.steps)]
    losses, times = [], []
    for micro_batches in batches:
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(step(micro_batches))  # float(loss) synchronises
        times.append(time.perf_counter() - started)
    window = times[args.warmup:]
    tokens_per_step = train.micro_batch_size * train.grad_accum_steps * train.seq_len
    tokens_per_s = tokens_per_step * len(window) / sum(window)
    model_flops = training_flops_per_token(cfg.model, train.seq_len, cfg.padded_vocab_size, False)
    peak = peak_bf16_flops()
    return {
        "impl": args.impl, "device": torch.cuda.get_device_name(), "compile": train.compile,
        "activation_checkpointing": train.activation_checkpointing,
        "parameters": count_parameters(cfg.model), "seq_len": train.seq_len,
        "micro_batch": train.micro_batch_size, "grad_accum": train.grad_accum_steps,
        "setup_s": round(setup_s, 1), "step_s": round(sum(window) / len(window), 4),
        "tokens_per_s": round(tokens_per_s), "model_tflops": round(tokens_per_s * model_flops / 1e12, 1),
        "mfu": round(tokens_per_s * model_flops / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
    }


def main() -> None:
    args = parse_args()
    if args.impl != "both":
        print(json.dumps(measure(args)), flush=True)
        return
    results = {}
    for impl in ("raytron", "torch"):
        command = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(results[impl]), flush=True)
    ratio = results["raytron"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    print(f"raytron MFU {results['raytron']['mfu']:.1%}, bare torch MFU {results['torch']['mfu']:.1%}, "
          f"raytron/torch tokens/s {ratio:.2f}")


if __name__ == "__main__":
    main()
