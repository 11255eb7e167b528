"""The start-up placement check: TP groups inside one node, else a stop naming layout and nodes."""

from __future__ import annotations

import pytest

from raytron.parallel.topology import Layout
from raytron.train.placement import Placement, PlacementError

NODE_A, NODE_B = "a" * 56, "b" * 56


def test_tp_groups_on_one_node_each_pass_and_are_recorded():
    placement = Placement(Layout(dp=2, tp=2), [NODE_A, NODE_A, NODE_B, NODE_B])
    placement.require_tp_within_nodes()
    recorded = placement.to_dict()
    assert recorded["groups"]["tp"] == [[0, 1], [2, 3]]
    assert recorded["groups"]["dp"] == [[0, 2], [1, 3]]
    assert recorded["rank_nodes"] == [NODE_A, NODE_A, NODE_B, NODE_B]


def test_tp_group_across_nodes_fails_naming_layout_and_nodes():
    # 3 workers on the first node: the second TP group straddles both
    placement = Placement(Layout(dp=2, tp=2), [NODE_A, NODE_A, NODE_A, NODE_B])
    assert placement.split_tp_groups() == [([2, 3], [NODE_A, NODE_B])]
    with pytest.raises(PlacementError, match=r"parallel.tp=2: a TP group spans nodes \(layout dp=2 x pp=1 x tp=2"
                                             r".*ranks \[2, 3\] on nodes aaaaaaaaaaaa, bbbbbbbbbbbb"
                                             r".*aaaaaaaaaaaa: ranks \[0, 1, 2\], bbbbbbbbbbbb: ranks \[3\]"):
        placement.require_tp_within_nodes()


def test_dp_across_nodes_is_fine():
    Placement(Layout(dp=2, pp=2), [NODE_A, NODE_B, NODE_A, NODE_B]).require_tp_within_nodes()
