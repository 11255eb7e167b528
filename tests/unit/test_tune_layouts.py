"""tune.layouts: auto enumerates every valid layout for the worker count at a fixed global batch."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from raytron.config import ConfigError, load_config
from raytron.tune.layouts import layout_sweep, valid_layouts
from raytron.tune.space import LAYOUT, param_space, validate_sweep

LAYOUT_EXAMPLE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tune_layouts_smoke.yaml"


def independent_enumeration(workers, global_batch, layers, heads, ffn, zero_stage):
    """Brute force over every small tuple, with the rules written out again."""
    found = set()
    for dp, pp, tp, micro, accum in itertools.product(range(1, 9), repeat=5):
        if dp * pp * tp != workers or micro * accum * dp != global_batch:
            continue
        if layers % pp or heads % tp or ffn % tp or (pp > 1 and zero_stage > 1):
            continue
        found.add((dp, pp, tp, micro, accum))
    return found


def test_four_workers_enumerate_every_valid_layout_and_no_invalid_one():
    cfg = load_config(LAYOUT_EXAMPLE)
    assert (cfg.world_size, cfg.global_batch_size) == (4, 8)
    valid, invalid = valid_layouts(cfg)
    expected = independent_enumeration(4, 8, cfg.model.num_layers, cfg.model.num_heads, cfg.model.ffn_size,
                                       cfg.parallel.zero_stage)
    assert {tuple(layout.values()) for layout in valid} == expected
    assert len(valid) == len(expected) and expected
    reasons = {tuple(layout.values()): why for layout, why in invalid}
    assert any("model.num_layers" in why for why in reasons.values())  # pp=4 with 2 layers is left out
    assert not set(reasons) & expected


def test_layout_sweep_runs_each_layout_for_layout_steps_ranked_by_throughput():
    sweep, layouts = layout_sweep(load_config(LAYOUT_EXAMPLE))
    assert (sweep.tune.metric, sweep.tune.mode, sweep.tune.scheduler) == ("tokens_per_s", "max", "fifo")
    assert sweep.train.steps == sweep.tune.layout_steps
    assert len(validate_sweep(sweep, layouts)) == len(layouts)
    assert param_space(sweep, layouts)[LAYOUT] == {"grid_search": layouts}


def test_memory_limit_leaves_out_layouts_that_do_not_fit():
    everything, _ = valid_layouts(load_config(LAYOUT_EXAMPLE))
    tight, invalid = valid_layouts(load_config(LAYOUT_EXAMPLE, ["resources.memory_per_worker_gb=0.0004"]))
    assert 0 < len(tight) < len(everything)  # unsharded layouts (dp only, ZeRO 0) hold the whole model per rank
    too_big = [why for _, why in invalid if "GB" in why]
    assert too_big and all("resources.memory_per_worker_gb is 0.0004" in why for why in too_big)
    with pytest.raises(ConfigError, match="no valid layout"):
        layout_sweep(load_config(LAYOUT_EXAMPLE, ["resources.memory_per_worker_gb=1.0e-9"]))
