"""data.mode: streaming -- each DP reader tokenizes and packs its own raw files online: groups get
disjoint files, blocks equal the prepare pipeline's for those files, a resume continues the
epoch exactly, and `raytron train` runs and resumes on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytron.config import load_config
from raytron.data.corpus import build_docstring_corpus
from raytron.data.stream import packed_blocks
from raytron.train.run import run_training, streaming_training_data
from tests.integration.test_train_parity import BASE

FILE_DOCS = [40, 90, 25, 70, 55]  # documents per raw file: unequal on purpose


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory):
    """Docstrings as five JSONL files of unequal size."""
    built = build_docstring_corpus(tmp_path_factory.mktemp("docstrings"), max_bytes=300_000)
    texts = [json.loads(line)["text"] for path in built.paths for line in open(path)]
    folder = tmp_path_factory.mktemp("raw")
    first = 0
    for index, count in enumerate(FILE_DOCS):
        with open(folder / f"part-{index}.jsonl", "w") as out:
            out.writelines(json.dumps({"text": text}) + "\n" for text in texts[first:first + count])
        first += count
    return folder


def streaming_config(raw_corpus, tmp_path, *extra: str):
    return load_config("jobs/configs/tiny_smoke.yaml", BASE + [
        f"data.source={raw_corpus}", "data.mode=streaming", "data.validation_fraction=0.1",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra])


def test_groups_stream_their_own_files_and_resume_inside_the_epoch(ray_cluster, raw_corpus, tmp_path):
    cfg = streaming_config(raw_corpus, tmp_path)
    data = streaming_training_data(cfg, tmp_path)
    source = data.train
    mine, theirs = source.files_of(0, 0, 2), source.files_of(0, 1, 2)
    assert len(mine) + len(theirs) == 5 and not {f.url for f in mine} & {f.url for f in theirs}
    assert source.files_of(1, 0, 2) != mine  # another epoch deals the files anew

    batches = [batch["tokens"] for batch in source.batches(0, 0, 4, 0, 2)]
    assert len(batches) > 4 and all(batch.shape == (4, 33) for batch in batches)
    packed = np.concatenate(list(packed_blocks(cfg, mine, "train", source.tokenizer)))
    np.testing.assert_array_equal(np.concatenate(batches), packed[:4 * len(batches)])

    resumed = [batch["tokens"] for batch in source.batches(0, 3, 4, 0, 2)]
    assert len(resumed) == len(batches) - 3
    for got, expected in zip(resumed, batches[3:]):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_streaming_training_runs_and_resumes(ray_cluster, raw_corpus, tmp_path):
    common = ["parallel.dp=2", "train.grad_accum_steps=1", "train.checkpoint_every=2", "train.eval_every=2",
              "name=streaming"]
    first = run_training(streaming_config(raw_corpus, tmp_path, *common, "train.steps=4"), workdir=tmp_path)
    assert sorted(first.metrics["losses"]) == [1, 2, 3, 4]
    assert 0.0 <= first.metrics["data_wait_share"] < 1.0 and "val_loss" in first.metrics
    resumed = run_training(streaming_config(raw_corpus, tmp_path, *common, "train.steps=6"),
                           resume=True, workdir=tmp_path)
    assert resumed.run_name == first.run_name and sorted(resumed.metrics["losses"]) == [5, 6]
