"""``chameleon search``: query vectors searched in an index or through a cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from chameleon.cli.common import say
from retriever.errors import InvalidInput


def search(
    queries: Path = typer.Option(..., "--queries", help="Query vectors: .npy, .fvecs or .bvecs."),
    k: int = typer.Option(10, "--k"),
    out: Path = typer.Option(..., "--out", help="Output .npz with ids, distances and partial (per query)."),
    index: Path | None = typer.Option(None, "--index", help="Search this index in process."),
    cluster: Path | None = typer.Option(None, "--cluster", help="Search through the cluster in this state directory."),
    nprobe: int = typer.Option(16, "--nprobe"),
    embedded: bool = typer.Option(
        False, "--embedded", help="With --cluster: run the coordinator in this process, talking to the nodes directly."
    ),
    engine: str | None = typer.Option(
        None,
        "--scan-engine",
        "--engine",
        help="With --index: numba (default), faiss, numba-fastscan (4-bit index) or fpga (--engine: its old name, deprecated).",
    ),
    fpga_mode: str | None = typer.Option(None, "--fpga-mode", help="With --scan-engine fpga: hw or emu."),
    xclbin: Path | None = typer.Option(None, "--xclbin", help="With --fpga-mode hw: the bitstream (make -C hls hw)."),
):
    """Search query vectors in an index, in process or through a running cluster."""
    from chameleon.cluster import ClusterSearcher, search_in_batches
    from retriever.datasets import read_vectors
    from retriever.engines import engine_options
    from retriever.index import load_index
    from retriever.search import Searcher

    if (index is None) == (cluster is None):
        raise InvalidInput("give exactly one of --index and --cluster")
    if cluster is not None and (engine, fpga_mode, xclbin) != (None, None, None):
        raise InvalidInput(
            "--scan-engine, --fpga-mode and --xclbin go with --index: a cluster's nodes scan with the engine they were started with"
        )
    engine = engine or "numba"
    options = engine_options(engine, fpga_mode, xclbin)
    vectors = read_vectors(queries)
    if cluster is not None:
        searcher = ClusterSearcher.open(cluster, embedded=embedded)
        try:
            distances, ids, partial = search_in_batches(searcher.search, vectors, k, nprobe)
        finally:
            searcher.close()
    else:
        local = Searcher(load_index(index), engine, **options)
        distances, ids, partial = search_in_batches(local.search, vectors, k, nprobe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(tmp, ids=ids, distances=distances, partial=partial)
    tmp.replace(out)
    say(f"wrote {out}: {len(ids):,} queries, k={k}, {int(partial.sum())} partial")
