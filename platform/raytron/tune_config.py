"""The ``tune:`` section of a run YAML: what a sweep varies, how it ranks trials and stops them early.

Only the section's own shape is checked here (one distribution per key, non-empty lists, lo < hi);
whether each swept key names a config field and whether every trial it yields is a valid run is
checked by ``raytron.tune.space`` against the whole config, before the first trial.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from raytron.config_base import Section

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class SearchDistribution(Section):
    """The values of one swept key: exactly one of the fields below."""

    grid: list[Any] | None = None
    """Every value is tried (with num_samples > 1, each grid point that many times)."""
    choice: list[Any] | None = None
    """One value drawn per sample."""
    uniform: tuple[float, float] | None = None
    """[lo, hi): a float drawn uniformly."""
    loguniform: tuple[float, float] | None = None
    """[lo, hi): a float drawn uniformly in log space (lo > 0)."""
    randint: tuple[int, int] | None = None
    """[lo, hi): an integer drawn uniformly."""

    @model_validator(mode="after")
    def _one_well_formed_distribution(self) -> SearchDistribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given or 'none'})")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice") and not values:
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{kind}: [lo, hi] needs lo < hi (got {list(values)})")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: lo must be > 0 (got {values[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class TuneConfig(Section):
    name: str | None = None
    """Sweep name: the Tune experiment under train.storage_path and the MLflow parent run; default the run's name."""
    search_space: dict[str, SearchDistribution] = {}
    """Dotted config key -> {grid|choice: [...]} or {uniform|loguniform|randint: [lo, hi]}."""
    num_samples: PositiveInt = 1
    """Samples of the space (with grids: repeats of the whole grid)."""
    metric: str = "loss"
    """A metric the training loop reports (loss, val_loss, tokens_per_s, mfu, ...) that ranks the trials."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher metric is better."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """'fifo' runs every trial to train.steps; 'asha' stops poor trials early (ASHA on the optimizer step)."""
    grace_period: PositiveInt = 1
    """ASHA: optimizer steps every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: rungs at grace_period x reduction_factor^k steps; the best 1/reduction_factor go on."""
    max_concurrent_trials: PositiveInt | None = None
    """Trials running at once; default as many as the cluster can host (CPUs/GPUs of their workers)."""
    layouts: Literal["off", "auto"] = "off"
    """'auto': a throughput sweep over every valid (dp, pp, tp, micro batch, grad accum) at this worker count and global batch."""
    layout_steps: PositiveInt = 10
    """Optimizer steps each layout runs (train.steps of a layout sweep)."""
    export_best: bool = False
    """Export the best trial's final checkpoint and register it in MLflow, tagged with sweep, trial and run."""
