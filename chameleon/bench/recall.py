"""Recall@k-vs-latency harness: the numbers users pick index parameters by.

For every engine, thread count and nprobe it measures recall@k against the exact neighbours,
throughput (all queries in one batch, coarse search included, best of three runs) and
single-query latency p50/p99.
Peers run on the same machine in the same process: ``faiss-ivfpq`` is faiss's IndexIVFPQ holding
our very codes, ``faiss-fastscan`` is faiss's own ``IVF{nlist},PQ{m}x4fs`` trained on the same data,
``numba-fastscan`` our 4-bit SIMD engine (on a ``--nbits 4`` index). With refinement (``refine`` F > 1)
every engine returns its top F*k and the k nearest of those by the full vectors are kept: faiss through
``IndexRefineFlat``, ours through :func:`retriever.kernels.refine.rerank_exact`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numba
import numpy as np
from tqdm.auto import tqdm

from retriever.datasets import Dataset
from retriever.engines import to_faiss_ivfpq
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex
from retriever.kernels.refine import rerank_exact
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

ROW_KEYS = ("engine", "nprobe", "threads", "k", "refine", "recall", "qps", "p50_ms", "p99_ms")
LATENCY_QUERIES = 1000
WARMUP_QUERIES = 64
BATCH_REPEATS = 3


@dataclass
class Runner:
    """One engine under test: ``search(queries, k, nprobe) -> ids`` on raw (unprepared) queries."""

    name: str
    search: Callable[[np.ndarray, int, int], np.ndarray]
    faiss_index: faiss.Index | None = None  # set for faiss's engines: they refine through faiss


def numba_runner(index: IVFPQIndex) -> Runner:
    searcher = Searcher(index, engine="numba", device="cpu")
    return Runner("numba", lambda q, k, nprobe: searcher.search(q, k, nprobe).ids)


def numba_fastscan_runner(index: IVFPQIndex) -> Runner:
    searcher = Searcher(index, engine="numba-fastscan", device="cpu")
    return Runner("numba-fastscan", lambda q, k, nprobe: searcher.search(q, k, nprobe).ids)


def fpga_emu_runner(index: IVFPQIndex) -> Runner:
    """The FPGA kernel's C++ on this CPU (one compute unit, one thread): its answers, not its speed."""
    searcher = Searcher(index, engine="fpga", device="cpu", mode="emu")
    return Runner("fpga-emu", lambda q, k, nprobe: searcher.search(q, k, nprobe).ids)


def faiss_ivfpq_runner(index: IVFPQIndex) -> Runner:
    return _faiss_runner("faiss-ivfpq", to_faiss_ivfpq(index), index.params.metric)


def faiss_fastscan_runner(index: IVFPQIndex, dataset: Dataset) -> Runner:
    p = index.params
    metric = faiss.METRIC_L2 if p.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    fastscan = faiss.index_factory(p.dim, f"IVF{p.nlist},PQ{p.m}x4fs", metric)
    # faiss's factory turns residual encoding off for inner product; on GloVe it raises FastScan's
    # recall (0.40 -> 0.50 at nprobe 64) and its speed, so the peer gets it like our index has it.
    fastscan.by_residual = True
    base = prepare_vectors(dataset.base, p.metric)
    train_size = int(index.build_info.get("train_size", min(len(base), 100_000)))
    rng = np.random.default_rng(int(index.build_info.get("seed", 1234)))
    fastscan.train(base[np.sort(rng.choice(len(base), train_size, replace=False))])
    fastscan.add(base)
    return _faiss_runner("faiss-fastscan", fastscan, p.metric)


def _faiss_runner(name: str, index: faiss.Index, metric: str) -> Runner:
    def search(queries, k, nprobe):
        return index.search(prepare_vectors(queries, metric), k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

    return Runner(name, search, faiss_index=index)


def with_refinement(runner: Runner, dataset: Dataset, metric: str, refine: int) -> Runner:
    """``runner`` answering from its top ``refine * k``, re-ranked by the dataset's full vectors."""
    if refine <= 1:
        return runner
    base = prepare_vectors(dataset.base, metric)
    if runner.faiss_index is not None:
        refined = faiss.IndexRefineFlat(runner.faiss_index, faiss.swig_ptr(base))

        def faiss_search(queries, k, nprobe):
            ivf_params = faiss.SearchParametersIVF(nprobe=nprobe)  # a local: params only points at it
            params = faiss.IndexRefineSearchParameters()
            params.k_factor = refine
            params.base_index_params = ivf_params
            return refined.search(prepare_vectors(queries, metric), k, params=params)[1]

        return Runner(runner.name, faiss_search, faiss_index=refined)

    def search(queries, k, nprobe):
        candidates = runner.search(queries, min(refine * k, len(base)), nprobe)
        return rerank_exact(prepare_vectors(queries, metric), base, candidates, k, metric)[1]

    return Runner(runner.name, search)


ENGINE_NAMES = ("numba", "numba-fastscan", "faiss-ivfpq", "faiss-fastscan", "fpga-emu")


def make_runner(name: str, index: IVFPQIndex, dataset: Dataset) -> Runner:
    if name == "numba":
        return numba_runner(index)
    if name == "numba-fastscan":
        return numba_fastscan_runner(index)
    if name == "faiss-ivfpq":
        return faiss_ivfpq_runner(index)
    if name == "faiss-fastscan":
        return faiss_fastscan_runner(index, dataset)
    if name == "fpga-emu":
        return fpga_emu_runner(index)
    raise InvalidInput(f"unknown engine {name!r}; choose from {', '.join(ENGINE_NAMES)}")


def set_threads(threads: int) -> None:
    numba.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def measure(runner: Runner, queries: np.ndarray, truth: np.ndarray, k: int, nprobe: int, threads: int, refine: int = 1) -> dict:
    set_threads(threads)
    runner.search(queries[:WARMUP_QUERIES], k, nprobe)
    batch_seconds = float("inf")
    for _ in range(BATCH_REPEATS):  # best of a few: the usual guard against a noisy neighbour
        started = time.perf_counter()
        found = runner.search(queries, k, nprobe)
        batch_seconds = min(batch_seconds, time.perf_counter() - started)
    latencies = []
    for q in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        runner.search(q[None, :], k, nprobe)
        latencies.append(time.perf_counter() - started)
    latencies_ms = np.array(latencies) * 1e3
    return {
        "engine": runner.name,
        "nprobe": nprobe,
        "threads": threads,
        "k": k,
        "refine": refine,
        "recall": round(recall_at_k(found, truth), 5),
        "qps": round(len(queries) / batch_seconds, 1),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 4),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 4),
    }


def check_compatible(index: IVFPQIndex, dataset: Dataset) -> None:
    if index.params.dim != dataset.dim:
        raise InvalidInput(f"the index has dimension {index.params.dim}, the dataset {dataset.name} has {dataset.dim}")
    if index.ntotal != dataset.base.shape[0]:
        raise InvalidInput(
            f"the index holds {index.ntotal} vectors, the dataset {dataset.name} {dataset.base.shape[0]}: build the index from this dataset"
        )
    if index.params.metric != dataset.metric:
        raise InvalidInput(f"the index uses metric {index.params.metric}, the dataset {dataset.name} {dataset.metric}")


def run_recall_benchmark(
    index: IVFPQIndex,
    dataset: Dataset,
    engines: list[str],
    nprobes: list[int],
    threads: list[int],
    k: int,
    nqueries: int | None = None,
    on_row: Callable[[dict], None] = lambda row: None,
    refine: int = 1,
) -> list[dict]:
    """Measure every (engine, threads, nprobe); returns rows with exactly :data:`ROW_KEYS`.

    ``refine`` F > 1: every engine re-ranks its top F*k by the full vectors (see :func:`with_refinement`).
    """
    check_compatible(index, dataset)
    unknown = [e for e in engines if e not in ENGINE_NAMES]
    if unknown:
        raise InvalidInput(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)}")
    if bad := [n for n in nprobes if not 1 <= n <= index.params.nlist]:
        raise InvalidInput(f"nprobe must be between 1 and nlist={index.params.nlist}, got {bad}")
    if bad := [t for t in threads if not 1 <= t <= numba.config.NUMBA_NUM_THREADS]:
        raise InvalidInput(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} on this machine, got {bad}")
    if not 1 <= k <= min(100, index.ntotal):
        raise InvalidInput(f"k must be between 1 and {min(100, index.ntotal)}, got {k}")
    if nqueries is not None and nqueries < 1:
        raise InvalidInput(f"the number of queries must be positive, got {nqueries}")
    if not isinstance(refine, (int, np.integer)) or refine < 1:
        raise InvalidInput(f"refine must be a positive integer (1: no refinement), got {refine!r}")
    queries = dataset.queries[:nqueries]
    truth = dataset.ground_truth(k)[: len(queries)]
    rows = []
    with tqdm(total=len(engines) * len(threads) * len(nprobes), desc="bench", unit="run") as progress:
        for name in engines:
            runner = with_refinement(make_runner(name, index, dataset), dataset, index.params.metric, refine)
            for t in threads:
                for nprobe in nprobes:
                    row = measure(runner, queries, truth, k, nprobe, t, refine)
                    rows.append(row)
                    on_row(row)
                    progress.update()
    return rows


def plot_rows(rows: list[dict], path: str | os.PathLike, title: str) -> None:
    """Recall (x) vs QPS (y, log): one panel per thread count, one curve per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(6 * len(thread_counts), 4.5), squeeze=False)
    for ax, t in zip(axes[0], thread_counts):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            curve = sorted((r for r in rows if r["engine"] == engine and r["threads"] == t), key=lambda r: r["nprobe"])
            ax.plot([r["recall"] for r in curve], [r["qps"] for r in curve], marker="o", label=engine)
            for r in curve:
                ax.annotate(str(r["nprobe"]), (r["recall"], r["qps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{rows[0]['k']}")
        ax.set_ylabel("queries per second (log)")
        ax.set_title(f"{title}, {t} thread{'s' if t > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speedups(rows: list[dict], engine: str, peer: str) -> list[dict]:
    """QPS of ``engine`` over ``peer`` at each (threads, nprobe) both were measured at."""
    peer_rows = {(r["threads"], r["nprobe"]): r for r in rows if r["engine"] == peer}
    return [
        {"threads": r["threads"], "nprobe": r["nprobe"], "ratio": r["qps"] / peer_rows[(r["threads"], r["nprobe"])]["qps"]}
        for r in rows
        if r["engine"] == engine and (r["threads"], r["nprobe"]) in peer_rows
    ]


def knnlm_benchmark(
    documents,
    engine,
    workdir,
    k: int = 16,
    lambdas=(0.1, 0.25),
    temperatures=(1.0, 10.0, 100.0),
    max_train_tokens: int = 60_000,
) -> dict:
    """Perplexity of the LM and of its kNN-LM on held-out documents of the datastore's corpus.

    Documents n % 10 == 9 are the test text, n % 10 == 8 the validation text on which lambda and
    the temperature are chosen; the datastore is built from the rest (its first
    ``max_train_tokens`` tokens, to bound the time on small machines).
    """
    from dataclasses import replace

    from chameleon.rag.knnlm import KnnLm, build_datastore, perplexity, training_documents

    test = "\n\n".join(d.text for n, d in enumerate(documents) if n % 10 == 9)
    validation = "\n\n".join(d.text for n, d in enumerate(documents) if n % 10 == 8)
    if not test or not validation:
        raise InvalidInput("the corpus needs at least 10 documents (every tenth is held out, the ninth validates)")
    train = training_documents(documents, engine, max_train_tokens)
    meta = build_datastore(train, engine, Path(workdir) / "datastore", force=True, progress=True)
    datastore = KnnLm.open(Path(workdir) / "datastore", engine, k=k)
    sweep = []
    for lam in lambdas:
        for temperature in temperatures:
            knnlm = replace(datastore, lam=lam, temperature=temperature)
            sweep.append({"lambda": lam, "temperature": temperature, "ppl_validation": round(perplexity(engine, validation, knnlm), 4)})
    best = min(sweep, key=lambda row: row["ppl_validation"])
    chosen = replace(datastore, lam=best["lambda"], temperature=best["temperature"])
    return {
        "ppl_base": round(perplexity(engine, test), 4),
        "ppl_knnlm": round(perplexity(engine, test, chosen), 4),
        "lambda": best["lambda"],
        "k": k,
        "temperature": best["temperature"],
        "ppl_base_validation": round(perplexity(engine, validation), 4),
        "validation_sweep": sweep,
        "datastore_keys": meta["keys"],
    }
