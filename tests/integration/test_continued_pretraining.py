"""Continued pretraining of an imported Llama on plain text, through Ray: a tiny Llama built with `transformers`
and a Llama tokenizer folder (no <|endoftext|>: documents end with its </s>, start with its <s>) is prepared
and streamed into the same blocks, transformers' ids framed by its BOS and EOS, and `raytron train` with
``model.init_from`` runs a few steps on them."""

from __future__ import annotations

import json
import math

import numpy as np
from transformers import AutoTokenizer

from raytron.data.prepare import prepare
from raytron.data.shards import read_split
from raytron.data.sources import list_sources
from raytron.data.stream import packed_blocks
from raytron.data.tokenizer_source import load_configured
from raytron.parallel.hf_import import resolve_init_from
from raytron.train.run import run_training
from tests.hf_models import save_llama_tokenizer, save_tiny

SEQ = 32
STEPS = 3
TEXTS = [f"the cat number {i} sat on the mat and the dog said {i % 7} words to it." for i in range(120)]


def test_a_llama_continues_pretraining_on_documents_framed_by_its_own_tokens(ray_cluster, tmp_path):
    folder = tmp_path / "llama"
    save_tiny("llama-tied", folder)
    save_llama_tokenizer(folder, TEXTS)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):  # listed in sorted order: part-0's documents first
        (corpus / f"part-{part}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n"
                                                           for text in TEXTS[part::2]))
    cfg = resolve_init_from({
        "name": "continued-pretraining", "model": {"init_from": str(folder)},
        "parallel": {"zero_stage": 0},
        "train": {"seq_len": SEQ, "steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3,
                  "warmup_steps": 1, "log_every": 1, "checkpoint_every": STEPS, "threads": 1,
                  "storage_path": str(tmp_path / "runs")},
        "data": {"source": str(corpus), "validation_fraction": 0.0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    assert cfg.data.tokenizer == str(folder)

    manifest = prepare(cfg).manifest
    assert manifest.settings["documents"] == {"bos_token": "<s>", "eos_token": "</s>"}
    blocks = read_split(manifest.splits["train"])[0]  # (rows, SEQ + 1)
    theirs = AutoTokenizer.from_pretrained(folder)
    stream = [i for text in TEXTS[0::2] + TEXTS[1::2] for i in [*theirs(text)["input_ids"], theirs.eos_token_id]]
    assert stream[0] == theirs.bos_token_id and blocks.size > 0
    assert blocks.reshape(-1).tolist() == stream[:blocks.size]
    # data.mode: streaming packs the same blocks
    streamed = np.concatenate(list(packed_blocks(cfg, list_sources(cfg), "train", load_configured(cfg))))
    np.testing.assert_array_equal(streamed, blocks)

    result = run_training(cfg, workdir=tmp_path)
    losses = result.metrics["losses"]
    assert sorted(int(step) for step in losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
