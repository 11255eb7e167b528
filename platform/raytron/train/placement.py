"""Where every rank runs, read at start from the real placement (Ray's node id of each worker).

Tensor-parallel groups all-reduce inside every layer, so a TP group must sit inside one node. Ray
Train numbers workers node by node and raytron's rank order puts tp fastest, so this holds whenever
every node hosts a multiple of tp workers; when it does not, the run stops before the first step
naming the layout and the nodes. The placement (rank -> node, and each TP/PP/DP group) is recorded
in the MLflow run as ``placement.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from raytron.parallel.topology import Layout

ARTIFACT = "placement.json"


class PlacementError(RuntimeError):
    pass


@dataclass
class Placement:
    layout: Layout
    nodes: list[str]
    """Node id of every rank, by rank."""

    def to_dict(self) -> dict:
        layout = self.layout
        return {"dp": layout.dp, "pp": layout.pp, "tp": layout.tp, "rank_nodes": self.nodes,
                "groups": {"tp": layout.tp_groups(), "pp": layout.pp_groups(), "dp": layout.dp_groups()}}

    def split_tp_groups(self) -> list[tuple[list[int], list[str]]]:
        """TP groups whose ranks sit on more than one node, with those nodes."""
        split = []
        for group in self.layout.tp_groups():
            nodes = sorted({self.nodes[rank] for rank in group})
            if len(nodes) > 1:
                split.append((group, nodes))
        return split

    def require_tp_within_nodes(self) -> None:
        split = self.split_tp_groups()
        if not split:
            return
        layout = self.layout
        per_node: dict[str, list[int]] = {}
        for rank, node in enumerate(self.nodes):
            per_node.setdefault(node, []).append(rank)
        groups = "; ".join(f"ranks {group} on nodes {', '.join(node[:12] for node in nodes)}" for group, nodes in split)
        hosted = ", ".join(f"{node[:12]}: ranks {ranks}" for node, ranks in per_node.items())
        raise PlacementError(
            f"parallel.tp={layout.tp}: a TP group spans nodes (layout dp={layout.dp} x pp={layout.pp} x "
            f"tp={layout.tp}, tp fastest): {groups}. Nodes host {hosted}. Give every node a multiple of "
            f"{layout.tp} workers (resources.cpus_per_worker / gpus_per_worker / custom per node type)")


def gather_placement(layout: Layout, node_id: str) -> Placement:
    """Every rank's node id, all-gathered over the world (a collective: every rank calls it)."""
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node_id)
    return Placement(layout, [str(node) for node in nodes])
