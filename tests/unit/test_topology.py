"""Rank order tp fastest, then dp, then pp (DeepSpeed's pipe/data/model axes)."""

from raytron.parallel.topology import Layout


def test_rank_order_tp_fastest_then_dp_then_pp():
    layout = Layout(dp=2, pp=2, tp=2)
    assert [layout.coordinates(r) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert layout.coordinates(4) == (0, 1, 0)
    assert all(layout.rank_of(*layout.coordinates(r)) == r for r in range(8))


def test_groups_partition_the_world():
    layout = Layout(dp=2, pp=2, tp=2)
    assert layout.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.data_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    for groups in (layout.tp_groups(), layout.dp_groups(), layout.pp_groups(), layout.data_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))
