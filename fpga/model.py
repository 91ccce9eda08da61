"""Performance model of the kernel: cycles per query from its structure, QPS at a clock.

The kernel (hls/ivfpq_kernel.cpp) handles one query at a time. Per probed list it *prepares*
(the coarse term and, for L2, the lookup table: D + m * 256 / LUT_PARALLEL cycles; for inner
product only the D-cycle coarse dot product, the table being built once per query) and *scans*
(one line of ``lanes`` codes per bank per cycle, plus the scan pipeline's fill: about m adds,
the reads and the queue). The next list is prepared while the current one is scanned (two
tables, ping-pong), so a list costs the longer of the two, and only the first preparation is
exposed. Per query: loading it (D cycles), merging PES * L1 level-1 entries into the level-2
queue (one per cycle), writing K results. Per batch: loading the codebooks (D * 256 floats, 16
per 512-bit beat).

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
    prepare_cycles: float  # preparation not hidden behind a scan: the first list's, the query's table, any excess
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
    probed = list_lines > 0
    table = config.m * KSUB / LUT_PARALLEL
    prepare = config.dim + (0 if inner_product else table)
    bytes_per_cycle = config.banks * config.lanes * (config.m + 8)
    deliverable = config.banks * bank_gbps * 1e9 / (clock_mhz * 1e6)
    slowdown = max(1.0, bytes_per_cycle / deliverable)
    scan = np.where(probed, list_lines * slowdown + SCAN_READ_LATENCY + config.m + QUEUE_LATENCY, 0.0)
    # The first list's preparation is exposed; each later one hides behind the scan before it,
    # except for what it takes longer (nothing follows the last probed list's scan).
    excess = np.where(probed, np.maximum(0.0, prepare - scan), 0.0)
    some = probed.any(axis=1)
    last = probed.shape[1] - 1 - np.argmax(probed[:, ::-1], axis=1)
    excess[np.flatnonzero(some), last[some]] = 0.0
    exposed = excess.sum(axis=1) + np.where(some, prepare, 0.0) + (table if inner_product else 0.0)
    other = config.dim + config.pes * config.l1 + config.k + config.dim * KSUB / BURST_FLOATS / batch
    total = exposed + scan.sum(axis=1) + other
    return CycleEstimate(float(total.mean()), float(exposed.mean()), float(scan.sum(axis=1).mean()), float(other), slowdown > 1.0)


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
