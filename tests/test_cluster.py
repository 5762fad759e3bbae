import pytest

import meshplan as mp


@pytest.mark.parametrize("name", mp.cluster_names())
def test_catalog_clusters_load_and_cite(name):
    c = mp.load_cluster(name)
    assert c.source and c.device.hbm_bytes > 0 and c.node.gpus_per_node >= 1


def test_standard_nodes():
    h100 = mp.load_cluster("h100-sxm")
    assert h100.node.gpus_per_node == 8 and h100.node.nics_per_node == 8
    assert h100.node.nic_bw_bytes_per_s * 8 == pytest.approx(400e9)  # NDR 400 Gb/s
    a100 = mp.load_cluster("a100-80gb")
    assert a100.node.nic_bw_bytes_per_s * 8 == pytest.approx(200e9)  # HDR 200 Gb/s
    assert "fp8" in h100.device.peak_flops_per_s and "fp8" not in a100.device.peak_flops_per_s


def test_gpus_must_fill_whole_nodes():
    with pytest.raises(mp.SpecError, match="whole number of 8-GPU nodes"):
        mp.load_cluster("h100-sxm", gpus=12)


def test_topology_graph_tiers():
    c = mp.load_cluster("h100-sxm", gpus=64 * 8)
    g = c.topology
    assert sum(1 for n in g if n.startswith("gpu")) == 512
    assert {d["tier"] for _, _, d in g.edges(data=True)} == {"node", "leaf", "spine"}
    assert c.span_tier(8, 8) == "node" and c.span_tier(1, 64) == "spine"
    assert c.span_tier(8, 64) == "leaf"


def test_power_cap_derates_peak():
    from dataclasses import replace
    d = mp.load_cluster("h100-sxm").device
    capped = replace(d, power_limit_w=500)
    assert capped.peak("bf16") == pytest.approx(d.peak("bf16") * (500 / 700) ** (1 / 3))


def test_unsupported_dtype_names_the_device():
    with pytest.raises(mp.SpecError, match="V100.*bf16"):
        mp.load_cluster("v100-32gb").device.peak("bf16")
