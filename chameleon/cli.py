"""The ``chameleon`` command line."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from tqdm.auto import tqdm

from retriever.errors import RetrieverError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Chameleon: heterogeneous RAG serving.")
index_app = typer.Typer(no_args_is_help=True, help="Build and inspect IVF-PQ indexes.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(index_app, name="index")
app.add_typer(bench_app, name="bench")


class Metric(str, Enum):
    l2 = "l2"
    ip = "ip"
    cos = "cos"


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RetrieverError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise RetrieverError(f"{what} is empty")
    return values


@index_app.command("build")
def index_build(
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    nlist: int = typer.Option(..., "--nlist", help="Number of inverted lists (coarse centroids)."),
    m: int = typer.Option(..., "--m", help="PQ sub-quantizers; must divide the dimension."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Built-in dataset (glove-50, synthetic) or ann-benchmarks .hdf5."),
    vectors: Optional[Path] = typer.Option(None, "--vectors", help="Vector file: .npy, .fvecs, .bvecs, .ivecs or .hdf5."),
    nbits: int = typer.Option(8, "--nbits", help="Bits per PQ code."),
    metric: Optional[Metric] = typer.Option(None, "--metric", help="Default: the dataset's metric, else l2."),
    shards: int = typer.Option(1, "--shards", help="Split every list into this many balanced shards."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Training sample size (default: up to 100 x nlist, at least 100k)."),
    seed: int = typer.Option(1234, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing index directory."),
):
    """Train an IVF-PQ index on a dataset or a vector file and write it to OUT."""
    from retriever.build import build_index
    from retriever.datasets import load_dataset, read_vectors
    from retriever.index import IVFPQParams, save_index

    if (dataset is None) == (vectors is None):
        raise RetrieverError("give exactly one of --dataset and --vectors")
    if out.exists() and not force:
        raise RetrieverError(f"{out} already exists (use --force to replace it)")
    if dataset is not None:
        data = load_dataset(dataset)
        base, default_metric, source = data.base, data.metric, f"dataset:{dataset}"
    else:
        base, default_metric, source = read_vectors(vectors), "l2", str(vectors)
    params = IVFPQParams((metric.value if metric else default_metric), int(base.shape[1]), nlist, m, nbits)
    _say(f"building IVF{nlist},PQ{m}x{nbits} ({params.metric}) on {base.shape[0]:,} x {base.shape[1]} vectors from {source}")
    started = time.perf_counter()
    index = build_index(base, params, train_size=train_size, nshards=shards, seed=seed, progress=True)
    index.build_info["source"] = source
    save_index(index, out, force=force)
    _say(f"wrote {out} ({index.ntotal:,} vectors, {shards} shard(s)) in {time.perf_counter() - started:.1f} s")


@index_app.command("info")
def index_info(
    path: Path = typer.Argument(..., help="Index directory."),
    verify: bool = typer.Option(False, "--verify", help="Check every array's sha256."),
):
    """Parameters, sizes and the list-size histogram of an index."""
    from retriever.index import load_index, read_manifest

    index = load_index(path, verify=verify)
    manifest = read_manifest(path)
    p = index.params
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    typer.echo(f"index      {path}")
    typer.echo(f"format     {manifest['format']} v{manifest['format_version']}")
    typer.echo(f"type       IVF{p.nlist},PQ{p.m}x{p.nbits}  metric={p.metric}  dim={p.dim}")
    typer.echo(f"vectors    {index.ntotal:,}  ({p.code_size} B per code, {disk / 2**20:.1f} MiB on disk)")
    typer.echo(f"shards     {index.nshards}: " + ", ".join(f"{s.ntotal:,}" for s in index.shards))
    typer.echo("build      " + "  ".join(f"{k}={v}" for k, v in manifest.get("build", {}).items()))
    if verify:
        typer.echo("checksums  ok")
    sizes = index.whole().list_sizes()
    typer.echo(
        f"list sizes min={sizes.min()} p50={int(np.median(sizes))} p99={int(np.percentile(sizes, 99))} "
        f"max={sizes.max()} empty={int((sizes == 0).sum())}"
    )
    counts, edges = np.histogram(sizes, bins=min(10, max(1, int(sizes.max()) + 1)))
    width = max(counts.max(), 1)
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        typer.echo(f"  {int(lo):>7}-{int(hi):<7} {count:>6}  {'#' * int(40 * count / width)}")


@bench_app.command("recall")
def bench_recall(
    dataset: str = typer.Option(..., "--dataset", help="Built-in dataset or ann-benchmarks .hdf5 (gives queries and ground truth)."),
    index: Path = typer.Option(..., "--index", help="Index directory built from the same dataset."),
    engines: str = typer.Option("numba,faiss-ivfpq", "--engines", help="Comma-separated: numba, faiss-ivfpq, faiss-fastscan."),
    nprobe: Optional[str] = typer.Option(None, "--nprobe", help="Comma-separated; default: powers of two up to min(nlist, 256)."),
    k: int = typer.Option(10, "--k"),
    threads: str = typer.Option("1", "--threads", help="Comma-separated thread counts."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Use only the first N queries."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a recall-vs-QPS plot (PNG)."),
):
    """Recall@k, QPS and latency p50/p99 for each engine, thread count and nprobe."""
    from chameleon.bench import plot_rows, run_recall_benchmark, speedups, write_json
    from retriever.datasets import load_dataset
    from retriever.index import load_index

    engine_names = [e.strip() for e in engines.split(",") if e.strip()]
    thread_counts = _int_list(threads, "--threads")
    loaded = load_index(index)
    if nprobe is None:
        nprobes = [1 << i for i in range(9) if 1 << i <= loaded.params.nlist]
    else:
        nprobes = _int_list(nprobe, "--nprobe")
    data = load_dataset(dataset)
    typer.echo(f"{'engine':<15}{'threads':>8}{'nprobe':>8}{'recall':>9}{'qps':>11}{'p50 ms':>9}{'p99 ms':>9}")

    def show(row):
        tqdm.write(
            f"{row['engine']:<15}{row['threads']:>8}{row['nprobe']:>8}{row['recall']:>9.4f}"
            f"{row['qps']:>11,.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
        )

    rows = run_recall_benchmark(loaded, data, engine_names, nprobes, thread_counts, k, queries, on_row=show)
    for peer in ("faiss-ivfpq", "faiss-fastscan"):
        ratios = speedups(rows, "numba", peer)
        if ratios:
            typer.echo(f"numba / {peer} QPS: " + "  ".join(f"t{r['threads']}/np{r['nprobe']}={r['ratio']:.2f}x" for r in ratios))
    if json_out:
        write_json(rows, json_out)
        _say(f"wrote {json_out}")
    if plot:
        plot_rows(rows, plot, title=data.name)
        _say(f"wrote {plot}")


def main() -> None:
    try:
        app()
    except (RetrieverError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
