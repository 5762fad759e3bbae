import pytest

import meshplan as mp
from meshplan.costmodels.compute import gemm_efficiency, gemm_time_s


@pytest.fixture(scope="module")
def h100():
    return mp.load_cluster("h100-sxm").device


def test_large_gemm_reaches_mamf(h100):
    # MAMF table: 794.5 TFLOP/s best case; a large aligned GEMM gets close to it.
    m = n = k = 8192
    rate = 2 * m * n * k / gemm_time_s(h100, "bf16", m, n, k)
    assert 0.9 * 794.5e12 < rate <= 794.5e12


def test_shape_matters(h100):
    big = gemm_efficiency(h100, 8192, 8192, 8192)
    assert gemm_efficiency(h100, 8192, 8192, 128) < 0.6 * big  # short K: main-loop fill
    assert gemm_efficiency(h100, 130, 8192, 8192) < gemm_efficiency(h100, 128, 8192, 8192)
    assert gemm_efficiency(h100, 128, 256, 8192) < 0.2  # one tile on 132 SMs


def test_skinny_gemm_is_memory_bound(h100):
    # (1 x 8192) @ (8192 x 8192): reads 128 MiB of weights, 16 MFLOP.
    t = gemm_time_s(h100, "bf16", 1, 8192, 8192)
    assert t == pytest.approx(8192 * 8192 * 2 / (3.35e12 * 0.9) + h100.kernel_overhead_s, rel=0.02)


def test_fp8_is_faster_than_bf16(h100):
    assert gemm_time_s(h100, "fp8", 8192, 8192, 8192) < 0.7 * gemm_time_s(
        h100, "bf16", 8192, 8192, 8192)
