"""``chameleon bench pipeline``: kNN-LM decoding with retrieval through the tier every N tokens,
sequential vs pipelined (``coordinator.pipeline``), and with no retrieval.

Chameleon's premise is that the model and the retrieval tier run on different hardware. On one
machine the benchmark gives them different cores (``inference_cores``, ``retrieval_cores``): the
tier's processes are started with the retrieval cores and this process then keeps the inference
ones, so that one side's work does not slow the other's and overlap is what it would be between
two machines. Every schedule runs under the same split.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from contextlib import contextmanager
from pathlib import Path

from retriever.errors import InvalidInput

ROW_KEYS = ("interval", "schedule", "tokens_per_s")


def default_cores() -> tuple[set[int], set[int]]:
    """This process's cores split in two halves: (inference, retrieval); both all of them on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


@contextmanager
def running_on(cores: set[int]):
    """Run the body (and the processes it starts, which inherit this) on ``cores`` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def bench_prompts(documents, engine, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens from the held-out documents (every tenth, as
    ``bench knnlm``): consecutive pieces of each, taken from the documents in turn."""
    pieces = []
    for n, document in enumerate(documents):
        if n % 10 == 9:
            ids = engine.tokenizer(document.text, add_special_tokens=False)["input_ids"]
            pieces.append([ids[start : start + length] for start in range(0, len(ids) - length + 1, length)])
    prompts = [piece for turn in itertools.zip_longest(*pieces) for piece in turn if piece is not None][:count]
    if len(prompts) < count:
        raise InvalidInput(f"the corpus's held-out documents give {len(prompts)} prompts of {length} tokens, not {count}")
    return prompts


def pipeline_benchmark(engine, knnlm, prompts, max_new_tokens: int, intervals=(1, 8, 64), repeats: int = 2) -> list[dict]:
    """Tokens/s of kNN-LM decoding of ``prompts`` (one batch) per retrieval interval and schedule.

    Rows: ``interval`` (None: no retrieval), ``schedule`` (none | sequential | pipelined),
    ``tokens_per_s`` (best of ``repeats``), ``tokens``, ``batch``, and for pipelined rows
    ``same_tokens`` (the pipelined tokens equal the sequential ones).
    """
    from chameleon.rag.knnlm import generate_batch

    configurations = [(None, "sequential")] + [(n, s) for n in intervals for s in ("sequential", "pipelined")]
    generate_batch(engine, knnlm, prompts, 4, 1, "pipelined")  # warm up both sides
    best: dict[tuple, float] = {}
    tokens: dict[tuple, list[list[int]]] = {}
    for _ in range(repeats):
        for configuration in configurations:  # interleaved, so that drift hits every configuration alike
            started = time.perf_counter()
            out = generate_batch(engine, knnlm, prompts, max_new_tokens, *configuration)
            speed = sum(len(t) for t in out) / (time.perf_counter() - started)
            best[configuration] = max(best.get(configuration, 0.0), speed)
            tokens[configuration] = out
    rows = []
    for interval, schedule in configurations:
        row = {
            "interval": interval,
            "schedule": "none" if interval is None else schedule,
            "tokens_per_s": round(best[interval, schedule], 2),
            "tokens": sum(len(t) for t in tokens[interval, schedule]),
            "batch": len(prompts),
        }
        if schedule == "pipelined":
            row["same_tokens"] = tokens[interval, schedule] == tokens[interval, "sequential"]
        rows.append(row)
    return rows


def speedups(rows: list[dict]) -> dict[int, float]:
    """Pipelined over sequential tokens/s, per interval."""
    speed = {(r["interval"], r["schedule"]): r["tokens_per_s"] for r in rows}
    return {
        interval: round(speed[interval, "pipelined"] / speed[interval, "sequential"], 3)
        for interval, schedule in speed
        if schedule == "pipelined" and (interval, "sequential") in speed
    }


def datastore_for(engine, corpus: str, documents, max_tokens: int, cache: Path, progress: bool = True) -> Path:
    """The kNN-LM datastore of the first ``max_tokens`` tokens of the corpus's training documents
    (not the held-out tenth), built once into ``cache``; ``corpus`` names it."""
    from chameleon.rag.knnlm import build_datastore, model_fingerprint, training_documents

    name = corpus if corpus == "python-docs" else hashlib.sha256(str(Path(corpus).resolve()).encode()).hexdigest()[:12]
    path = cache / f"{name}-{model_fingerprint(engine).replace(':', '-')}-{max_tokens}"
    if not (path / "knnlm.json").is_file():
        build_datastore(training_documents(documents, engine, max_tokens), engine, path, force=True, progress=progress)
    return path


def run(
    engine,
    documents,
    datastore: Path,
    state_dir: Path,
    batch: int,
    prompt_tokens: int,
    max_new_tokens: int,
    intervals,
    k: int,
    nprobe: int,
    shards: int,
    repeats: int,
    inference_cores: set[int],
    retrieval_cores: set[int],
) -> dict:
    """Start a cluster serving ``datastore`` on the retrieval cores, run the benchmark on the
    inference cores, stop the cluster; the rows and the setting they were measured in."""
    import faiss
    import torch

    from chameleon import cluster
    from chameleon.rag.knnlm import KnnLm

    prompts = bench_prompts(documents, engine, batch, prompt_tokens)
    with running_on(retrieval_cores):
        cluster.up(datastore / "index", shards, state_dir, threads=max(1, len(retrieval_cores) // shards))
    knnlm = None
    try:
        with running_on(inference_cores):
            torch.set_num_threads(len(inference_cores))
            faiss.omp_set_num_threads(len(inference_cores))
            knnlm = KnnLm.open(datastore, engine, cluster=state_dir, k=k, nprobe=nprobe)
            rows = pipeline_benchmark(engine, knnlm, prompts, max_new_tokens, intervals, repeats)
    finally:
        if knnlm is not None:
            knnlm.searcher.close()
        cluster.down(state_dir)
    return {
        "rows": rows,
        "speedup": {str(interval): ratio for interval, ratio in speedups(rows).items()},
        "setting": {
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "new_tokens": max_new_tokens,
            "k": k,
            "nprobe": nprobe,
            "shards": shards,
            "datastore_keys": len(knnlm.values),
            "inference_cores": sorted(inference_cores),
            "retrieval_cores": sorted(retrieval_cores),
        },
    }
