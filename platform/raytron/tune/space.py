"""A sweep's search space: its keys checked against the config tree, every trial it can yield checked as a
run, and the same space handed to Ray Tune.

A trial is the sweep's config with one value per swept key put in (``trial_config``). Before the first
trial starts, ``validate_sweep`` builds the config of every point the space can yield as far as that is
finite (each grid and choice value; both ends of a range) and fails naming the point and the field,
instead of a trial failing an hour into the sweep.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from ray import tune

from raytron.config import ConfigError, RaytronConfig, build_config, schema_rows
from raytron.tune_config import SearchDistribution

DATA_CHANGING_KEYS = ("data.", "train.seq_len", "model.vocab_size")
"""Keys whose values change the prepared shards (sources, tokenizer, block length): the sweep prepares the
data once, so they are refused."""
UNSWEEPABLE_KEYS = ("name", "tune.")
"""The sweep's own identity: each trial gets its name from the sweep."""
OVERRIDES = "overrides"
"""The key of Tune's param_space under which a trial's {dotted key: value} arrives."""
LAYOUT = "layout"
"""The key under which a layout sweep's trial gets its {dotted key: value} layout (one grid over whole layouts)."""


def sweep_name(cfg: RaytronConfig) -> str:
    return cfg.tune.name or cfg.name


def settable_keys() -> set[str]:
    return {path for path, *_ in schema_rows()}


def swept_key_problems(cfg: RaytronConfig) -> list[str]:
    """Each swept key must be a settable field that leaves the data and the sweep's identity alone."""
    known = settable_keys()
    problems = []
    for key in cfg.tune.search_space:
        field = f"tune.search_space.{key}"
        if key.startswith(UNSWEEPABLE_KEYS):
            problems.append(f"{field}: the sweep's own settings cannot be swept")
        elif key.startswith(DATA_CHANGING_KEYS):
            problems.append(f"{field}: changes the prepared data, which a sweep prepares once; "
                            "run one sweep per value instead")
        elif key not in known and not key.startswith("deepspeed_overrides."):
            problems.append(f"{field}: not a config field (see `raytron config --schema`)")
    return problems


def assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping in place, creating sections on the way."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def trial_config(base: dict[str, Any], overrides: dict[str, Any], source: str = "<trial>") -> RaytronConfig:
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        assign(raw, key, value)
    return build_config(raw, source)


def boundary_values(distribution: SearchDistribution) -> list[Any]:
    """The values that stand for a distribution when checking trials: all of a list, both ends of a range."""
    kind, values = distribution.kind, distribution.values
    if kind in ("grid", "choice"):
        return list(values)
    if kind == "randint":  # Tune's randint excludes hi
        return [values[0], values[1] - 1]
    return [values[0], values[1]]


def checked_points(cfg: RaytronConfig) -> list[dict[str, Any]]:
    """Every combination of every swept key's boundary values."""
    keys = list(cfg.tune.search_space)
    choices = [boundary_values(cfg.tune.search_space[key]) for key in keys]
    return [dict(zip(keys, combination)) for combination in itertools.product(*choices)]


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config back as {dotted key: value}: its search-space values and its layout."""
    return {**config.get(OVERRIDES, {}), **config.get(LAYOUT, {})}


def planned_steps(config: dict[str, Any], default_steps: int) -> int:
    """The steps a trial runs to (train.steps may itself be swept)."""
    return int(trial_overrides(config).get("train.steps", default_steps))


def validate_sweep(cfg: RaytronConfig, layouts: list[dict[str, Any]] = ()) -> list[RaytronConfig]:
    """The configs of every checked point (with every layout of a layout sweep); ConfigError naming each bad
    point and its fields otherwise."""
    if not cfg.tune.search_space and not layouts:
        raise ConfigError("tune.search_space: empty; a sweep needs at least one swept key (or tune.layouts: auto)")
    problems = swept_key_problems(cfg)
    if problems:
        raise ConfigError("invalid sweep:\n" + "\n".join(f"  - {problem}" for problem in problems))
    base, configs, bad = cfg.to_dict(), [], []
    points = [{**point, **layout} for point in checked_points(cfg) for layout in (layouts or [{}])]
    for point in points:
        try:
            configs.append(trial_config(base, point, f"trial point {point}"))
        except ConfigError as error:
            bad.append(str(error))
    if bad:
        raise ConfigError(f"{len(bad)} trial point(s) of tune.search_space cannot run:\n" + "\n".join(bad))
    return configs


def param_space(cfg: RaytronConfig, layouts: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The search space in Ray Tune's terms, under OVERRIDES (and a layout sweep's layouts under LAYOUT)."""
    build = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    space = {OVERRIDES: {key: build[dist.kind](list(dist.values)) for key, dist in cfg.tune.search_space.items()}}
    if layouts:
        space[LAYOUT] = tune.grid_search(list(layouts))
    return space
