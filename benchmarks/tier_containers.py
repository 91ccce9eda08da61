"""Search latency through the Compose deployment's containers vs through local processes.

The peer is the same tier as local processes: the index the deployment serves (its 2-shard layout,
copied out of the ``data`` volume), 2 shards x 2 replicas and a coordinator on loopback
(``chameleon cluster up``). The containers' side runs the same client in a container on the
deployment's network (Docker's bridge and its DNS in between), against the coordinator service.
Both time single queries one after another, the coarse search included, after a warm-up.

    make images && docker compose -f deploy/compose.yaml up -d     # wait until the server is healthy
    python benchmarks/tier_containers.py [--project deploy] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYOUT = "shards-2"  # what deploy/compose.yaml's index job writes on the data volume
WARM_UP = 100
NPROBE, K = 16, 10


def measure(coordinator: str, index_dir: str, queries: int) -> dict:
    """p50/p99 ms of single-query searches through ``coordinator`` (run on either side)."""
    from chameleon.cluster import ClusterSearcher

    rng = np.random.default_rng(0)
    searcher = ClusterSearcher.connect(coordinator, index_dir)
    vectors = rng.standard_normal((queries + WARM_UP, searcher.quantizer.dim), dtype=np.float32)
    ms = []
    for n, vector in enumerate(vectors):
        started = time.perf_counter()
        result = searcher.search(vector[None], K, NPROBE)
        if n >= WARM_UP:
            ms.append((time.perf_counter() - started) * 1000)
        assert not result.partial
    searcher.close()
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "queries": len(ms)}


def through_containers(project: str, queries: int) -> dict:
    here = Path(__file__).resolve().parent
    command = ["docker", "run", "--rm", "--network", f"{project}_tier", "-v", f"{project}_data:/data:ro",
               "-v", f"{here}:/opt/bench:ro", "--entrypoint", "python3", "chameleon-retrieval",
               "/opt/bench/tier_containers.py", "--measure", "tcp://coordinator:6000", f"/data/{LAYOUT}", str(queries)]  # fmt: skip
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def through_local_processes(project: str, queries: int, work: Path) -> dict:
    from chameleon import cluster

    copy = subprocess.run(["docker", "run", "--rm", "-v", f"{project}_data:/data:ro", "--entrypoint", "tar", "chameleon-retrieval",
                           "-C", "/data", "-c", LAYOUT], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["tar", "-C", work, "-x"], input=copy.stdout, check=True)
    state = cluster.up(work / LAYOUT, 2, work / "state", replicas=2)
    try:
        return measure(state["coordinator"]["endpoint"], str(work / LAYOUT), queries)
    finally:
        cluster.down(work / "state")


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--project", default="deploy", help="The Compose project (docker compose -p; named after the directory by default)."
    )
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        local = through_local_processes(args.project, args.queries, Path(work))
    containers = through_containers(args.project, args.queries)
    print(f"{args.queries} single queries, k={K}, nprobe={NPROBE}, 2 shards x 2 replicas, coarse search included")
    print(f"{'':18} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in (("local processes", local), ("containers", containers)):
        print(f"{name:18} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f}")
    print(
        f"containers / local processes: p50 {containers['p50_ms'] / local['p50_ms']:.2f}x, p99 {containers['p99_ms'] / local['p99_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()
