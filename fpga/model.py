"""Performance model of the kernel: cycles per query from its structure, QPS at a clock.

The kernel (hls/ivfpq_kernel.cpp) handles one query at a time and, for each probed list, builds
the lookup table and then streams the list; per query it then merges the level-1 queues:

* list: residual (D cycles, L2 only) + table (m * 256 / LUT_PARALLEL cycles; once per query for
  inner product) + scan (one line of ``lanes`` codes per bank per cycle) + the scan pipeline's
  fill (its depth, about m adds plus reads and the queue);
* query: loading it (D cycles) + merging PES * L1 level-1 entries into the level-2 queue (one per
  cycle) + writing K results;
* batch: loading the codebooks (D * 256 floats, 16 per 512-bit beat), shared by the batch's queries.

The scan reads ``banks * lanes * (m + 8)`` bytes per cycle (codes and int64 ids); when that
exceeds what the banks deliver at the clock, the scan is bandwidth-bound and the model says so.
Numbers for the kernel as written, not for a synthesised build (no Vitis here): treat them as a
model to compare designs by, checked against a card when one is available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fpga.config import KSUB, KernelConfig

LUT_PARALLEL = 16  # CHAMELEON_LUT_PARALLEL in hls/ivfpq_kernel.h
BURST_FLOATS = 16  # CHAMELEON_BURST_FLOATS
SCAN_READ_LATENCY = 8  # cycles from a bank read to a code at the PEs (AXI burst, registered)
QUEUE_LATENCY = 2
DDR4_BANK_GBPS = 19.2  # one DDR4-2400 channel


@dataclass(frozen=True)
class CycleEstimate:
    cycles_per_query: float
    lut_cycles: float
    scan_cycles: float
    other_cycles: float
    bandwidth_bound: bool

    def qps(self, clock_mhz: float) -> float:
        return clock_mhz * 1e6 / self.cycles_per_query


def estimate_cycles(
    config: KernelConfig,
    list_lines: np.ndarray,
    inner_product: bool,
    batch: int = 1,
    clock_mhz: float = 140.0,
    bank_gbps: float = DDR4_BANK_GBPS,
) -> CycleEstimate:
    """Mean cycles per query for queries whose probed lists have ``list_lines`` (nq, nprobe)
    lines per bank (0 for skipped or empty lists)."""
    list_lines = np.asarray(list_lines, dtype=np.float64)
    probed = (list_lines > 0).sum(axis=1)
    table = config.m * KSUB / LUT_PARALLEL
    scan_depth = SCAN_READ_LATENCY + config.m + QUEUE_LATENCY
    bytes_per_cycle = config.banks * config.lanes * (config.m + 8)
    deliverable = config.banks * bank_gbps * 1e9 / (clock_mhz * 1e6)
    slowdown = max(1.0, bytes_per_cycle / deliverable)
    scan = list_lines.sum(axis=1) * slowdown + probed * scan_depth
    if inner_product:
        lut = np.full(len(list_lines), table) + probed * config.dim  # one table; a coarse dot product per list
    else:
        lut = probed * (config.dim + table)
    other = config.dim + config.pes * config.l1 + config.k + config.dim * KSUB / BURST_FLOATS / batch
    total = lut + scan + other
    return CycleEstimate(float(total.mean()), float(lut.mean()), float(scan.mean()), float(other), slowdown > 1.0)


def miss_probability(k: int, l1: int, pes: int) -> float:
    """Expected fraction of the true top-k that level-1 queues of ``l1`` entries lose.

    The r-th best candidate is lost when at least ``l1`` better ones share its PE; candidates
    reach the PEs by their position in the lists, which is independent of their distance, so the
    count of better ones on its PE is Binomial(r - 1, 1 / pes).
    """
    p = 1.0 / pes
    lost = 0.0
    for rank in range(1, k + 1):
        better = rank - 1
        lost += sum(math.comb(better, n) * p**n * (1 - p) ** (better - n) for n in range(l1, better + 1))
    return lost / k
