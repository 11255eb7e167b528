"""The node-local cache behind model.init_from (s3://, models:/): filled once however many processes
ask at once, nothing half-written left after a failed fill; and no random init with init_from."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from raytron.config import ModelConfig
from raytron.model import init
from raytron.model.gpt import build_model
from raytron.storage import cached_folder


def _fetch(cache: str, log: str, key: str, results) -> None:
    import os

    os.environ["RAYTRON_CACHE_DIR"] = cache

    def fill(folder: Path) -> None:
        with open(log, "a") as sink:
            sink.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that the other processes ask while this one fills
        (folder / "weights").write_text("w")

    results.put(str(cached_folder(key, fill)))


def test_one_fill_for_concurrent_processes(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_fetch, args=(str(tmp_path / "cache"), str(tmp_path / "log"), "s3://b/m",
                                                      results)) for _ in range(4)]
    for process in processes:
        process.start()
    folders = {results.get(timeout=60) for _ in processes}
    for process in processes:
        process.join(timeout=60)
    assert len((tmp_path / "log").read_text().splitlines()) == 1
    assert len(folders) == 1 and (Path(folders.pop()) / "weights").read_text() == "w"


def test_failed_fill_leaves_nothing_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTRON_CACHE_DIR", str(tmp_path))

    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        cached_folder("key", broken)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    folder = cached_folder("key", lambda f: (f / "ok").write_text("1"))
    assert sorted(p.name for p in folder.iterdir()) == ["ok"]


def test_init_from_skips_random_init(monkeypatch):
    drawn = []
    real = init.parameter_generator
    monkeypatch.setattr(init, "parameter_generator", lambda seed, name: drawn.append(name) or real(seed, name))
    cfg = ModelConfig(flavour="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4)
    build_model(cfg)
    assert drawn  # the spy sees a random init
    drawn.clear()
    build_model(cfg.model_copy(update={"init_from": "/models/x"}))
    assert drawn == []
