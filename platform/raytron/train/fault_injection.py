"""Test-only fault injection, set in the driver's environment and forwarded to the workers with the
train loop config. Once (the marker file records that it happened), after that step, that rank's worker:

  RAYTRON_FAULT=rank:step:marker        dies (``os._exit``) a few seconds later: a crashed worker process;
  RAYTRON_FAULT=hang:rank:step:marker   stops making progress until something kills it, so a test can
                                        take its node away while the run is provably mid-way.

The marker is JSON naming the rank, the step and the node (Ray's node id) the worker ran on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray

ENV_VAR = "RAYTRON_FAULT"
HANG = "hang:"
EXIT_DELAY_S = 6.0
"""Before dying: three of Ray Train's 2 s polls of the workers' reports, so the controller has registered the
checkpoint reported before the fault and a test knows which checkpoint the restarted group starts from."""


def maybe_crash(spec: str | None, rank: int, step: int) -> None:
    if not spec:
        return
    hang = spec.startswith(HANG)
    crash_rank, crash_step, marker = spec.removeprefix(HANG).split(":", 2)
    if rank != int(crash_rank) or step != int(crash_step) or Path(marker).exists():
        return
    record = {"rank": rank, "step": step, "node_id": ray.get_runtime_context().get_node_id(),
              "fault": "hang" if hang else "exit"}
    # written whole, then renamed: a test polling for the marker never reads half of it
    Path(f"{marker}.part").write_text(json.dumps(record))
    os.replace(f"{marker}.part", marker)
    if not hang:
        time.sleep(EXIT_DELAY_S)
        os._exit(1)
    while True:  # until the node (or the test's timeout) kills this process
        time.sleep(60)
