"""Load on `chameleon serve`: N streamed /v1/rag requests at concurrency C, against the library call.

For each --max-batch value, starts `chameleon serve` (built-in model and python-docs index, 2
retrieval shards; or uses --url), sends questions about standard-library modules from C client
threads, and records per request: status, latency, and time to the first streamed token (client
side). The peer, measured in the same run after the servers stop, is the same questions answered
one after another by ``RagPipeline.ask`` in this process (no HTTP, retrieval in process): the
ratios say what the appliance's layers (HTTP, queueing, streaming, the retrieval tier) and its
continuous batching cost or gain.

    python benchmarks/load_serve.py [--requests 200] [--concurrency 8] [--max-batch 1,8] [--max-tokens 16] [--k 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from chameleon.server.launch import spawn

MODULES = [
    "json",
    "csv",
    "pathlib",
    "itertools",
    "functools",
    "collections",
    "re",
    "datetime",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "asyncio",
    "sqlite3",
    "hashlib",
    "random",
    "statistics",
    "heapq",
    "bisect",
    "shutil",
]
TEMPLATES = ["What does the {} module do?", "How do I use {} in Python?", "Give an example of the {} module."]


def questions(n: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(MODULES[(i * 7) % len(MODULES)]) for i in range(n)]


def one_request(url: str, question: str, max_tokens: int, k: int) -> dict:
    body = json.dumps({"question": question, "max_tokens": max_tokens, "k": k, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/rag", body, {"Content-Type": "application/json"}, method="POST")
    started = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            last_event = None
            for line in response:
                if line.startswith(b"event: "):
                    last_event = line[7:].strip().decode()
                    if last_event == "token" and first is None:
                        first = time.perf_counter()
            ok = last_event == "done"
            status = response.status if ok else 599
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    ended = time.perf_counter()
    return {"status": status, "latency_s": ended - started, "ttft_s": (first or ended) - started}


def server(work_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    process, ready = spawn(work_dir, "--max-batch", max_batch, "--max-concurrency", 64)
    return process, ready["url"]


def in_process(asked: list[str], max_tokens: int, k: int) -> dict:
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.embedder import Embedder
    from chameleon.rag.pipeline import RagPipeline

    embedder = Embedder()
    pipeline = RagPipeline(RagIndex(builtin_rag_index(embedder), embedder.fingerprint), embedder, TorchEngine(), k=k)
    pipeline.ask(asked[0], max_new_tokens=max_tokens)  # warm-up, as the server's first request would be
    latencies = []
    started = time.perf_counter()
    for question in asked:
        t = time.perf_counter()
        pipeline.ask(question, max_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
    return {"seconds": time.perf_counter() - started, "latency_s": np.array(latencies)}


def percentiles(values) -> dict:
    return {f"p{q}": round(float(np.percentile(values, q)) * 1e3, 1) for q in (50, 90, 99)}


def load(url: str, asked: list[str], args) -> dict:
    one_request(url, asked[0], args.max_tokens, args.k)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda q: one_request(url, q, args.max_tokens, args.k), asked))
    seconds = time.perf_counter() - started
    return {
        "errors": sum(r["status"] != 200 for r in results),
        "rps": round(len(asked) / seconds, 3),
        "latency_ms": percentiles([r["latency_s"] for r in results]),
        "ttft_ms": percentiles([r["ttft_s"] for r in results]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server (default: start one per --max-batch value).")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", default="1,8", help="Comma-separated batch sizes to serve with.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()

    asked = questions(args.requests)
    servers = {}
    for max_batch in [int(b) for b in args.max_batch.split(",")] if not args.url else ["external"]:
        with tempfile.TemporaryDirectory() as tmp:
            process, url = (None, args.url) if args.url else server(Path(tmp), max_batch)
            try:
                servers[f"max_batch={max_batch}"] = load(url, asked, args)
            finally:
                if process is not None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=120)
        print(json.dumps({f"max_batch={max_batch}": servers[f"max_batch={max_batch}"]}), flush=True)
    peer = in_process(asked, args.max_tokens, args.k)
    peer_rps = args.requests / peer["seconds"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "servers": {name: {**row, "rps_vs_in_process": round(row["rps"] / peer_rps, 3)} for name, row in servers.items()},
        "in_process": {"rps": round(peer_rps, 3), "latency_ms": percentiles(peer["latency_s"])},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
