"""``chameleon bench fpga-model``: the kernel's predicted speed on a card next to the CPU engines
measured on the same index and queries, and what smaller level-1 queues cost in recall.

For each nprobe: recall and batch QPS of the Numba engine and of faiss's IndexIVFPQ (same codes,
one thread), and the performance model's cycles per query (:mod:`fpga.model`) for the shard
packed as the kernel reads it, as QPS at the clock and latency of a single query. For each
level-1 queue length: the share of the exact kernel's top-k that the emulated kernel with that
queue loses, measured, beside the binomial model's prediction.
"""

from __future__ import annotations

import numpy as np

from chameleon.bench.recall import faiss_ivfpq_runner, measure, numba_runner
from fpga.config import DEFAULT_BANKS, KernelConfig
from fpga.layout import pack_banks
from fpga.model import estimate_cycles, miss_probability
from retriever.coarse import CoarseQuantizer
from retriever.datasets import Dataset
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

MODEL_KEYS = (
    "nprobe",
    "recall",
    "numba_qps",
    "faiss_ivfpq_qps",
    "fpga_cycles_per_query",
    "fpga_qps",
    "fpga_latency_us",
    "fpga_vs_numba",
    "prepare_share",
    "bandwidth_bound",
)
MISS_KEYS = ("l1", "nprobe", "measured_miss", "model_miss")


def model_rows(
    index: IVFPQIndex, dataset: Dataset, nprobes: list[int], config: KernelConfig, clock_mhz: float, nqueries: int
) -> list[dict]:
    """One row per nprobe: CPU engines measured (1 thread), the kernel ``config`` modelled."""
    k = config.k
    banked = pack_banks(index.whole(), config.banks, config.lanes)
    lines_per_list = np.diff(banked.list_rows) // config.lanes
    queries = dataset.queries[:nqueries]
    truth = dataset.ground_truth(k)[: len(queries)]
    quantizer = CoarseQuantizer(index.centroids, index.params.metric, device="cpu")
    prepared = prepare_vectors(queries, index.params.metric)
    runners = (numba_runner(index), faiss_ivfpq_runner(index))
    rows = []
    for nprobe in nprobes:
        measured = [measure(runner, queries, truth, k, nprobe, threads=1) for runner in runners]
        list_ids = quantizer.search(prepared, nprobe)[0]
        lines = np.where(list_ids >= 0, lines_per_list[np.maximum(list_ids, 0)], 0)
        batched = estimate_cycles(config, lines, index.params.inner_product, batch=len(queries), clock_mhz=clock_mhz)
        single = estimate_cycles(config, lines, index.params.inner_product, batch=1, clock_mhz=clock_mhz)
        fpga_qps = batched.qps(clock_mhz)
        rows.append(
            {
                "nprobe": nprobe,
                "recall": measured[0]["recall"],
                "numba_qps": measured[0]["qps"],
                "faiss_ivfpq_qps": measured[1]["qps"],
                "fpga_cycles_per_query": round(batched.cycles_per_query, 1),
                "fpga_qps": round(fpga_qps, 1),
                "fpga_latency_us": round(single.cycles_per_query / clock_mhz, 2),
                "fpga_vs_numba": round(fpga_qps / measured[0]["qps"], 3),
                "prepare_share": round(batched.prepare_cycles / batched.cycles_per_query, 3),
                "bandwidth_bound": batched.bandwidth_bound,
            }
        )
    return rows


def miss_rows(index: IVFPQIndex, dataset: Dataset, l1s: list[int], nprobe: int, k: int, banks: int, nqueries: int) -> list[dict]:
    """Share of the exact kernel's top-k lost by the emulated kernel with level-1 queues of each length."""
    if bad := [l1 for l1 in l1s if not 1 <= l1 <= k]:
        raise InvalidInput(f"level-1 queue lengths must be between 1 and k={k}, got {bad}")
    queries = dataset.queries[:nqueries]
    exact = Searcher(index, engine="fpga", device="cpu", mode="emu", k=k, banks=banks).search(queries, k, nprobe).ids
    rows = []
    for l1 in l1s:
        searcher = Searcher(index, engine="fpga", device="cpu", mode="emu", k=k, banks=banks, l1=l1)
        found = searcher.search(queries, k, nprobe).ids
        kept = sum(len(np.intersect1d(f[f >= 0], e[e >= 0])) for f, e in zip(found, exact))
        pes = searcher.engine.config.pes
        rows.append(
            {
                "l1": l1,
                "nprobe": nprobe,
                "measured_miss": round(1 - kept / max(1, int((exact >= 0).sum())), 5),
                "model_miss": round(miss_probability(k, l1, pes), 5),
            }
        )
    return rows


def fpga_model_benchmark(
    index: IVFPQIndex,
    dataset: Dataset,
    nprobes: list[int],
    l1s: list[int],
    k: int = 10,
    clock_mhz: float = 140.0,
    banks: int = DEFAULT_BANKS,
    nqueries: int = 2000,
) -> dict:
    if not 1 <= clock_mhz <= 1000:
        raise InvalidInput(f"the clock must be between 1 and 1000 MHz, got {clock_mhz}")
    if bad := [n for n in nprobes if not 1 <= n <= index.params.nlist]:
        raise InvalidInput(f"nprobe must be between 1 and nlist={index.params.nlist}, got {bad}")
    if not 1 <= nqueries:
        raise InvalidInput(f"the number of queries must be positive, got {nqueries}")
    config = KernelConfig.for_index(index.params, k=k, banks=banks)
    return {
        "kernel": {"dim": config.dim, "m": config.m, "k": config.k, "banks": config.banks, "pes": config.pes, "clock_mhz": clock_mhz},
        "rows": model_rows(index, dataset, nprobes, config, clock_mhz, nqueries),
        "level1_misses": miss_rows(index, dataset, l1s, nprobes[len(nprobes) // 2], k, banks, nqueries),
    }
