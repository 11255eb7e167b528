"""Connecting to Ray and checking, before anything waits, that the cluster can host the run."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from raytron.config import RaytronConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class ResourceError(RuntimeError):
    pass


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


def ensure_resources(cfg: RaytronConfig) -> None:
    """Fail now, naming the shortfall, instead of letting Ray wait forever for a placement."""
    workers = cfg.world_size
    available = ray.cluster_resources()
    needs = {"CPU": workers * cfg.resources.cpus_per_worker, "GPU": workers * cfg.resources.gpus_per_worker}
    short = {name: (need, available.get(name, 0.0)) for name, need in needs.items() if need > available.get(name, 0.0)}
    if short:
        detail = ", ".join(f"{need:g} {name} requested, cluster has {have:g}" for name, (need, have) in short.items())
        raise ResourceError(
            f"the cluster can never host this run: {workers} workers (parallel.dp x pp x tp) x "
            f"resources.cpus_per_worker={cfg.resources.cpus_per_worker:g}, "
            f"resources.gpus_per_worker={cfg.resources.gpus_per_worker:g} -> {detail}")
