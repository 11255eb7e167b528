"""Tokenize+pack throughput: the Ray Data prepare pipeline vs ``tokenizer.encode_batch`` in one process.

Both sides get the same corpus (JSONL shards of the docstring corpus with site-packages,
copied under new names until it reaches --mbytes), the same tokenizer (trained once on a
sample, untimed) and the same machine, in one run:

  single   this process: the texts are read from the JSONL files first (untimed), then, timed,
           ``tokenizer.encode_batch`` over chunks of about 2 MB of text (the pipeline's block size),
           ids + EOS per document, packed into seq_len + 1 blocks by the same BlockPacker;
           a second line does the same with ``encode_batch_fast`` (no character offsets), which the
           pipeline uses
  ray      ``raytron.data.prepare.prepare`` on a local Ray cluster started here (not timed), with the
           tokenizer given: listing, reading and parsing the JSONL in Ray Data read tasks,
           tokenizing in the actor pool, packing and writing zstd Parquet shards + manifest. All of it
           is timed, start-up included (the actor pool starts inside prepare)

tokens/s = ids in blocks (EOS included) / wall time. The ratio is ray / single (encode_batch).

    .venv/bin/python bench/bench_prepare.py                        # ~100 MB, a few minutes on 2 cores
    .venv/bin/python bench/bench_prepare.py --mbytes 20 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import ray

from raytron.config import load_config
from raytron.data.corpus import build_docstring_corpus
from raytron.data.datasource import BLOCK_TEXT_BYTES
from raytron.data.packing import BlockPacker
from raytron.data.prepare import prepare
from raytron.data.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer


def corpus_files(workdir: Path, mbytes: int) -> list[Path]:
    """The docstring corpus (stdlib + site-packages) plus copies of its shards up to ``mbytes``."""
    base = build_docstring_corpus(workdir / "docstrings", include_site_packages=True)
    folder = workdir / f"corpus-{mbytes}mb"
    if not folder.exists():
        scratch = folder.with_suffix(".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        total, copy = 0, 0
        while total < mbytes * 1_000_000:
            for path in base.paths:
                shutil.copy(path, scratch / f"copy{copy:02d}-{path.name}")
                total += path.stat().st_size
                if total >= mbytes * 1_000_000:
                    break
            copy += 1
        scratch.rename(folder)
    return sorted(folder.glob("*.jsonl"))


def read_texts(files: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for path in files for line in path.read_text(encoding="utf-8").splitlines()]


def chunks(texts: list[str]) -> list[list[str]]:
    out, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= BLOCK_TEXT_BYTES:
            out.append(current)
            current, size = [], 0
    return out + ([current] if current else [])


def single_process(tokenizer, texts: list[str], seq_len: int, fast: bool) -> tuple[int, float]:
    eos = np.array([tokenizer.token_to_id(EOS_TOKEN)], dtype=np.int32)
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    packer = BlockPacker(seq_len)
    blocks = 0
    started = time.perf_counter()
    for chunk in chunks(texts):
        ids = [piece for encoding in encode(chunk) for piece in (np.asarray(encoding.ids, dtype=np.int32), eos)]
        blocks += len(packer.add(np.concatenate(ids)))
    return blocks * (seq_len + 1), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=int, default=100, help="corpus size in MB of JSONL")
    parser.add_argument("--workdir", default=".raytron/bench-prepare")
    parser.add_argument("--actors", type=int, default=2, help="data.tokenize_actors")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    files = corpus_files(workdir, args.mbytes)
    corpus_bytes = sum(path.stat().st_size for path in files)
    texts = read_texts(files)
    tokenizer = train_tokenizer(texts[:20_000], vocab_size=args.vocab)
    tokenizer_path = save_tokenizer(tokenizer, workdir / f"tokenizer-{args.vocab}")
    print(f"corpus: {len(files)} JSONL files, {corpus_bytes / 1e6:.1f} MB, {len(texts):,} documents; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    # started before anything is timed; logical CPUs above the cores so read tasks and actors both fit
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    print(f"\n{'':32} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'vs encode_batch':>16}")
    results = {}
    for name, fast in (("single encode_batch", False), ("single encode_batch_fast", True)):
        results[name] = single_process(tokenizer, texts, args.seq_len, fast)
        report(name, results)
    del texts

    out = workdir / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"data.source={workdir / f'corpus-{args.mbytes}mb'}", f"data.prepared={out}",
                             f"data.tokenizer={tokenizer_path}", f"model.vocab_size={args.vocab}",
                             f"model.max_position_embeddings={args.seq_len}", f"train.seq_len={args.seq_len}",
                             f"data.tokenize_actors={args.actors}", "data.validation_fraction=0"])
    result = prepare(cfg)
    name = f"ray prepare ({args.actors} actors)"
    results[name] = (result.tokens, result.seconds)
    report(name, results)
    ray.shutdown()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def report(name: str, results: dict[str, tuple[int, float]]) -> None:
    baseline = results["single encode_batch"][0] / results["single encode_batch"][1]
    tokens, seconds = results[name]
    print(f"{name:32} {tokens:12,} {seconds:8.1f} {tokens / seconds:12,.0f} {tokens / seconds / baseline:15.2f}x",
          flush=True)


if __name__ == "__main__":
    main()
