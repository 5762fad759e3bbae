"""Time of one kernel on one device: shape-dependent, never FLOPs / peak.

GEMMs follow a roofline whose compute roof is the device's best achievable GEMM rate
(MAMF, a microbenchmark) scaled by how well the problem fills the machine:
- tile padding: the output is computed in (tm x tn) tiles, partial tiles do full work;
- wave quantisation: tiles run in waves of `compute_units`, the last wave may be partial
  (NVIDIA, "Matrix Multiplication Background User's Guide", §"Wave quantization");
- main-loop fill: each tile streams K in steps; prologue/epilogue cost about two steps of
  64, so efficiency K / (K + 128) (same guide, "Math and memory bounds").
The BLAS picks the best of a few tile shapes; smaller tiles reuse less data per SM, which
costs throughput (the `_TILES` penalties). The memory roof reads A and B and writes C once.
"""

from __future__ import annotations

import math

from meshplan.core.cluster import DeviceSpec

# (tile scale m, tile scale n, throughput of that tile relative to the largest tile)
_TILES = ((1.0, 1.0, 1.0), (1.0, 0.5, 0.92), (0.5, 0.5, 0.80), (0.25, 0.5, 0.65))
K_FILL = 128  # elements of K whose cost the tile prologue/epilogue adds
ATTN_SEQ_HALF = 256  # key length at which fused attention reaches half its long-seq rate


def gemm_efficiency(dev: DeviceSpec, m: int, n: int, k: int, batch: int = 1) -> float:
    """Fraction of the device's best GEMM rate that an (m x k) @ (k x n) GEMM reaches."""
    best = 0.0
    tm0, tn0 = dev.gemm_tile[0], dev.gemm_tile[1]
    for sm, sn, rel in _TILES:
        tm, tn = max(16, int(tm0 * sm)), max(16, int(tn0 * sn))
        tiles_m, tiles_n = math.ceil(m / tm), math.ceil(n / tn)
        tiles = tiles_m * tiles_n * batch
        waves = math.ceil(tiles / dev.compute_units)
        fill = tiles / (waves * dev.compute_units)
        pad = (m * n) / (tiles_m * tm * tiles_n * tn)
        best = max(best, rel * fill * pad)
    return best * k / (k + K_FILL)


# Searches time the same GEMM shapes for thousands of plans. Keyed by the device's identity;
# the entry holds the device, so its id cannot be reused while cached.
_GEMM_CACHE: dict[tuple, tuple[DeviceSpec, float]] = {}
_GEMM_CACHE_MAX = 200_000


def gemm_time_s(dev: DeviceSpec, dtype: str, m: int, n: int, k: int, batch: int = 1,
                in_bytes: int = 2, out_bytes: int = 2) -> float:
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    key = (id(dev), dtype, m, n, k, batch, in_bytes, out_bytes)
    hit = _GEMM_CACHE.get(key)
    if hit is not None:
        return hit[1]
    if len(_GEMM_CACHE) >= _GEMM_CACHE_MAX:
        _GEMM_CACHE.clear()
    t = _gemm_time_s(dev, dtype, m, n, k, batch, in_bytes, out_bytes)
    _GEMM_CACHE[key] = (dev, t)
    return t


def _gemm_time_s(dev: DeviceSpec, dtype: str, m: int, n: int, k: int, batch: int,
                 in_bytes: int, out_bytes: int) -> float:
    flops = 2.0 * m * n * k * batch
    rate = dev.peak(dtype) * dev.gemm_fraction(dtype) * gemm_efficiency(dev, m, n, k, batch)
    traffic = ((m * k + k * n) * in_bytes + m * n * out_bytes) * batch
    return max(flops / rate, memory_time_s(dev, traffic, kernels=0)) + dev.kernel_overhead_s


def attention_time_s(dev: DeviceSpec, dtype: str, flops: float, kv_len: int) -> float:
    """Fused (Flash) attention: its own peak fraction, lower for short key lengths.

    FlashAttention-2 (Dao 2023, Fig. 4) reaches ~70% of its 16K-token rate at 512 tokens
    and ~90% at 2K; kv_len / (kv_len + 256) follows that curve.
    """
    if flops <= 0:
        return 0.0
    frac = dev.attention_peak_fraction * kv_len / (kv_len + ATTN_SEQ_HALF)
    return flops / (dev.peak(dtype) * frac) + dev.kernel_overhead_s


def memory_time_s(dev: DeviceSpec, traffic_bytes: float, kernels: int = 1) -> float:
    """A bandwidth-bound kernel (norms, activations, residuals, optimizer)."""
    return traffic_bytes / (dev.hbm_bw_bytes_per_s * dev.mem_bw_fraction) + \
        kernels * dev.kernel_overhead_s
