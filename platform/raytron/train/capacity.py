"""How many workers of one shape the largest cluster could ever host: the live nodes, plus what the
autoscaler may still add from its node types and their max workers. Train, Tune and Serve ask this
before anything waits, so a request no cluster shape can satisfy fails at once, while one that only
an autoscaled node type satisfies is accepted and waits for its nodes.

Where the node types come from (Ray 2.60):
- autoscaler v2 (KubeRay's default) publishes them to the GCS, where Ray Train's own "can the cluster
  ever host this" check reads them (`ray._private.state.state.get_cluster_config()`);
- the v1 autoscaler (`ray up`, `ray start --autoscaling-config`) publishes no node types. Its launcher
  YAML is read instead: `$RAYTRON_AUTOSCALING_CONFIG`, else `~/ray_bootstrap_config.yaml`, where
  `ray up` puts the bootstrapped YAML (resources filled in) on the head, where `ray job submit` runs
  drivers.
Without either, only the live nodes count (a cluster without an autoscaler).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

AUTOSCALING_CONFIG_ENV = "RAYTRON_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
UNLIMITED = -1


class ResourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float] | None
    """What one node of this type offers; None when the config does not say (then it is assumed to fit)."""
    max_count: int
    """Most nodes of this type the autoscaler may run; UNLIMITED for no limit."""


@dataclass
class Capacity:
    live_nodes: list[dict[str, float]]
    """Total resources of every live node."""
    node_types: list[NodeType] | None
    """The autoscaler's worker node types; None on a cluster without an autoscaler."""
    max_workers: int = UNLIMITED
    """The autoscaler's cap on worker nodes of all types together."""
    source: str = "live nodes"

    @classmethod
    def read(cls) -> Capacity:
        live = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        node_types, max_workers, source = _autoscaler_node_types()
        return cls(live, node_types, max_workers, source)

    def live_fit(self, bundle: dict[str, float]) -> int:
        """Workers of ``bundle`` the live nodes can host (each worker sits on one node)."""
        return sum(fits(node, bundle) for node in self.live_nodes)

    def largest_fit(self, bundle: dict[str, float]) -> int | float:
        """Workers of ``bundle`` the largest cluster can host: the live head plus every worker type at its max
        (best-fitting types first under the global cap), or the live nodes, whichever is more."""
        if self.node_types is None:
            return self.live_fit(bundle)
        heads = sum(fits(node, bundle) for node in self.live_nodes if _is_head(node))
        per_node = sorted(((fits(kind.resources, bundle) if kind.resources is not None else math.inf, kind.max_count)
                           for kind in self.node_types), reverse=True)
        autoscaled, nodes_left = 0, math.inf if self.max_workers == UNLIMITED else self.max_workers
        for fit, count in per_node:
            nodes = nodes_left if count == UNLIMITED else min(count, nodes_left)
            if fit == 0 or nodes == 0:
                continue
            if math.isinf(nodes) or math.isinf(fit):
                return math.inf
            autoscaled += fit * nodes
            nodes_left -= nodes
        return max(self.live_fit(bundle), heads + autoscaled)

    def largest_total(self, name: str) -> float:
        """The most of one resource the largest cluster could have (for the error message)."""
        live = sum(node.get(name, 0.0) for node in self.live_nodes)
        if self.node_types is None:
            return live
        heads = sum(node.get(name, 0.0) for node in self.live_nodes if _is_head(node))
        added = 0.0
        for kind in self.node_types:
            if kind.resources is None or kind.max_count == UNLIMITED:
                return math.inf
            added += kind.resources.get(name, 0.0) * kind.max_count
        return max(live, heads + added)

    def describe_types(self) -> str:
        if self.node_types is None:
            return "no autoscaler: live nodes only"
        kinds = ", ".join(f"{kind.name} x{'any' if kind.max_count == UNLIMITED else kind.max_count} "
                          f"{_shape(kind.resources) if kind.resources is not None else '(unknown)'}"
                          for kind in self.node_types)
        return f"autoscaler node types from {self.source}: {kinds or 'none'}"


def fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` one node holds."""
    # a small slack: Ray keeps fractional resources in 1e-4 units, so 0.1 x 10 must fit in 1.0
    return min((int(node.get(name, 0.0) / amount + 1e-6) for name, amount in bundle.items() if amount > 0), default=0)


def require_capacity(bundle: dict[str, float], count: int, what: str, capacity: Capacity | None = None) -> Capacity:
    """Fail naming ``what`` (the config fields behind the request) when even the largest cluster cannot host
    ``count`` copies of ``bundle``; else return what was read (the caller may report what it waits for)."""
    capacity = capacity or Capacity.read()
    room = capacity.largest_fit(bundle)
    if room >= count:
        return capacity
    totals = [f"{need * count:g} {name} requested, cluster has {capacity.largest_total(name):g}"
              for name, need in bundle.items() if need * count > capacity.largest_total(name)]
    detail = "; ".join(totals) or f"no node shape holds more than {room:g} of {count} workers of {_shape(bundle)}"
    raise ResourceError(f"the cluster can never host this run: {what} -> {detail} ({capacity.describe_types()})")


def waiting_for(bundle: dict[str, float], count: int, capacity: Capacity) -> str | None:
    """What a start that does not fit the live nodes waits for (None when it fits now)."""
    live = capacity.live_fit(bundle)
    if live >= count:
        return None
    return (f"waiting for the autoscaler: {count} workers of {_shape(bundle)}, the live nodes host {live}; "
            f"{capacity.describe_types()}")


def _is_head(node: dict[str, float]) -> bool:
    return "node:__internal_head__" in node


def _shape(resources: dict[str, float]) -> str:
    shown = {name: amount for name, amount in resources.items()
             if not name.startswith("node:") and name not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(shown.items())) + "}"


def _autoscaler_node_types() -> tuple[list[NodeType] | None, int, str]:
    from ray._private.state import state  # Ray Train's own source of the autoscaler's node groups

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        # v2 lists the head's group too; counting it again only ever errs on the side of accepting
        return ([NodeType(group.name, dict(group.resources), group.max_count) for group in config.node_group_configs],
                UNLIMITED, "the GCS (autoscaler v2)")
    path = Path(os.environ.get(AUTOSCALING_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return None, UNLIMITED, "live nodes"
    return (*launcher_node_types(yaml.safe_load(path.read_text())), str(path))


def launcher_node_types(config: dict) -> tuple[list[NodeType], int]:
    """The worker node types of a Ray cluster launcher YAML and its global max_workers."""
    head = config.get("head_node_type")
    global_max = int(config.get("max_workers", UNLIMITED))
    kinds = [NodeType(name, spec.get("resources"), int(spec.get("max_workers", global_max)))
             for name, spec in config.get("available_node_types", {}).items() if name != head]
    return kinds, global_max
