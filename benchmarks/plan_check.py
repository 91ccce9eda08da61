"""The planner's predictions against this machine: predicted and measured throughput, side by side.

Measures the profiles first (`chameleon profile retrieval` on GloVe-50 and on the built-in
python-docs passage index, `chameleon profile inference` on the built-in model), then runs
configurations that fit here, every process on this host, and compares each measured rate with
what ``chameleon.plan.model.predict`` says for the same deployment (``host_cores`` = this
machine's cores):
- retrieval-heavy: the retrieval tier alone on GloVe-50, searched one query at a time with 8 in
  flight, with GloVe's own held-out queries (the profile was fitted on decoded index entries at
  other nprobes): 1 shard and 2 shards at nprobe 32, 1 shard x 2 replicas at nprobe 64;
- LLM-heavy: ``chameleon serve`` (1 shard, document cache off so that every prompt is prefilled)
  answering ``/v1/rag`` from 8 clients, 32 new tokens; and a prefill-heavy variant (4 new tokens).
The workload of the RAG rows is what the requests did (mean prompt and completion tokens from
their ``usage``); the prediction knows nothing else of the run.

    python benchmarks/plan_check.py [--seconds 10] [--requests 48] [--json runs/plan-check.json]

The profiles stay in runs/profiles/ (glove.json, docs.json, inference.json) for `chameleon plan`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from chameleon import cluster
from chameleon.plan.measure import drive, measure_inference, measure_retrieval
from chameleon.plan.model import Deployment, Workload, predict
from chameleon.plan.profiles import save_profile
from chameleon.server.launch import spawn
from retriever.datasets import glove50
from retriever.index import manifest_params, read_manifest

ROOT = Path(__file__).resolve().parent.parent
GLOVE_INDEX = ROOT / "runs" / "glove-50"
PROFILES = ROOT / "runs" / "profiles"
QUESTIONS = [
    f"{template} {module}?"
    for module in ("json", "csv", "pathlib", "itertools", "re", "asyncio", "sqlite3", "logging")
    for template in ("What does the module do:", "How do I use the module", "Show an example of")
]


def glove_index() -> Path:
    if not (GLOVE_INDEX / "manifest.json").is_file():
        command = [
            sys.executable,
            "-m",
            "chameleon",
            "index",
            "build",
            "--dataset",
            "glove-50",
            "--out",
            GLOVE_INDEX,
            "--nlist",
            "1024",
            "--m",
            "25",
        ]
        subprocess.run(list(map(str, command)), check=True)
    return GLOVE_INDEX


def workload_of(index: Path, nprobe: int, **tokens) -> Workload:
    manifest = read_manifest(index)
    params = manifest_params(manifest)
    return Workload(manifest["ntotal"], params.nlist, params.code_size, nprobe, **tokens)


def measured_tier(index: Path, shards: int, replicas: int, nprobe: int, seconds: float) -> float:
    queries = glove50().queries
    with tempfile.TemporaryDirectory(prefix="plan-check-") as state_dir:
        cluster.up(index, shards, state_dir, replicas=replicas, threads=1, die_with_parent=True)
        try:
            searcher = cluster.ClusterSearcher.open(state_dir)
            try:
                drive(searcher, queries, nprobe, 1.0, 8)
                started = time.perf_counter()
                answered = drive(searcher, queries, nprobe, seconds, 8)
                return answered / (time.perf_counter() - started)
            finally:
                searcher.close()
        finally:
            cluster.down(state_dir)


def ask(url: str, question: str, max_tokens: int) -> dict:
    body = json.dumps({"question": question, "max_tokens": max_tokens, "k": 4}).encode()
    request = urllib.request.Request(url + "/v1/rag", body, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def measured_rag(max_tokens: int, requests: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="plan-check-") as work:
        process, ready = spawn(Path(work), "--shards", 1, "--max-batch", 8, "--cache-policy", "none", "--max-concurrency", 64)
        try:
            url = ready["url"]
            ask(url, QUESTIONS[0], max_tokens)  # warm-up
            asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda q: ask(url, q, max_tokens), asked))
            elapsed = time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    return {
        "requests_per_s": requests / elapsed,
        "prompt_tokens": float(np.mean([a["usage"]["prompt_tokens"] for a in answers])),
        "completion_tokens": float(np.mean([a["usage"]["completion_tokens"] for a in answers])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each retrieval run.")
    parser.add_argument("--requests", type=int, default=48, help="Requests of each RAG run.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    glove = glove_index()
    from chameleon.rag.corpus import builtin_rag_index
    from chameleon.rag.embedder import Embedder

    docs = builtin_rag_index(Embedder()) / "index"
    profiles = {
        "glove": measure_retrieval(glove, progress=print),
        "docs": measure_retrieval(docs, progress=print),
        "inference": measure_inference(),
    }
    for name, profile in profiles.items():  # for `chameleon plan --retrieval-profile ... --inference-profile ...`
        save_profile(profile, PROFILES / f"{name}.json")
        print(name, {k: v for k, v in vars(profile).items() if k != "runs"}, flush=True)
    nprobe_docs = 16  # the server's default

    rows = []
    for shards, replicas, nprobe in ((1, 1, 32), (2, 1, 32), (1, 2, 64)):
        prediction = predict(workload_of(glove, nprobe), Deployment(shards, replicas, 1, host_cores=cores), profiles["glove"], None)
        measured = measured_tier(glove, shards, replicas, nprobe, args.seconds)
        rows.append(
            {
                "config": f"tier, GloVe-50, {shards} shard(s) x {replicas}, nprobe {nprobe}",
                "unit": "searches/s",
                "predicted": prediction.requests_per_s,
                "bottleneck": prediction.bottleneck,
                "measured": measured,
            }
        )
        print(rows[-1], flush=True)
    for max_tokens in (32, 4):
        run = measured_rag(max_tokens, args.requests)
        workload = workload_of(
            docs,
            nprobe_docs,
            passages=0,
            question_tokens=round(run["prompt_tokens"]),
            output_tokens=max(1, round(run["completion_tokens"])),
        )
        prediction = predict(workload, Deployment(1, 1, 1, host_cores=cores), profiles["docs"], profiles["inference"])
        rows.append(
            {
                "config": f"serve /v1/rag, python-docs, 1 shard, {max_tokens} new tokens, 8 clients",
                "unit": "requests/s",
                "predicted": prediction.requests_per_s,
                "bottleneck": prediction.bottleneck,
                "measured": run["requests_per_s"],
                "prompt_tokens": run["prompt_tokens"],
                "completion_tokens": run["completion_tokens"],
            }
        )
        print(rows[-1], flush=True)

    print(f"\n{'configuration':<62} {'predicted':>10} {'measured':>10} {'pred/meas':>9}  bottleneck")
    for row in rows:
        row["ratio"] = row["predicted"] / row["measured"]
        print(f"{row['config']:<62} {row['predicted']:>10,.2f} {row['measured']:>10,.2f} {row['ratio']:>8.2f}x  {row['bottleneck']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "cores": cores,
            "rows": rows,
            "profiles": {name: vars(p) for name, p in profiles.items()},
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
