"""A tp=2 serving group's decode tokens/s / a tp=1 model's, on the same cores, at batch 1 and 16,
with where rank 0's time goes: the step-plan broadcast to the worker actor, the all-reduces of the
row-parallel layers and the logits' all-gather.

Both run the serving path's own forward (``decode_step`` over a slotted KV cache) in Ray actors of
one CPU each, one after the other in one run: tp=1 is one actor (the TP=1 GPT as load_model gives
it, in the decode layout), tp=2 is rank 0 in one actor and its TPRank actor beside it.

    .venv/bin/python bench/bench_serve_tp.py [--steps 64] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")
sys.path.insert(0, PLATFORM)

import ray  # noqa: E402
import torch  # noqa: E402

from raytron.config import ModelConfig  # noqa: E402
from raytron.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from raytron.export.huggingface import export_huggingface  # noqa: E402
from raytron.model.generation import decode_step, prefill  # noqa: E402
from raytron.model.gpt import build_model  # noqa: E402

PROMPT = 16


def timed_decode(model, batch: int, steps: int) -> float:
    """Seconds per decode step of ``batch`` sequences after a prompt of PROMPT tokens (median of steps)."""
    cache = model.new_cache(batch, PROMPT + steps + 1)
    with torch.no_grad():
        prefill(model, [[3] * PROMPT] * batch, cache)
        times = []
        for step in range(steps):
            start = time.perf_counter()
            decode_step(model, [5] * batch, [PROMPT + step] * batch, cache)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@ray.remote(num_cpus=1)
class Serial:
    def __init__(self, folder: str):
        from raytron.serve.model_source import load_model

        torch.set_num_threads(1)
        self.model = load_model(folder).model

    def run(self, batch: int, steps: int) -> dict:
        return {"step_s": timed_decode(self.model, batch, steps)}


@ray.remote(num_cpus=1)
class Rank0:
    def __init__(self, folder: str):
        import torch.distributed as dist

        from raytron.serve.tp_group import TPGroup

        torch.set_num_threads(1)
        self.collective_s = 0.0
        for name in ("all_reduce", "all_gather"):  # rank 0's time inside the model's collectives
            setattr(dist, name, self._timed(getattr(dist, name)))
        self.group = TPGroup(folder, 2, slots=16, context=None, device="cpu", num_cpus=1, num_gpus=0)

    def _timed(self, collective):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return collective(*args, **kwargs)
            finally:
                self.collective_s += time.perf_counter() - start
        return run

    def run(self, batch: int, steps: int) -> dict:
        self.collective_s, self.group.sender.seconds = 0.0, 0.0
        start = time.perf_counter()
        step_s = timed_decode(self.group.model, batch, steps)
        total = time.perf_counter() - start
        return {"step_s": step_s, "plan_share": self.group.sender.seconds / total,
                "collective_share": self.collective_s / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    # the actors import this checkout's raytron, not whichever one the venv has installed
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": PLATFORM, "OMP_NUM_THREADS": "1"}})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300,
                                    min_frequency=1)
        cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=8, max_position_embeddings=512)
        folder = export_huggingface(build_model(cfg, seed=0), Path(tmp) / "export",
                                    save_tokenizer(tokenizer, Path(tmp) / "tok"), eos_token_id=0)
        serial, rank0 = Serial.remote(str(folder)), Rank0.remote(str(folder))
        print(f"gpt h={args.hidden} layers={args.layers}, {args.steps} decode steps, 1 thread per rank")
        print("batch  tp1 tok/s  tp2 tok/s  tp2/tp1  plan share  collectives share (of tp2 rank 0's time)")
        for batch in (1, 16):
            one = ray.get(serial.run.remote(batch, args.steps))
            two = ray.get(rank0.run.remote(batch, args.steps))
            print(f"{batch:5d}  {batch / one['step_s']:9.0f}  {batch / two['step_s']:9.0f}  "
                  f"{one['step_s'] / two['step_s']:7.2f}  {two['plan_share']:10.2f}  {two['collective_share']:10.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
