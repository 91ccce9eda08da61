"""Golden data for the kernel's C simulation (``make -C hls csim``): inputs in the kernel's
layout and the top-K our Numba engine finds on them.

    python -m fpga.golden hls/golden

writes ``params.txt`` (the kernel parameters to build the testbench with) and one directory per
case (L2, cosine) of raw little-endian arrays named after the kernel's ports. The Numba engine
computes L2 tables from residuals here, as the kernel does, so the expected keys are bit-exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fpga.config import KernelConfig
from fpga.layout import pack_banks
from retriever.build import build_index
from retriever.coarse import CoarseQuantizer
from retriever.engines import NumbaEngine
from retriever.files import atomic_directory
from retriever.index import IVFPQIndex, IVFPQParams
from retriever.vectors import prepare_vectors

DIM, M, NLIST, K = 32, 8, 16, 10
VECTORS, QUERIES, NPROBE = 1500, 24, 4
METRICS = ("l2", "cos")


def golden_config() -> KernelConfig:
    return KernelConfig.for_index(IVFPQParams("l2", DIM, NLIST, M), k=K)


def write_case(directory: Path, index: IVFPQIndex, queries: np.ndarray, nprobe: int, config: KernelConfig) -> None:
    """One case: the kernel's inputs for ``queries`` on ``index`` (one shard) and the expected top-K."""
    p = index.params
    queries = prepare_vectors(queries, p.metric)
    list_ids = CoarseQuantizer(index.centroids, p.metric, device="cpu").search(queries, nprobe)[0]
    keys, ids = NumbaEngine(index, residual_tables=True).search(queries, list_ids, config.k)
    if p.inner_product:
        keys = -keys
    banked = pack_banks(index.whole(), config.banks, config.lanes)
    arrays = {
        "queries": queries.astype(np.float32),
        "list_ids": list_ids.astype(np.int32),
        "centroids": index.centroids.astype(np.float32),
        "codebooks": index.codebooks.astype(np.float32),
        "list_rows": banked.list_rows,
        "expected_keys": keys.astype(np.float32),
        "expected_ids": ids.astype(np.int64),
    }
    for b in range(config.banks):
        arrays[f"codes{b}"], arrays[f"ids{b}"] = banked.codes[b], banked.ids[b]
    directory.mkdir(parents=True)
    for name, array in arrays.items():
        np.ascontiguousarray(array).tofile(directory / f"{name}.bin")
    rows = banked.codes.shape[1]
    (directory / "shape.txt").write_text(f"{len(queries)} {nprobe} {p.nlist} {rows} {int(p.inner_product)}\n")


def write_golden(out: str | Path, seed: int = 7) -> Path:
    """Write the golden cases to ``out`` (replacing it atomically)."""
    config = golden_config()
    rng = np.random.default_rng(seed)
    with atomic_directory(out, replace=True) as tmp:
        (tmp / "params.txt").write_text(" ".join(config.make_variables()) + "\n")
        for metric in METRICS:
            vectors = rng.standard_normal((VECTORS, DIM)).astype(np.float32)
            index = build_index(vectors, IVFPQParams(metric, DIM, NLIST, M), train_size=VECTORS, seed=seed, nshards=2).shard(1)
            write_case(tmp / metric, index, rng.standard_normal((QUERIES, DIM)).astype(np.float32), NPROBE, config)
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fpga.golden OUT_DIR")
    print(f"wrote {write_golden(sys.argv[1])}")
