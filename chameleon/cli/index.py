"""``chameleon index``: build, change and inspect indexes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from chameleon.cli.common import Metric, number_list, say, vector_index
from retriever.errors import InvalidInput

app = typer.Typer(no_args_is_help=True, help="Build and inspect IVF-PQ indexes.")


@app.command("build")
def index_build(
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    nlist: int | None = typer.Option(None, "--nlist", help="Inverted lists (required for vectors; corpora default to ~4 sqrt(N))."),
    m: int | None = typer.Option(None, "--m", help="PQ sub-quantizers, dividing the dimension (required for vectors; corpora: dim/8)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Built-in dataset (glove-50, synthetic) or ann-benchmarks .hdf5."),
    vectors: Path | None = typer.Option(None, "--vectors", help="Vector file: .npy, .fvecs, .bvecs, .ivecs or .hdf5."),
    corpus: str | None = typer.Option(None, "--corpus", help="Text corpus: python-docs, a folder of .txt/.md, or .jsonl."),
    knnlm: bool = typer.Option(False, "--knnlm", help="With --corpus: a kNN-LM datastore (hidden state -> next token)."),
    model: str | None = typer.Option(None, "--model", help="With --knnlm: local HF model directory (default: built-in)."),
    nbits: int = typer.Option(8, "--nbits", help="Bits per PQ code (4: for the numba-fastscan engine)."),
    metric: Metric | None = typer.Option(None, "--metric", help="Default: the dataset's metric, else l2."),
    shards: int = typer.Option(1, "--shards", help="Split every list into this many balanced shards."),
    train_size: int | None = typer.Option(None, "--train-size", help="Training sample size (default: up to 100 x nlist, at least 100k)."),
    seed: int = typer.Option(1234, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing index directory."),
):
    """Train an IVF-PQ index on a dataset, a vector file or a text corpus and write it to OUT."""
    from retriever.build import build_index
    from retriever.datasets import load_dataset, read_vectors
    from retriever.index import IVFPQParams, save_index

    if sum(x is not None for x in (dataset, vectors, corpus)) != 1:
        raise InvalidInput("give exactly one of --dataset, --vectors and --corpus")
    if out.exists() and not force:
        raise InvalidInput(f"{out} already exists (use --force to replace it)")
    if knnlm and corpus is None:
        raise InvalidInput("--knnlm builds from a text corpus: give --corpus")
    if corpus is not None and knnlm:
        from chameleon.engines.torch_engine import TorchEngine
        from chameleon.rag.corpus import read_corpus
        from chameleon.rag.knnlm import build_datastore

        meta = build_datastore(read_corpus(corpus), TorchEngine(model), out, nlist=nlist, m=m, nbits=nbits, force=force, progress=True)
        say(f"wrote {out}: kNN-LM datastore of {meta['keys']:,} positions for {meta['model']}")
        return
    if corpus is not None:
        _build_corpus_index(corpus, out, nlist, m, nbits, force)
        return
    if nlist is None or m is None:
        raise InvalidInput("--nlist and --m are required for --dataset and --vectors")
    if dataset is not None:
        data = load_dataset(dataset)
        base, default_metric, source = data.base, data.metric, f"dataset:{dataset}"
    else:
        base, default_metric, source = read_vectors(vectors), "l2", str(vectors)
    params = IVFPQParams((metric.value if metric else default_metric), int(base.shape[1]), nlist, m, nbits)
    say(f"building IVF{nlist},PQ{m}x{nbits} ({params.metric}) on {base.shape[0]:,} x {base.shape[1]} vectors from {source}")
    started = time.perf_counter()
    index = build_index(base, params, train_size=train_size, nshards=shards, seed=seed, progress=True)
    index.build_info["source"] = source
    save_index(index, out, force=force)
    say(f"wrote {out} ({index.ntotal:,} vectors, {shards} shard(s)) in {time.perf_counter() - started:.1f} s; {_peak_memory()}")


@app.command("train")
def index_train(
    vectors: Path = typer.Option(..., "--vectors", help="Vector file: .npy, .fvecs or .bvecs (only the sample's rows are read)."),
    out: Path = typer.Option(..., "--out", help="Where the trained quantizers go (an index of no vectors)."),
    nlist: int = typer.Option(..., "--nlist", help="Inverted lists."),
    m: int = typer.Option(..., "--m", help="PQ sub-quantizers, dividing the dimension."),
    nbits: int = typer.Option(8, "--nbits", help="Bits per PQ code (4: for the numba-fastscan engine)."),
    metric: Metric = typer.Option(Metric.l2, "--metric"),
    train_size: int | None = typer.Option(None, "--train-size", help="Training sample size (default: up to 100 x nlist, at least 100k)."),
    seed: int = typer.Option(1234, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing directory."),
):
    """A build in parts, step 1: train the coarse quantizer and the PQ codebooks once, on a sample."""
    from retriever.build import train_quantizers
    from retriever.datasets import VectorFile
    from retriever.index import IVFPQParams, save_index

    base = VectorFile(vectors)
    params = IVFPQParams(metric.value, int(base.shape[1]), nlist, m, nbits)
    trained = train_quantizers(base, params, train_size, seed)
    trained.build_info["source"] = str(vectors)
    save_index(trained, out, force=force)
    say(
        f"wrote {out}: IVF{nlist},PQ{m}x{nbits} trained on {trained.build_info['train_size']:,} of {base.shape[0]:,} vectors; {_peak_memory()}"
    )


@app.command("encode")
def index_encode(
    trained: Path = typer.Option(..., "--trained", help="`index train` output."),
    vectors: Path = typer.Option(..., "--vectors", help="The vector file it was trained on (read a chunk at a time)."),
    part: str = typer.Option(..., "--part", help="I/N: this process encodes the I-th of N equal row ranges (from 0)."),
    out: Path = typer.Option(..., "--out", help="Where this part goes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing directory."),
):
    """A build in parts, step 2 (one process per part, anywhere): encode a range of rows."""
    from retriever.build import encode_part
    from retriever.datasets import VectorFile
    from retriever.index import load_index, save_index

    number, _, count = part.partition("/")
    if not (number.isdigit() and count.isdigit()):
        raise InvalidInput(f"--part takes I/N, e.g. 0/4, got {part!r}")
    index = encode_part(load_index(trained), VectorFile(vectors), int(number), int(count), progress=True)
    save_index(index, out, force=force)
    start, stop = index.build_info["part"]["rows"]
    say(f"wrote {out}: rows {start:,}-{stop - 1:,} encoded; {_peak_memory()}")


@app.command("join")
def index_join(
    parts: list[Path] = typer.Argument(..., help="The parts `index encode` wrote, in any order."),
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    shards: int = typer.Option(1, "--shards", help="Split every list into this many balanced shards."),
    force: bool = typer.Option(False, "--force", help="Replace an existing index directory."),
):
    """A build in parts, step 3: join the parts into one index (written a shard at a time)."""
    from retriever.build import join_parts
    from retriever.index import read_manifest

    join_parts(parts, shards, out, force=force)
    say(f"wrote {out}: {read_manifest(out)['ntotal']:,} vectors from {len(parts)} part(s), {shards} shard(s); {_peak_memory()}")


def _peak_memory() -> str:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec (getrusage's
    maximum is carried over from the parent that forked it)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"peak memory {kib / 1024:,.0f} MiB"


@app.command("add")
def index_add(
    index: Path = typer.Option(..., "--index", help="The index directory to extend: a vector index or a passage index."),
    vectors: Path | None = typer.Option(None, "--vectors", help="Vectors to add to a vector index: .npy, .fvecs, .bvecs, .ivecs or .hdf5."),
    corpus: str | None = typer.Option(None, "--corpus", help="Documents to add to a passage index: a folder of .txt/.md, or .jsonl."),
):
    """Add vectors or documents to an index, encoded with its trained quantizers (no retraining).

    The directory is replaced atomically once the new index is complete. Added vectors take the
    ids after the largest in the index; added documents' passages the next passage ids.
    """
    from retriever.build import add_vectors
    from retriever.datasets import read_vectors
    from retriever.index import load_index, save_index

    if (vectors is None) == (corpus is None):
        raise InvalidInput("give exactly one of --vectors and --corpus")
    started = time.perf_counter()
    if (index / "rag.json").is_file():
        if corpus is None:
            raise InvalidInput(f"{index} is a passage index: add documents with --corpus")
        from chameleon.rag.corpus import add_to_rag_index
        from chameleon.rag.embedder import Embedder

        meta = add_to_rag_index(index, corpus, Embedder(), progress=True)
        added = meta["added"][-1]
        say(
            f"added {added['documents']:,} documents ({added['passages']:,} passages) to {index}: "
            f"{meta['documents']:,} documents, {meta['passages']:,} passages in {time.perf_counter() - started:.1f} s"
        )
        return
    _check_vector_index(index)
    if vectors is None:
        raise InvalidInput(f"{index} is a vector index: add vectors with --vectors")
    new = read_vectors(vectors)
    extended = add_vectors(load_index(index), new, progress=True)
    save_index(extended, index, force=True)
    say(f"added {new.shape[0]:,} vectors from {vectors} to {index}: {extended.ntotal:,} in all, in {time.perf_counter() - started:.1f} s")


@app.command("version")
def index_version(
    name: str = typer.Argument(..., help="The version's name: lowercase letters, digits and '-' (at most 16 characters)."),
    data: Path = typer.Option(..., "--data", help="The deployment's index directory: versions/NAME go in it, `current` links to one."),
    corpus: str | None = typer.Option(None, "--corpus", help="Make it a passage index of this corpus (python-docs, a folder, .jsonl)."),
    parts: list[Path] = typer.Option([], "--part", help="Make it a vector index of these parts of a build (`index encode`; repeatable)."),
    base: str | None = typer.Option(None, "--from", help="Make it a copy of this earlier version, changed as below (no training)."),
    add: str | None = typer.Option(None, "--add", help="With --from: documents (a corpus) or vectors (a vector file) to add."),
    remove_docs: list[str] = typer.Option([], "--remove-doc", help="With --from: a document to remove from a passage index (repeatable)."),
    remove_ids: str | None = typer.Option(
        None, "--remove-ids", help="With --from: vector ids to remove from a vector index, comma-separated."
    ),
    shards: list[int] = typer.Option([], "--shards", help="A shard layout to write for the retrieval nodes (repeatable)."),
    keep_current: bool = typer.Option(
        False, "--keep-current", help="Make it current only if no version is (a first version's job, run again after an update)."
    ),
):
    """Write a new version of a deployment's index beside the one served, check it, write its
    shard layouts, and make it current (docs/deployment.md, "Changing the index while serving").

    A version that exists already is kept as it is: a job run again goes on where it stopped."""
    from chameleon.versions import CURRENT, VersionSpec, current_version, write_version

    ids = tuple(number_list(remove_ids, "--remove-ids")) if remove_ids is not None else ()
    spec = VersionSpec(name, corpus, tuple(parts), base, add, tuple(remove_docs), ids)
    started = time.perf_counter()
    version = write_version(data, spec, shards, keep_current, progress=True)
    layouts = ", ".join(f"shards-{n}" for n in shards) or "no layout"
    say(
        f"wrote {version} ({layouts}) in {time.perf_counter() - started:.1f} s; {_peak_memory()}; "
        f"{data / CURRENT} -> versions/{current_version(data)}"
    )


@app.command("reshard")
def index_reshard(
    index: Path = typer.Option(..., "--index", help="A vector index, or a passage index (its vectors are split)."),
    shards: int = typer.Option(..., "--shards", help="Shards of the new layout."),
    out: Path = typer.Option(..., "--out", help="Where the new layout goes (left as it is if it holds that layout already)."),
):
    """Write the index split into another number of shards: the same vectors and the same answers,
    another layout. Retrieval nodes of the new layout join a serving tier, and its coordinators
    switch to it once every shard has a live node (docs/deployment.md)."""
    from retriever.index import read_manifest, save_layout

    if not 1 <= shards <= 256:
        raise InvalidInput(f"shards must be in 1..256, got {shards}")
    source = vector_index(index)
    read_manifest(source)
    save_layout(source, shards, out)
    say(f"wrote {out}: {shards} shard(s) of {source}")


@app.command("remove")
def index_remove(
    index: Path = typer.Option(..., "--index", help="The index directory: a vector index or a passage index."),
    ids: str | None = typer.Option(None, "--ids", help="Vector ids to remove from a vector index, comma-separated."),
    ids_file: Path | None = typer.Option(None, "--ids-file", help="Or a .npy file of them."),
    doc_ids: list[str] = typer.Option([], "--doc-id", help="A document to remove from a passage index (repeatable)."),
):
    """Remove vectors, or documents with all their passages, from an index (no retraining).

    The directory is replaced atomically. A passage index's later passages move up, so that
    passage ids stay positions in its document store; a vector index keeps the other ids.
    """
    from retriever.build import remove_ids
    from retriever.datasets import read_npy
    from retriever.index import load_index, save_index

    if sum((ids is not None, ids_file is not None, bool(doc_ids))) != 1:
        raise InvalidInput("give exactly one of --ids, --ids-file and --doc-id")
    if (index / "rag.json").is_file():
        if not doc_ids:
            raise InvalidInput(f"{index} is a passage index: remove documents with --doc-id")
        from chameleon.rag.corpus import remove_from_rag_index

        meta = remove_from_rag_index(index, doc_ids)
        removed = meta["removed"][-1]
        say(
            f"removed {removed['documents']:,} documents ({removed['passages']:,} passages) from {index}: "
            f"{meta['documents']:,} documents, {meta['passages']:,} passages left"
        )
        return
    _check_vector_index(index)
    if doc_ids:
        raise InvalidInput(f"{index} is a vector index: remove vectors with --ids or --ids-file")
    if ids_file is not None:
        wanted = read_npy(ids_file, ndim=1)
    else:
        wanted = np.array(number_list(ids, "--ids"), dtype=np.int64)
    smaller = remove_ids(load_index(index), wanted)
    save_index(smaller, index, force=True)
    say(f"removed {np.unique(wanted).size:,} vectors from {index}: {smaller.ntotal:,} left")


def _check_vector_index(index: Path) -> None:
    """Refuse what is not a vector index of its own (the vectors inside a passage index or a kNN-LM
    datastore belong to it: changed alone, they would no longer match it)."""
    if not (index / "manifest.json").is_file():
        raise InvalidInput(f"{index} is neither a vector index (manifest.json) nor a passage index (rag.json)")
    for outer, kind in (
        ("rag.json", "passage index: change its documents with --corpus or --doc-id"),
        ("knnlm.json", "kNN-LM datastore, which is built again, not changed"),
    ):
        if (index.resolve().parent / outer).is_file():
            raise InvalidInput(f"{index} is the vectors of the {kind}")


def _build_corpus_index(corpus: str, out: Path, nlist: int | None, m: int | None, nbits: int, force: bool) -> dict:
    from chameleon.rag.corpus import build_rag_index
    from chameleon.rag.embedder import Embedder

    started = time.perf_counter()
    say(f"building a passage index of {corpus} with the built-in embedder")
    meta = build_rag_index(corpus, out, Embedder(), nlist=nlist, m=m, nbits=nbits, force=force, progress=True)
    say(f"wrote {out}: {meta['documents']:,} documents, {meta['passages']:,} passages in {time.perf_counter() - started:.1f} s")
    return meta


@app.command("info")
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
