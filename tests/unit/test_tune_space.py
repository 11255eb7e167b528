"""The tune: section and sweep validation: bad sweeps fail before any trial, naming the key and the point."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytron.config import ConfigError, load_config
from raytron.tune.capacity import concurrent_trials
from raytron.tune.space import checked_points, param_space, trial_config, validate_sweep

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tune_smoke.yaml"


def sweep(space: str, *more: str):
    return load_config(SMOKE, [f"tune.search_space={space}", *more])


# (what is wrong, search_space as YAML, other --set, what the message must contain)
BAD_SHAPES = [
    ("unknown distribution", "{train.lr: {gird: [1]}}", [], ["tune.search_space.train.lr.gird: unknown key", "grid"]),
    ("two distributions", "{train.lr: {grid: [1], choice: [2]}}", [], ["tune.search_space.train.lr", "exactly one"]),
    ("empty grid", "{train.lr: {grid: []}}", [], ["tune.search_space.train.lr", "grid: needs at least one value"]),
    ("lo >= hi", "{train.lr: {uniform: [0.1, 0.1]}}", [], ["tune.search_space.train.lr", "lo < hi"]),
    ("loguniform from 0", "{train.lr: {loguniform: [0, 1]}}", [], ["tune.search_space.train.lr", "lo must be > 0"]),
    ("range of strings", "{train.lr: {uniform: [a, b]}}", [], ["tune.search_space.train.lr.uniform", "'a'"]),
    ("distribution not a mapping", "{train.lr: 0.1}", [], ["tune.search_space.train.lr", "0.1"]),
    ("wrong type", "{train.lr: {grid: [1]}}", ["tune.num_samples=many"], ["tune.num_samples", "'many'"]),
    ("unknown tune key", "{train.lr: {grid: [1]}}", ["tune.shceduler=asha"], ["tune.shceduler: unknown key"]),
    ("unknown scheduler", "{train.lr: {grid: [1]}}", ["tune.scheduler=pbt"], ["tune.scheduler", "'asha'"]),
]


@pytest.mark.parametrize("what, space, more, expected", BAD_SHAPES, ids=[case[0] for case in BAD_SHAPES])
def test_bad_tune_section_fails_at_load(what, space, more, expected):
    with pytest.raises(ConfigError) as error:
        sweep(space, *more)
    for text in expected:
        assert text in str(error.value)


BAD_SWEEPS = [
    ("swept key is not a field", "{train.lrr: {grid: [0.1]}}", ["tune.search_space.train.lrr: not a config field"]),
    ("swept key changes the data", "{train.seq_len: {grid: [16, 32]}}",
     ["tune.search_space.train.seq_len: changes the prepared data"]),
    ("swept tokenizer", "{data.tokenizer: {choice: [a.json]}}", ["tune.search_space.data.tokenizer: changes"]),
    ("swept sweep setting", "{tune.num_samples: {grid: [1, 2]}}", ["tune.search_space.tune.num_samples: the sweep"]),
    ("grid point with heads % tp", "{parallel.tp: {grid: [1, 2, 3]}}",
     ["1 trial point(s)", "trial point {'parallel.tp': 3}", "model.num_heads: 4 must be divisible by parallel.tp (3)"]),
    ("range end of a bad combination", "{train.min_lr: {uniform: [1.0e-5, 1.0]}}",
     ["trial point {'train.min_lr': 1.0}", "train.min_lr: 1.0 must not exceed train.lr"]),
    ("value of the wrong type", "{train.warmup_steps: {choice: [1, many]}}",
     ["trial point {'train.warmup_steps': 'many'}", "train.warmup_steps"]),
]


@pytest.mark.parametrize("what, space, expected", BAD_SWEEPS, ids=[case[0] for case in BAD_SWEEPS])
def test_bad_sweep_fails_before_any_trial(what, space, expected):
    with pytest.raises(ConfigError) as error:
        validate_sweep(sweep(space))
    for text in expected:
        assert text in str(error.value)


def test_empty_search_space_is_not_a_sweep():
    with pytest.raises(ConfigError, match="tune.search_space: empty"):
        validate_sweep(load_config(SMOKE, ["tune.search_space={}"]))


def test_every_combination_of_boundary_values_is_checked():
    cfg = sweep("{train.lr: {loguniform: [1.0e-4, 1.0e-2]}, parallel.pp: {grid: [1, 2]},"
                " train.micro_batch_size: {randint: [1, 4]}, train.warmup_steps: {choice: [0, 1, 2]}}")
    points = checked_points(cfg)
    assert len(points) == 2 * 2 * 2 * 3
    assert {point["train.micro_batch_size"] for point in points} == {1, 3}  # randint excludes hi
    configs = validate_sweep(cfg)
    assert {(c.parallel.pp, c.train.lr) for c in configs} == {(1, 1e-4), (1, 1e-2), (2, 1e-4), (2, 1e-2)}


def test_trial_config_puts_the_values_in_and_keeps_the_rest():
    base = load_config(SMOKE)
    cfg = trial_config(base.to_dict(), {"train.lr": 0.01, "parallel.pp": 1, "name": "t-1"})
    assert (cfg.train.lr, cfg.parallel.pp, cfg.name) == (0.01, 1, "t-1")
    assert cfg.model == base.model and base.train.lr == 1e-3  # the base is not changed


def test_param_space_in_tune_terms():
    space = param_space(sweep("{train.lr: {loguniform: [1.0e-4, 1.0e-2]}, train.warmup_steps: {grid: [0, 2]}}"))
    overrides = space["overrides"]
    assert overrides["train.warmup_steps"] == {"grid_search": [0, 2]}
    lr = overrides["train.lr"]
    draws = lr.sample(size=400)
    assert all(1e-4 <= value < 1e-2 for value in draws)
    below_geometric_middle = sum(value < 1e-3 for value in draws) / len(draws)
    assert 0.35 < below_geometric_middle < 0.65  # uniform in log space (a plain uniform gives ~0.09)


def test_concurrency_is_bounded_by_workers_and_leaves_room_for_ray_data():
    two_workers = load_config(SMOKE)  # pp=2, 1 CPU each
    assert concurrent_trials([two_workers], {"CPU": 8.0}) == 3  # (8 - 1 for Ray Data) // 2
    assert concurrent_trials([two_workers], {"CPU": 2.0}) == 1  # never 0: the cluster check refuses what cannot run
    gpu = load_config(SMOKE, ["resources.gpus_per_worker=1"])
    assert concurrent_trials([gpu], {"CPU": 64.0, "GPU": 4.0}) == 2
    assert concurrent_trials([two_workers, load_config(SMOKE, ["parallel.pp=1", "parallel.dp=2",
                                                               "parallel.tp=2"])], {"CPU": 9.0}) == 2
