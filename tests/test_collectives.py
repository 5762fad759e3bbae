from dataclasses import replace

import pytest

import meshplan as mp
from meshplan.costmodels import collectives as coll


def test_bus_factors_follow_nccl_convention():
    assert coll.BUS_FACTOR["all_reduce"](8) == pytest.approx(2 * 7 / 8)
    assert coll.BUS_FACTOR["all_gather"](8) == pytest.approx(7 / 8)
    assert coll.BUS_FACTOR["reduce_scatter"](4) == pytest.approx(3 / 4)
    assert coll.BUS_FACTOR["all_to_all"](16) == pytest.approx(15 / 16)


def test_intra_node_all_reduce_uses_nvls_bus_bandwidth():
    c = mp.load_cluster("h100-sxm", 8)
    g = coll.group_of(c, 8, 1)
    size = 1 << 30
    t = coll.collective_time_s(c, g, "all_reduce", size)
    # nccl-tests #212: ~480 GB/s bus bandwidth, so 2*7/8*1 GiB / 480 GB/s plus latency.
    assert t == pytest.approx(2 * 7 / 8 * size / 480e9, rel=0.01)
    ring = coll.collective_time_s(c, g, "all_gather", size)
    assert ring == pytest.approx(7 / 8 * size / (450e9 * 0.82), rel=0.01)


def test_groups_across_nodes_are_bound_by_their_nics():
    c = mp.load_cluster("h100-sxm", 64)
    one_per_node = coll.group_of(c, 8, 8)  # stride 8: one rank per node (DP under TP=8)
    assert one_per_node.per_node == 1 and one_per_node.nodes == 8
    assert coll.bus_bandwidth(c, one_per_node, "all_reduce") == pytest.approx(50e9 * 0.94)
    full = coll.group_of(c, 64, 1)
    # All-reduce inside the node uses NVLS (480 GB/s), so the 8 NICs bound it.
    assert coll.bus_bandwidth(c, full, "all_reduce") == pytest.approx(8 * 50e9 * 0.94)
    assert coll.bus_bandwidth(c, full, "all_gather") == pytest.approx(450e9 * 0.82)


def test_oversubscribed_spine_slows_wide_groups():
    c = mp.load_cluster("h100-sxm", 8 * 64)
    slow = replace(c, network=replace(c.network, oversubscription=2.0))
    g = coll.group_of(c, 64, 8)  # 64 nodes > 32 per leaf: crosses the spine
    size = 1e9
    assert coll.collective_time_s(slow, g, "all_reduce", size) > \
        1.9 * coll.collective_time_s(c, g, "all_reduce", size) - 1e-3


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_more_bandwidth_is_never_slower(op):
    c = mp.load_cluster("a100-80gb", 64)
    fast = replace(c, node=replace(c.node, nic_bw_bytes_per_s=2 * c.node.nic_bw_bytes_per_s,
                                   intra_bw_bytes_per_s=2 * c.node.intra_bw_bytes_per_s))
    for size, stride in [(8, 1), (16, 4), (64, 1), (8, 8)]:
        g = coll.group_of(c, size, stride)
        for nbytes in (1e3, 1e6, 1e9):
            assert coll.collective_time_s(fast, g, op, nbytes) <= \
                coll.collective_time_s(c, g, op, nbytes)


def test_single_rank_costs_nothing():
    c = mp.load_cluster("h100-sxm", 8)
    assert coll.collective_time_s(c, coll.Group(size=1, per_node=1), "all_reduce", 1e9) == 0
