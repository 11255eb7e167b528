"""Connecting to Ray and checking, before anything waits, that the cluster can host the run."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

import ray

from raytron.config import RaytronConfig
from raytron.model.memory import over_memory_limit
from raytron.train.capacity import Capacity, ResourceError, require_capacity, waiting_for

__all__ = ["ResourceError", "connect", "ensure_resources", "reporting_scale_up", "worker_bundle", "worker_resources"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
ACCELERATOR_PREFIX = "accelerator_type:"  # ray._private.ray_constants.RESOURCE_CONSTRAINT_PREFIX
log = logging.getLogger(__name__)


def connect(cfg: RaytronConfig) -> str | None:
    """Join $RAY_ADDRESS, else a running local cluster, else start one sized for the run ($RAY_ADDRESS=local
    always starts one). Returns the dashboard URL when this call connected."""
    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address is None:
        try:
            return ray.init(address="auto", runtime_env={"py_modules": [str(PACKAGE_DIR)]}).dashboard_url
        except ConnectionError:
            pass
    elif address != "local":
        return ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE_DIR)]}).dashboard_url
    return _start_local_cluster(cfg)


def _start_local_cluster(cfg: RaytronConfig) -> str | None:
    # Train workers take a CPU each and Ray Data needs some too: over-subscribe
    # logical CPUs so a 2-core laptop does not deadlock (seen with Ray Data).
    logical_cpus = max(os.cpu_count() or 1, int(cfg.world_size * cfg.resources.cpus_per_worker) + 2)
    # Ray Train's preemption watcher polls for spot-instance notices: one node we started has none, and the
    # watcher is one more Python process to start (~2.5 s of CPU). The cluster's processes inherit this.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    return ray.init(address="local", num_cpus=logical_cpus, include_dashboard=True,
                    dashboard_host="127.0.0.1").dashboard_url


def worker_resources(cfg: RaytronConfig) -> dict[str, float]:
    """What each Ray Train worker reserves (ScalingConfig.resources_per_worker)."""
    gpus = cfg.resources.gpus_per_worker
    return {"CPU": cfg.resources.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {}), **cfg.resources.custom}


def worker_bundle(cfg: RaytronConfig) -> dict[str, float]:
    """One worker's placement-group bundle, as Ray Train builds it: an accelerator type is a tiny claim on
    the resource ``accelerator_type:<type>`` that Ray gives nodes of that type."""
    accelerator = cfg.resources.accelerator_type
    return {**worker_resources(cfg), **({f"{ACCELERATOR_PREFIX}{accelerator}": 0.001} if accelerator else {})}


def ensure_resources(cfg: RaytronConfig) -> Capacity:
    """Fail now, naming the fields, when even the largest cluster the autoscaler can make cannot host the run,
    instead of letting Ray wait forever for a placement; say what is waited for when nodes must come up."""
    too_big = over_memory_limit(cfg)
    if too_big:
        raise ResourceError(f"this run does not fit its workers: {too_big}")
    workers, res = cfg.world_size, cfg.resources
    what = (f"{workers} workers (parallel.dp x pp x tp) x resources.cpus_per_worker={res.cpus_per_worker:g}, "
            f"resources.gpus_per_worker={res.gpus_per_worker:g}, resources.custom={dict(res.custom)}, "
            f"resources.accelerator_type={res.accelerator_type}")
    return require_capacity(worker_bundle(cfg), workers, what)


@contextlib.contextmanager
def reporting_scale_up(cfg: RaytronConfig, capacity: Capacity, poll_s: float = 5.0) -> Iterator[None]:
    """While the body runs, say on the console what the run waits for each time the live nodes change,
    until they can host every worker (then stay quiet)."""
    bundle, workers = worker_bundle(cfg), cfg.world_size
    waiting = waiting_for(bundle, workers, capacity)
    if waiting is None:
        yield
        return
    log.warning("%s", waiting)
    done = threading.Event()

    def watch() -> None:
        seen = len(capacity.live_nodes)
        while not done.wait(poll_s):
            now = Capacity.read()
            if len(now.live_nodes) != seen:
                seen = len(now.live_nodes)
                log.warning("%d nodes up; %s", seen, waiting_for(bundle, workers, now) or "every worker fits: starting")
            if now.live_fit(bundle) >= workers:
                return
    watcher = threading.Thread(target=watch, name="raytron-scale-up", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
