"""Measure a tier's profile on this host (:mod:`chameleon.plan.profiles`).

The retrieval tier is measured as it serves: a local cluster of real node and coordinator
processes, searched single query by single query with several searches in flight, while each
process's CPU time is read; three runs (1 shard at a low and a high nprobe, 2 shards at the low
one) separate a node's fixed cost from its cost per code scanned, and the coordinator's fixed cost
from its cost per shard. The inference tier is measured in this process: the embedder, prefill
lengths and decode steps at several batch sizes, on the engine the server runs.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import psutil

from chameleon import cluster
from chameleon.plan.profiles import InferenceProfile, RetrievalProfile
from retriever.coarse import CoarseQuantizer
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex, load_index, unpack_codes

CALIBRATION_QUERIES = 2000


def sample_queries(index: IVFPQIndex, n: int, seed: int = 0) -> np.ndarray:
    """``n`` entries of the index decoded back to vectors (their list's centroid plus their PQ
    residual): queries from the data's own distribution, without the original vectors. They come
    from the first shard, which holds a slice of every list."""
    lists = index.shards[0]
    rows = np.random.default_rng(seed).choice(lists.ntotal, min(n, lists.ntotal), replace=False)
    p = index.params
    codes = unpack_codes(lists.codes[rows], p.m, p.nbits)
    residuals = index.codebooks[np.arange(p.m), codes].reshape(len(rows), p.dim)
    return (index.centroids[lists.assignment()[rows]] + residuals).astype(np.float32)


def drive(searcher: cluster.ClusterSearcher, queries: np.ndarray, nprobe: int, seconds: float, in_flight: int) -> int:
    """Search ``queries`` one at a time, round and round, ``in_flight`` at once, for ``seconds``;
    the searches answered."""
    pending: deque = deque()
    answered, position = 0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or pending:
        while len(pending) < in_flight and time.perf_counter() < deadline:
            pending.append(searcher.submit(queries[position % len(queries)][None], 10, nprobe))
            position += 1
        pending.popleft()()
        answered += 1
    return answered


def _cpu_seconds(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def calibration_run(index_dir: Path, shards: int, nprobe: int, queries: np.ndarray, seconds: float, in_flight: int) -> dict:
    """One run: a cluster of ``shards`` single-threaded nodes, driven at ``nprobe``; CPU seconds per
    search of the nodes (together), the coordinator and this process (the caller)."""
    with tempfile.TemporaryDirectory(prefix="chameleon-profile-") as state_dir:
        state = cluster.up(index_dir, shards, state_dir, threads=1, die_with_parent=True)
        try:
            searcher = cluster.ClusterSearcher.open(state_dir)
            try:
                drive(searcher, queries, nprobe, min(1.0, seconds), in_flight)  # compiled, connected, warm
                nodes, coordinator = [node["pid"] for node in state["nodes"]], [state["coordinator"]["pid"]]
                before = _cpu_seconds(nodes), _cpu_seconds(coordinator), sum(psutil.Process().cpu_times()[:2])
                started = time.perf_counter()
                answered = drive(searcher, queries, nprobe, seconds, in_flight)
                elapsed = time.perf_counter() - started
                after = _cpu_seconds(nodes), _cpu_seconds(coordinator), sum(psutil.Process().cpu_times()[:2])
            finally:
                searcher.close()
        finally:
            cluster.down(state_dir)
    node_s, coordinator_s, front_s = ((b - a) / answered for a, b in zip(before, after))
    return {
        "shards": shards,
        "nprobe": nprobe,
        "searches": answered,
        "searches_per_s": answered / elapsed,
        "node_s": node_s,
        "coordinator_s": coordinator_s,
        "front_s": front_s,
    }


def measure_retrieval(
    index_dir: str | Path, seconds: float = 3.0, in_flight: int = 8, nprobes: tuple[int, int] | None = None, progress=None
) -> RetrievalProfile:
    """Fit the retrieval tier's costs on three calibration runs over ``index_dir`` (a vector or
    passage index of this host). ``nprobes``: the low and high nprobe (default: 4, or half of a
    smaller nlist, and the lesser of nlist and 128). ``progress``: called with a line after each run."""
    index_dir = Path(index_dir)
    index = load_index(index_dir)
    p = index.params
    if index.shards[0].ntotal == 0:
        raise InvalidInput(f"{index_dir} holds no vectors to search (the output of `index train`?)")
    low, high = nprobes or (min(4, max(1, p.nlist // 2)), min(128, p.nlist))
    if not 1 <= low < high <= p.nlist:
        raise InvalidInput(f"the calibration needs 1 <= low nprobe < high nprobe <= nlist ({p.nlist}), got {low} and {high}")
    if not 0.5 <= seconds <= 600 or not 1 <= in_flight <= 256:
        raise InvalidInput(f"seconds must be in [0.5, 600] and in_flight in [1, 256], got {seconds} and {in_flight}")
    queries = sample_queries(index, CALIBRATION_QUERIES)
    quantizer = CoarseQuantizer(index.centroids, p.metric)
    sizes = sum(shard.list_sizes() for shard in index.shards)
    runs = []
    for shards, nprobe in ((1, low), (1, high), (2, low)):
        run = calibration_run(index_dir, shards, nprobe, queries, seconds, in_flight)
        run["codes"] = float(sizes[quantizer.search(queries, nprobe)[0]].sum(axis=1).mean())
        runs.append(run)
        if progress:
            progress(f"{shards} shard(s), nprobe {nprobe}: {run['searches_per_s']:,.0f} searches/s")
    # nodes together: shards * node_s + node_per_code_s * codes; coordinator: fixed + per shard
    node_fixed, per_code = _fit([[r["shards"], r["codes"]] for r in runs], [r["node_s"] for r in runs])
    coordinator_fixed, per_shard = _fit([[1, r["shards"]] for r in runs], [r["coordinator_s"] for r in runs])
    skew = statistics.fmean(r["codes"] / (r["nprobe"] * index.ntotal / p.nlist) for r in runs)
    cores = len(os.sched_getaffinity(0))
    for r in runs:  # the share of the tightest CPU-bound limit the run reached
        ideal = min(
            r["shards"] / r["node_s"], 1 / r["coordinator_s"], 1 / r["front_s"], cores / (r["node_s"] + r["coordinator_s"] + r["front_s"])
        )
        r["busy"] = r["searches_per_s"] / ideal
    return RetrievalProfile(
        front_s=statistics.fmean(r["front_s"] for r in runs),
        coordinator_s=coordinator_fixed,
        coordinator_per_shard_s=per_shard,
        node_s=node_fixed,
        node_per_code_s=per_code,
        code_size=p.code_size,
        list_skew=skew,
        busy_ceiling=min(1.0, statistics.median(r["busy"] for r in runs)),
        host=socket.gethostname(),
        index=str(index_dir.resolve()),
        runs=runs,
    )


def _fit(rows: list[list[float]], values: list[float]) -> tuple[float, ...]:
    """Least squares of ``values`` on the columns of ``rows``, each coefficient kept non-negative
    (a cost the noise makes negative is none)."""
    solution = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(values, dtype=float), rcond=None)[0]
    return tuple(float(max(value, 0.0)) for value in solution)


def measure_inference(
    model: str | None = None, context: int = 768, batches: tuple[int, ...] = (1, 4, 8), repeats: int = 5
) -> InferenceProfile:
    """Time the built-in (or ``model``'s) torch engine and the embedder in this process: embedding
    a question, prefill of a quarter, one and two times ``context`` tokens, decode steps at
    ``batches`` rows after ``context`` tokens (about a RAG prompt: question and passages)."""
    import torch

    from chameleon.engines.decode_batch import DecodeBatch
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.embedder import Embedder

    engine = TorchEngine(model)
    if not 64 <= context <= engine.context_window // 2:  # prefill is timed up to twice the context
        raise InvalidInput(f"context must be between 64 and {engine.context_window // 2} tokens, got {context}")
    embedder = Embedder()
    question = ["How do I read a file line by line and strip the newline from each one?"]
    embedder.embed(question)
    # medians, not minima: what a server keeps up under load, not its best moment
    embed_s = statistics.median(_timed(lambda: embedder.embed(question)) for _ in range(repeats * 4))

    rng = np.random.default_rng(0)
    vocab = min(len(engine.tokenizer), 30_000)
    lengths = [context // 4, context, 2 * context]
    engine.prefill(rng.integers(100, vocab, 32).tolist())
    prompts = [rng.integers(100, vocab, n).tolist() for n in lengths]  # made before the clock starts
    prefill = [statistics.median(_timed(lambda p=prompt: engine.prefill(p)) for _ in range(repeats)) for prompt in prompts]
    prefill_s, per_token, per_token_squared = _fit([[1, n, n * n] for n in lengths], prefill)

    steps = []
    with torch.inference_mode():
        for rows in batches:
            batch = DecodeBatch(engine)
            batch.prefill([rng.integers(100, vocab, context).tolist() for _ in range(rows)])
            tokens = rng.integers(100, vocab, rows).tolist()
            times = [_timed(lambda i=i: batch.step(tokens, [context + i] * rows)) for i in range(repeats + 2)]
            steps.append(statistics.median(times[2:]))
    step_s, per_row = _fit([[1, rows] for rows in batches], steps)
    return InferenceProfile(
        embed_s=embed_s,
        prefill_s=prefill_s,
        prefill_per_token_s=per_token,
        prefill_per_token_squared_s=per_token_squared,
        context=context,
        step_s=step_s,
        step_per_row_s=per_row,
        threads=torch.get_num_threads(),
        device=str(engine.device),
        model=Path(getattr(engine.model.config, "_name_or_path", "") or "model").name,
        host=socket.gethostname(),
    )


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started
