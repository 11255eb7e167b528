"""Checks that need a cluster but no trial: the default prepared location follows the data's fingerprint, not
the run name (two runs of one corpus under different names tokenize it once); a trial the cluster can never host
fails before any trial starts."""

from __future__ import annotations

import pytest

from raytron.config import load_config
from raytron.data.corpus import build_docstring_corpus
from raytron.data.prepare import prepare
from raytron.storage import list_dirs
from raytron.train.cluster import ResourceError
from raytron.tune.sweep import run_sweep

SMOKE = "jobs/configs/tune_smoke.yaml"
SETTINGS = ["model.vocab_size=512", "train.seq_len=32", "data.validation_fraction=0.1"]


def test_two_run_names_share_one_prepared_dataset(ray_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    build_docstring_corpus(corpus, max_bytes=60_000, docs_per_shard=60)
    (corpus / "_SUCCESS").unlink()
    storage = tmp_path / "runs"

    def run(name: str, *extra: str):
        return prepare(load_config(None, [f"name={name}", f"data.source={corpus}", f"train.storage_path={storage}",
                                          *SETTINGS, *extra]), tmp_path)

    first = run("first")
    second = run("second")
    assert not first.reused and second.reused
    assert first.url == second.url == str(storage / "prepared" / first.manifest.fingerprint[:16])
    longer = run("first", "train.seq_len=48")  # other data under the same name: a folder of its own
    assert not longer.reused and longer.url != first.url
    assert run("third").reused  # the first dataset is still there, untouched


def test_trial_larger_than_the_cluster_fails_before_any_trial(ray_cluster, tmp_path):
    cfg = load_config(SMOKE, ["tune.search_space={resources.cpus_per_worker: {grid: [1, 64]}}",
                              f"train.storage_path={tmp_path}"])
    expected = r"trial point \{'resources.cpus_per_worker': 64.0\}: the cluster can never host"
    with pytest.raises(ResourceError, match=expected):
        run_sweep(cfg, workdir=tmp_path)
    assert not list_dirs(str(tmp_path))  # nothing started, nothing written
