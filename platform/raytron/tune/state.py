"""What a sweep's driver records beside its Tune experiment so that ``--resume`` continues the same sweep:
the MLflow parent run, and where and on which data the trials were trained.

The demo corpus and prepared shards are found from the driver's workdir (``.raytron`` under its cwd by
default): a resumed driver started from another folder would otherwise prepare another copy, with another
fingerprint, and the resumed trials would read shards their checkpoints' data positions do not index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from raytron.config import RaytronConfig
from raytron.storage import StorageError, join_url, read_bytes, write_bytes

SWEEP_STATE_FILE = "raytron_sweep.json"


class SweepStateError(RuntimeError):
    pass


@dataclass(frozen=True)
class SweepState:
    parent_run_id: str | None
    """The MLflow parent run (None when tracking is off)."""
    workdir: str
    """The first driver's absolute workdir: the resumed driver prepares (reuses) the data from it."""
    data_fingerprint: str
    """The prepared data every trial read; a resumed sweep must read the same."""


def state_url(experiment_url: str) -> str:
    return join_url(experiment_url, SWEEP_STATE_FILE)


def write_sweep_state(cfg: RaytronConfig, experiment_url: str, state: SweepState) -> None:
    write_bytes(state_url(experiment_url), json.dumps(asdict(state)).encode(), cfg.data.endpoint_url,
                cfg.data.region)


def read_sweep_state(cfg: RaytronConfig, experiment_url: str) -> SweepState:
    url = state_url(experiment_url)
    try:
        raw = json.loads(read_bytes(url, cfg.data.endpoint_url, cfg.data.region))
        return SweepState(raw["parent_run_id"], raw["workdir"], raw["data_fingerprint"])
    except (StorageError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SweepStateError(f"--resume: {url} is missing or unreadable ({error}); this sweep cannot be "
                              "continued as the same sweep, start another with a new tune.name") from None
