"""The ``chameleon`` command line."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path

import numpy as np
import typer
from tqdm.auto import tqdm

from retriever.errors import ChameleonError, InvalidInput, NotFound, Unavailable, Unsupported

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Chameleon: heterogeneous RAG serving.")
index_app = typer.Typer(no_args_is_help=True, help="Build and inspect IVF-PQ indexes.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
node_app = typer.Typer(no_args_is_help=True, help="Run one process of the retrieval tier.")
cluster_app = typer.Typer(no_args_is_help=True, help="A local cluster of retrieval nodes and a coordinator.")
keys_app = typer.Typer(no_args_is_help=True, help="CURVE keys for encrypted, authenticated tiers.")
profile_app = typer.Typer(no_args_is_help=True, help="Measure the costs the cache policy works with.")
app.add_typer(index_app, name="index")
app.add_typer(bench_app, name="bench")
app.add_typer(node_app, name="node")
app.add_typer(cluster_app, name="cluster")
app.add_typer(keys_app, name="keys")
app.add_typer(profile_app, name="profile")


class Metric(str, Enum):
    l2 = "l2"
    ip = "ip"
    cos = "cos"


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _number_list(text: str, what: str, kind=int) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise InvalidInput(f"{what} must be a comma-separated list of {noun}, got {text!r}") from None
    if not values:
        raise InvalidInput(f"{what} is empty")
    return values


@index_app.command("build")
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
        _say(f"wrote {out}: kNN-LM datastore of {meta['keys']:,} positions for {meta['model']}")
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
    _say(f"building IVF{nlist},PQ{m}x{nbits} ({params.metric}) on {base.shape[0]:,} x {base.shape[1]} vectors from {source}")
    started = time.perf_counter()
    index = build_index(base, params, train_size=train_size, nshards=shards, seed=seed, progress=True)
    index.build_info["source"] = source
    save_index(index, out, force=force)
    _say(f"wrote {out} ({index.ntotal:,} vectors, {shards} shard(s)) in {time.perf_counter() - started:.1f} s")


@index_app.command("add")
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
        _say(
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
    _say(f"added {new.shape[0]:,} vectors from {vectors} to {index}: {extended.ntotal:,} in all, in {time.perf_counter() - started:.1f} s")


@index_app.command("remove")
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
        _say(
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
        try:
            wanted = np.array([int(x) for x in ids.split(",")], dtype=np.int64)
        except ValueError:
            raise InvalidInput(f"--ids takes comma-separated integers, got {ids!r}") from None
    smaller = remove_ids(load_index(index), wanted)
    save_index(smaller, index, force=True)
    _say(f"removed {np.unique(wanted).size:,} vectors from {index}: {smaller.ntotal:,} left")


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
    _say(f"building a passage index of {corpus} with the built-in embedder")
    meta = build_rag_index(corpus, out, Embedder(), nlist=nlist, m=m, nbits=nbits, force=force, progress=True)
    _say(f"wrote {out}: {meta['documents']:,} documents, {meta['passages']:,} passages in {time.perf_counter() - started:.1f} s")
    return meta


@app.command("ask")
def ask(
    question: str = typer.Argument(..., help="The question."),
    server: str | None = typer.Option(None, "--server", envvar="CHAMELEON_SERVER", help="Ask a running `chameleon serve` at this URL."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="CHAMELEON_API_KEY", help="With --server: its API key."),
    index: Path | None = typer.Option(None, "--index", help="Passage index (default: built-in python-docs, built on first use)."),
    cluster: Path | None = typer.Option(None, "--cluster", help="Retrieve through the cluster in this state directory."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in SmolLM2-135M)."),
    engine: str = typer.Option(
        "auto", "--engine", help="LLM engine: auto (vllm on a CUDA host where it is installed, else torch), torch or vllm."
    ),
    k: int = typer.Option(4, "--k", help="Passages to retrieve."),
    nprobe: int = typer.Option(16, "--nprobe"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="New tokens at most."),
    retrieval_interval: int | None = typer.Option(None, "--retrieval-interval", help="Retrieve again every N new tokens."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature (0..2; default: greedy)."),
    top_p: float | None = typer.Option(
        None, "--top-p", help="With --temperature: draw from the most likely tokens reaching this probability."
    ),
    seed: int | None = typer.Option(None, "--seed", help="With --temperature: the same seed gives the same answer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, sources, timings."),
):
    """Answer a question from the passage index with the LLM, citing the sources.

    With --server (or CHAMELEON_SERVER) a running server answers; otherwise this process does.
    """
    import json

    from chameleon.engines.sampling import Sampling

    if not question.strip():
        raise InvalidInput("the question is empty")
    if server is not None:
        if index is not None or cluster is not None or model is not None or engine != "auto":
            raise InvalidInput("--index, --cluster, --model and --engine are the server's own settings; leave them out with --server")
        request = {
            "question": question,
            "k": k,
            "max_tokens": max_tokens,
            "retrieval_interval": retrieval_interval,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        answer = _post_json(server.rstrip("/") + "/v1/rag", request, api_key)
    else:
        settings = Sampling.of(temperature, top_p, seed)  # bad settings fail before anything loads
        sampling = settings.sampler() if settings is not None else None
        answer = _ask_here(question, index, cluster, model, engine, k, nprobe, max_tokens, retrieval_interval, sampling)
    if as_json:
        typer.echo(json.dumps({key: answer[key] for key in ("answer", "sources", "timings")}))
        return
    typer.echo(answer["answer"])
    typer.echo("\nsources:")
    for n, source in enumerate(answer["sources"], 1):
        typer.echo(f"  [{n}] {source['title']} ({source['doc_id']}, score {source['score']:.3f})")
    t = answer["timings"]
    typer.echo(
        f"\ntimings: embed {t['embed_s'] * 1e3:.1f} ms, coarse {t['coarse_s'] * 1e3:.2f} ms, retrieval {t['retrieval_s'] * 1e3:.2f} ms, "
        f"TTFT {t['ttft_s'] * 1e3:.0f} ms, decode {t['decode_tokens_per_s']:.1f} tokens/s"
    )


def _ask_here(question, index, cluster, model, engine, k, nprobe, max_tokens, retrieval_interval, sampling) -> dict:
    from chameleon.engines import engine_kind, make_llm_engine
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.embedder import Embedder
    from chameleon.rag.pipeline import RagPipeline

    kind = engine_kind(engine)  # a wrong name fails before anything loads
    embedder = Embedder()
    rag_index = RagIndex(index if index is not None else builtin_rag_index(embedder, progress=True), embedder.fingerprint)
    retrieval = None
    if cluster is not None:
        from chameleon.cluster import ClusterSearcher

        retrieval = ClusterSearcher.open(cluster)
        if not retrieval.serves(rag_index.path / "index"):
            retrieval.close()
            raise InvalidInput(f"the cluster in {cluster} serves another index than {rag_index.path}")
    llm = None
    try:
        llm = make_llm_engine(kind, model)
        pipeline = RagPipeline(rag_index, embedder, llm, k=k, nprobe=nprobe, retrieval=retrieval)
        answer = pipeline.ask(question, max_new_tokens=max_tokens, retrieval_interval=retrieval_interval, sampling=sampling)
    finally:
        if retrieval is not None:
            retrieval.close()
        if kind == "vllm" and llm is not None:
            llm.close()  # its engine processes
    return {"answer": answer.answer, "sources": answer.sources, "timings": answer.timings.as_dict()}


def _post_json(url: str, body: dict, api_key: str | None, timeout: float = 600.0) -> dict:
    """POST ``body`` to a Chameleon server; its error message (not a traceback) when it refuses."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        kind = Unavailable if e.code in (503, 504) else InvalidInput  # the server's tiers do not answer now
        raise kind(f"the server answered {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise Unavailable(f"cannot reach the server at {url}: {e.reason}") from None


@profile_app.command("prefill")
def profile_prefill(
    out: Path = typer.Option(..., "--out", help="Where to write the profile (JSON)."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in)."),
    cached: str = typer.Option("0,128,512,1024", "--cached", help="Cached prefix lengths (tokens), from 0."),
    new: str = typer.Option("16,64,256,512", "--new", help="New-token counts."),
    repeats: int = typer.Option(3, "--repeats", help="Timings per cell; the best is kept."),
):
    """Time prefill of N new tokens after C cached ones: the T(C, N) the KV cache policy costs requests with."""
    from chameleon.engines.prefill_timing import measure
    from chameleon.engines.torch_engine import TorchEngine

    grid_cached, grid_new = _number_list(cached, "--cached"), _number_list(new, "--new")
    if not 1 <= repeats <= 100:
        raise InvalidInput(f"--repeats must be between 1 and 100, got {repeats}")
    profile = measure(TorchEngine(model), grid_cached, grid_new, repeats, progress=True)
    profile.save(out)
    typer.echo(f"wrote {out}: {len(grid_cached)} x {len(grid_new)} prefill times on {profile.device}")
    for c, row in zip(profile.cached, profile.table):
        typer.echo(f"  cached {c:>6}: " + "  ".join(f"{n} new {t * 1e3:8.1f} ms" for n, t in zip(profile.new, row)))


@app.command("serve")
def serve(
    config: Path | None = typer.Option(None, "--config", help="YAML file of settings (the flags' long names, with - or _)."),
    index: Path | None = typer.Option(None, "--index", help="Passage index (default: built-in python-docs, built on first run)."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in SmolLM2-135M)."),
    engine: str | None = typer.Option(
        None, "--engine", help="LLM engine: auto (vllm on a CUDA host where it is installed, else torch), torch or vllm."
    ),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Sequences decoded together (8); 1: one at a time."),
    reorder_window: int | None = typer.Option(
        None, "--reorder-window", help="Cache-aware admission: pass a request over at most N times (8); 0: arrival order."
    ),
    shards: int | None = typer.Option(None, "--shards", help="Retrieval shards (default 2); 0 searches in the server process."),
    replicas: int | None = typer.Option(None, "--replicas", help="Nodes per shard (default 1)."),
    retrieval_engine: str | None = typer.Option(
        None,
        "--scan-engine",
        "--retrieval-engine",
        help="Scan engine: numba, faiss, numba-fastscan (4-bit index) or fpga (--retrieval-engine: its old name, deprecated).",
    ),
    fpga_mode: str | None = typer.Option(None, "--fpga-mode", help="With --scan-engine fpga: hw or emu."),
    xclbin: Path | None = typer.Option(None, "--xclbin", help="With --fpga-mode hw: the bitstream (make -C hls hw)."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE keys directory: encrypt and authenticate the tier."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="State and logs of the tier's processes."),
    host: str | None = typer.Option(None, "--host", help="Default 127.0.0.1."),
    port: int | None = typer.Option(None, "--port", help="Default 8000; 0 picks a free port."),
    api_key: list[str] | None = typer.Option(None, "--api-key", help="Accept this Bearer key (repeatable); none: open."),
    k: int | None = typer.Option(None, "--k", help="Passages per request by default (4)."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="Lists probed per search (16)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="The most new tokens a request may ask for (1024)."),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", help="Requests admitted at once; more get 429 (16)."),
    knnlm: Path | None = typer.Option(None, "--knnlm", help="kNN-LM datastore for mode=knnlm requests."),
    cache_policy: str | None = typer.Option(None, "--cache-policy", help="Document KV cache: pgdsf (default), gdsf, lru, lfu or none."),
    cache_device_mb: int | None = typer.Option(None, "--cache-device-mb", help="Its device tier in MiB (512)."),
    cache_host_mb: int | None = typer.Option(None, "--cache-host-mb", help="Its host tier in MiB (2048)."),
    prefill_profile: Path | None = typer.Option(None, "--prefill-profile", help="`chameleon profile prefill` output for gdsf/pgdsf."),
    speculative: bool | None = typer.Option(None, "--speculative/--no-speculative", help="Prefill on the tier's early top-k (off)."),
    access_log: bool | None = typer.Option(None, "--access-log/--no-access-log", help="A JSON line per request on stderr (on)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write the URL and pid here once serving (for scripts)."),
):
    """Serve RAG over HTTP: the RAG API, OpenAI-compatible endpoints, health and metrics.

    Settings come from the flags, then CHAMELEON_* environment variables (CHAMELEON_PORT,
    CHAMELEON_API_KEYS=a,b ...), then the --config file, then the defaults.
    """
    from chameleon.server.launch import serve as run_server
    from chameleon.server.settings import ServeSettings

    settings = ServeSettings.load(
        config,
        index=index,
        model=model,
        engine=engine,
        max_batch=max_batch,
        reorder_window=reorder_window,
        shards=shards,
        replicas=replicas,
        retrieval_engine=retrieval_engine,
        fpga_mode=fpga_mode,
        xclbin=xclbin,
        keys=keys,
        state_dir=state_dir,
        host=host,
        port=port,
        api_keys=api_key or None,
        k=k,
        nprobe=nprobe,
        max_tokens=max_tokens,
        max_concurrency=max_concurrency,
        knnlm=knnlm,
        cache_policy=cache_policy,
        cache_device_mb=cache_device_mb,
        cache_host_mb=cache_host_mb,
        prefill_profile=prefill_profile,
        speculative=speculative,
        access_log=access_log,
    )
    run_server(settings, ready_file)


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
    engines: str = typer.Option(
        "numba,faiss-ivfpq",
        "--engines",
        help="Comma-separated: numba, numba-fastscan (4-bit index), faiss-ivfpq, faiss-fastscan, fpga-emu.",
    ),
    nprobe: str | None = typer.Option(None, "--nprobe", help="Comma-separated; default: powers of two up to min(nlist, 256)."),
    k: int = typer.Option(10, "--k"),
    threads: str = typer.Option("1", "--threads", help="Comma-separated thread counts."),
    queries: int | None = typer.Option(None, "--queries", help="Use only the first N queries."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the rows as JSON."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a recall-vs-QPS plot (PNG)."),
    refine: int = typer.Option(1, "--refine", help="Re-rank each engine's top F*k by the full vectors (faiss: IndexRefineFlat); 1: none."),
):
    """Recall@k, QPS and latency p50/p99 for each engine, thread count and nprobe."""
    from chameleon.bench.recall import plot_rows, run_recall_benchmark, speedups
    from retriever.datasets import load_dataset
    from retriever.files import write_json_atomic
    from retriever.index import load_index

    engine_names = [e.strip() for e in engines.split(",") if e.strip()]
    thread_counts = _number_list(threads, "--threads")
    loaded = load_index(index)
    if nprobe is None:
        nprobes = [1 << i for i in range(9) if 1 << i <= loaded.params.nlist]
    else:
        nprobes = _number_list(nprobe, "--nprobe")
    data = load_dataset(dataset)
    typer.echo(f"{'engine':<15}{'threads':>8}{'nprobe':>8}{'recall':>9}{'qps':>11}{'p50 ms':>9}{'p99 ms':>9}")

    def show(row):
        tqdm.write(
            f"{row['engine']:<15}{row['threads']:>8}{row['nprobe']:>8}{row['recall']:>9.4f}"
            f"{row['qps']:>11,.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
        )

    rows = run_recall_benchmark(loaded, data, engine_names, nprobes, thread_counts, k, queries, on_row=show, refine=refine)
    for ours, peer in (("numba", "faiss-ivfpq"), ("numba", "faiss-fastscan"), ("numba-fastscan", "faiss-fastscan")):
        ratios = speedups(rows, ours, peer)
        if ratios:
            typer.echo(f"{ours} / {peer} QPS: " + "  ".join(f"t{r['threads']}/np{r['nprobe']}={r['ratio']:.2f}x" for r in ratios))
    if json_out:
        write_json_atomic(json_out, rows)
        _say(f"wrote {json_out}")
    if plot:
        plot_rows(rows, plot, title=data.name)
        _say(f"wrote {plot}")


@bench_app.command("fpga-model")
def bench_fpga_model(
    dataset: str = typer.Option(..., "--dataset", help="Built-in dataset or ann-benchmarks .hdf5 (gives queries and ground truth)."),
    index: Path = typer.Option(..., "--index", help="Index directory built from the same dataset (8-bit PQ)."),
    nprobe: str | None = typer.Option(None, "--nprobe", help="Comma-separated; default: 1,4,16,64 (up to nlist)."),
    l1: str = typer.Option("1,2,3,5", "--l1", help="Level-1 queue lengths whose recall loss is measured (emulated kernel)."),
    k: int = typer.Option(10, "--k"),
    clock_mhz: float = typer.Option(140.0, "--clock-mhz", help="Kernel clock (Chameleon's U250 build: 140 MHz)."),
    banks: int = typer.Option(4, "--banks", help="Memory banks the shard is striped over (1, 2 or 4)."),
    queries: int = typer.Option(2000, "--queries", help="Use the first N queries."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the rows as JSON."),
):
    """Predicted FPGA QPS and latency (cycle model of the HLS kernel) next to Numba and faiss measured here."""
    from chameleon.bench.fpga_model import MISS_KEYS, MODEL_KEYS, fpga_model_benchmark
    from chameleon.bench.recall import check_compatible
    from retriever.datasets import load_dataset
    from retriever.files import write_json_atomic
    from retriever.index import load_index

    loaded = load_index(index)
    data = load_dataset(dataset)
    check_compatible(loaded, data)
    if not 1 <= k <= 100:
        raise InvalidInput(f"k must be between 1 and 100, got {k}")
    nprobes = _number_list(nprobe, "--nprobe") if nprobe else [n for n in (1, 4, 16, 64) if n <= loaded.params.nlist]
    result = fpga_model_benchmark(loaded, data, nprobes, _number_list(l1, "--l1"), k, clock_mhz, banks, queries)
    kernel = result["kernel"]
    typer.echo(
        f"kernel: D={kernel['dim']} m={kernel['m']} K={kernel['k']} {kernel['pes']} PEs on {kernel['banks']} banks at {clock_mhz:g} MHz"
    )
    for title, keys, rows in (("", MODEL_KEYS, result["rows"]), ("level-1 queues", MISS_KEYS, result["level1_misses"])):
        if title:
            typer.echo(title)
        typer.echo("".join(f"{key:>22}" for key in keys))
        for row in rows:
            typer.echo("".join(f"{str(row[key]):>22}" for key in keys))
    if json_out:
        write_json_atomic(json_out, result)
        _say(f"wrote {json_out}")


@bench_app.command("knnlm")
def bench_knnlm(
    corpus: str = typer.Option("python-docs", "--corpus", help="Corpus; every tenth document is held out."),
    model: str | None = typer.Option(None, "--model", help="Local HF model directory (default: built-in)."),
    k: int = typer.Option(16, "--k"),
    lam: str = typer.Option("0.1,0.25", "--lambda", help="Weights of the kNN distribution to try (chosen on validation text)."),
    temperature: str = typer.Option("1,10,100", "--temperature", help="Softmax temperatures to try."),
    max_train_tokens: int = typer.Option(60_000, "--max-train-tokens", help="Datastore size bound (tokens)."),
    json_out: Path | None = typer.Option(None, "--json"),
):
    """Perplexity of the base LM and of kNN-LM on held-out text of the datastore's corpus."""
    import json
    import tempfile

    from chameleon.bench.recall import knnlm_benchmark
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import read_corpus
    from retriever.files import write_json_atomic

    lambdas, temperatures = _number_list(lam, "--lambda", float), _number_list(temperature, "--temperature", float)
    if not all(0 <= x <= 1 for x in lambdas) or not all(t > 0 for t in temperatures) or not 1 <= k <= 1024 or max_train_tokens < 256:
        raise InvalidInput("need 0 <= --lambda <= 1, --temperature > 0, 1 <= --k <= 1024, --max-train-tokens >= 256")
    with tempfile.TemporaryDirectory() as workdir:
        result = knnlm_benchmark(read_corpus(corpus), TorchEngine(model), workdir, k, lambdas, temperatures, max_train_tokens)
    typer.echo(json.dumps(result))
    if json_out:
        write_json_atomic(json_out, result)


@bench_app.command("pipeline")
def bench_pipeline(
    json_out: Path = typer.Option(..., "--json", help="Write the rows, speedups and setting here."),
    model: str | None = typer.Option(None, "--model", help="Local HF model directory (default: built-in)."),
    corpus: str = typer.Option("python-docs", "--corpus", help="Prompts from its held-out documents; the default datastore from the rest."),
    datastore: Path | None = typer.Option(None, "--datastore", help="kNN-LM datastore (default: built once from --corpus)."),
    datastore_tokens: int = typer.Option(100_000, "--datastore-tokens", help="Size of the default datastore (tokens)."),
    batch: int = typer.Option(64, "--batch", help="Sequences decoded together."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens"),
    tokens: int = typer.Option(64, "--tokens", help="New tokens per sequence."),
    intervals: str = typer.Option("1,8,64", "--intervals", help="Retrieve every N tokens, for each N."),
    k: int = typer.Option(16, "--k"),
    nprobe: int = typer.Option(256, "--nprobe", help="Lists scanned per query: the retrieval work per step."),
    shards: int = typer.Option(1, "--shards"),
    repeats: int = typer.Option(2, "--repeats", help="Runs per configuration; the best is kept."),
    inference_cores: str | None = typer.Option(None, "--inference-cores", help="Cores of the model (default: the first half)."),
    retrieval_cores: str | None = typer.Option(None, "--retrieval-cores", help="Cores of the retrieval tier (default: the rest)."),
):
    """kNN-LM tokens/s with retrieval every 1, 8, 64 tokens: sequential vs pipelined, and none."""
    import json
    import tempfile

    from chameleon.bench.pipeline import ROW_KEYS, datastore_for, default_cores, run
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import read_corpus
    from retriever.datasets import cache_dir
    from retriever.files import write_json_atomic

    every = _number_list(intervals, "--intervals")
    if not every or min(every) < 1 or not 1 <= batch <= 256 or not 1 <= tokens <= 4096 or prompt_tokens < 1 or repeats < 1:
        raise InvalidInput("need --intervals >= 1, 1 <= --batch <= 256, 1 <= --tokens <= 4096, --prompt-tokens >= 1, --repeats >= 1")
    cores = default_cores()
    chosen = [
        set(_number_list(text, flag)) if text else default
        for text, flag, default in ((inference_cores, "--inference-cores", cores[0]), (retrieval_cores, "--retrieval-cores", cores[1]))
    ]
    if not all(c <= os.sched_getaffinity(0) for c in chosen):
        raise InvalidInput(f"cores must be among {sorted(os.sched_getaffinity(0))}")
    engine = TorchEngine(model)
    documents = read_corpus(corpus)
    store = datastore if datastore is not None else datastore_for(engine, corpus, documents, datastore_tokens, cache_dir() / "knnlm")
    with tempfile.TemporaryDirectory() as state_dir:
        result = run(engine, documents, store, Path(state_dir), batch, prompt_tokens, tokens, every, k, nprobe, shards, repeats, *chosen)
    write_json_atomic(json_out, result)
    typer.echo("  ".join(f"{key:>14}" for key in ROW_KEYS))
    for row in result["rows"]:
        typer.echo("  ".join(f"{str(row[key]):>14}" for key in ROW_KEYS))
    typer.echo(f"pipelined / sequential: {json.dumps(result['speedup'])}")


@bench_app.command("kvcache")
def bench_kvcache(
    json_out: Path = typer.Option(..., "--json", help="Write one row per configuration here."),
    index: Path | None = typer.Option(None, "--index", help="Passage index whose passages are the documents (default: python-docs)."),
    model: str | None = typer.Option(None, "--model", help="Local HF model directory (default: built-in)."),
    requests: int = typer.Option(100, "--requests", help="Requests per configuration."),
    warmup: int = typer.Option(100, "--warmup", help="Requests each cache serves first, uncounted (steady state)."),
    zipf: str = typer.Option("0.8,1.1", "--zipf", help="Zipf exponents of document popularity."),
    policies: str = typer.Option("none,lru,lfu,gdsf,pgdsf", "--policies"),
    speculative: str = typer.Option("both", "--speculative", help="Speculative prefill on the early top-k: off, on or both (a row each)."),
    nprobe: int = typer.Option(8, "--nprobe", help="Lists each request's search probes (the early answer comes after half)."),
    device_docs: int = typer.Option(32, "--device-docs", help="Device tier budget, in average passages."),
    host_docs: int = typer.Option(64, "--host-docs", help="Host tier budget, in average passages."),
    load: str = typer.Option("0.9", "--load", help="Arrival rates as fractions of the no-cache capacity (a row set each)."),
    profile: Path | None = typer.Option(None, "--profile", help="Prefill profile (default: measure a small one now)."),
    seed: int = typer.Option(0, "--seed"),
):
    """TTFT, throughput and hit rate per cache policy on a Poisson stream of Zipf-popular documents."""
    from chameleon.bench.kvcache import ROW_KEYS, comparisons, kvcache_benchmark
    from chameleon.engines.prefill_timing import measure_quick
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.embedder import Embedder
    from coordinator.kv_cache import POLICIES
    from coordinator.prefill_profile import PrefillProfile
    from retriever.files import write_json_atomic

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    if not chosen or any(p not in ("none", *POLICIES) for p in chosen):
        raise InvalidInput(f"--policies takes none and {', '.join(POLICIES)}, got {policies!r}")
    speculation = {"off": (False,), "on": (True,), "both": (False, True)}.get(speculative)
    if speculation is None:
        raise InvalidInput(f"--speculative takes off, on or both, got {speculative!r}")
    engine = TorchEngine(model)
    embedder = Embedder()
    rag_index = RagIndex(index if index is not None else builtin_rag_index(embedder, progress=True), embedder.fingerprint)
    cost_model = PrefillProfile.load(profile) if profile is not None else measure_quick(engine)
    rows = kvcache_benchmark(
        engine,
        rag_index,
        embedder,
        cost_model,
        requests,
        tuple(_number_list(zipf, "--zipf", float)),
        tuple(chosen),
        speculation,
        device_docs,
        host_docs,
        tuple(_number_list(load, "--load", float)),
        nprobe,
        seed,
        warmup,
    )
    write_json_atomic(json_out, rows)
    typer.echo("  ".join(f"{key:>14}" for key in ROW_KEYS))
    for row in rows:
        typer.echo("  ".join(f"{str(row[key]):>14}" for key in ROW_KEYS))
    for line in comparisons(rows):
        typer.echo(line)


@node_app.command("retrieval")
def node_retrieval(
    index: Path = typer.Option(..., "--index", help="Index directory."),
    shard: int = typer.Option(..., "--shard", help="The shard this node serves."),
    bind: str = typer.Option(..., "--bind", help="ZeroMQ endpoint, e.g. tcp://0.0.0.0:5555 or tcp://127.0.0.1:*"),
    engine: str = typer.Option(
        "numba",
        "--scan-engine",
        "--engine",
        help="numba, faiss, numba-fastscan (4-bit index) or fpga (--engine: its old name, deprecated).",
    ),
    fpga_mode: str | None = typer.Option(
        None, "--fpga-mode", help="With --scan-engine fpga: hw (the card, through PYNQ) or emu (the kernel's C++ on this CPU)."
    ),
    xclbin: Path | None = typer.Option(None, "--xclbin", help="With --fpga-mode hw: the bitstream (make -C hls hw)."),
    threads: int | None = typer.Option(None, "--threads", help="Scan threads (default: all cores)."),
    window_ms: float = typer.Option(0.0, "--window-ms", help="How long an idle node waits for a batch to fill (ms)."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE key directory (`chameleon keys gen`)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write {endpoint, pid} here once serving."),
):
    """Serve one shard of an index (SEARCH, HEARTBEAT) until SIGTERM."""
    import numba

    from retriever.engines import engine_options
    from retriever.node import RetrievalNode
    from retriever.wire.security import CurveKeys

    if threads is not None and not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise InvalidInput(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {threads}")
    if not 0 <= window_ms <= 1000:
        raise InvalidInput(f"the batching window must be between 0 and 1000 ms, got {window_ms}")
    node = RetrievalNode(
        index,
        shard,
        engine=engine,
        window=window_ms / 1000,
        keys=CurveKeys.load(keys) if keys else None,
        threads=threads,
        engine_options=engine_options(engine, fpga_mode, xclbin),
    )
    _say(f"retrieval node: shard {shard}/{node.info['nshards']} of {index} ({node.info['ntotal']:,} vectors, {engine})")
    node.serve(bind, ready_file=ready_file)
    _say("retrieval node: drained, exiting")


@node_app.command("coordinator")
def node_coordinator(
    config: Path = typer.Option(..., "--config", help="JSON: metric, nshards, fingerprint, nodes [{shard, endpoint}]."),
    bind: str = typer.Option(..., "--bind", help="ZeroMQ endpoint for clients."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds before a shard's sub-request fails over."),
    on_missing: str = typer.Option("partial", "--on-missing", help="partial (answer with what is there) or fail."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE key directory (`chameleon keys gen`)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write {endpoint, pid} here once serving."),
):
    """Fan searches out to every shard, merge, fail over between replicas, until SIGTERM."""
    from coordinator.router import ClusterConfig, Coordinator
    from retriever.wire.security import CurveKeys

    if not 0 < timeout <= 3600:
        raise InvalidInput(f"timeout must be between 0 and 3600 seconds, got {timeout}")
    cluster = ClusterConfig.load(config)
    coordinator = Coordinator(cluster, timeout=timeout, on_missing=on_missing, keys=CurveKeys.load(keys) if keys else None)
    _say(f"coordinator: {cluster.nshards} shard(s), {len(cluster.nodes)} node(s)")
    coordinator.serve(bind, ready_file=ready_file)
    _say("coordinator: drained, exiting")


@keys_app.command("gen")
def keys_gen(
    directory: Path = typer.Argument(..., help="Directory for the key pairs."),
    force: bool = typer.Option(False, "--force", help="Replace existing keys."),
):
    """Create a server and a client CURVE key pair (and authorise the client key)."""
    from retriever.wire.security import generate_keys

    generate_keys(directory, force=force)
    typer.echo(f"wrote CURVE keys to {directory}: pass --keys {directory} to nodes, coordinator and clients")


@cluster_app.command("up")
def cluster_up(
    index: Path = typer.Option(..., "--index", help="Index directory (re-sharded on the fly if needed)."),
    shards: int = typer.Option(..., "--shards"),
    state_dir: Path = typer.Option(..., "--state-dir", help="Where cluster.json, logs and re-sharded copies go."),
    replicas: int = typer.Option(1, "--replicas", help="Nodes per shard."),
    engine: str = typer.Option(
        "numba",
        "--scan-engine",
        "--engine",
        help="Scan engine of the nodes: numba, faiss, numba-fastscan (4-bit index) or fpga (--engine: its old name, deprecated).",
    ),
    fpga_mode: str | None = typer.Option(None, "--fpga-mode", help="With --scan-engine fpga: hw or emu."),
    xclbin: Path | None = typer.Option(None, "--xclbin", help="With --fpga-mode hw: the bitstream (make -C hls hw)."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE key directory."),
    timeout: float = typer.Option(2.0, "--timeout", help="Coordinator's per-shard timeout in seconds."),
    on_missing: str = typer.Option("partial", "--on-missing", help="partial or fail."),
):
    """Start retrieval nodes and a coordinator in the background; print the coordinator endpoint."""
    from chameleon.cluster import up

    state = up(
        index,
        shards,
        state_dir,
        replicas=replicas,
        engine=engine,
        keys_dir=keys,
        timeout=timeout,
        on_missing=on_missing,
        fpga_mode=fpga_mode,
        xclbin=xclbin,
    )
    _say(f"cluster up: {shards} shard(s) x {replicas} replica(s); state in {state_dir}/cluster.json")
    typer.echo(state["coordinator"]["endpoint"])


@cluster_app.command("down")
def cluster_down(state_dir: Path = typer.Option(..., "--state-dir")):
    """Stop every process of the cluster."""
    from chameleon.cluster import down

    pids = down(state_dir)
    typer.echo(f"stopped {len(pids)} process(es)")


@cluster_app.command("status")
def cluster_status(state_dir: Path = typer.Option(..., "--state-dir")):
    """Processes and the coordinator's view of the nodes."""
    from chameleon.cluster import status

    report = status(state_dir)
    c = report["coordinator"]
    typer.echo(f"coordinator {c['endpoint']} pid {c['pid']} {'running' if c['running'] else 'NOT RUNNING'}")
    seen = {(n["shard"], n["endpoint"]): n["alive"] for n in (report["view"] or {}).get("nodes", [])}
    for n in report["nodes"]:
        view = seen.get((n["shard"], n["endpoint"]))
        state = "alive" if view else ("unknown" if view is None else "dead")
        typer.echo(
            f"node shard {n['shard']} replica {n['replica']} {n['endpoint']} pid {n['pid']} "
            f"{'running' if n['running'] else 'NOT RUNNING'}, coordinator sees it {state}"
        )
    if report["view"] is None:
        raise Unavailable("the coordinator does not answer")


@app.command("search")
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
    _say(f"wrote {out}: {len(ids):,} queries, k={k}, {int(partial.sum())} partial")


# Exit codes by kind of error (retriever.errors): 2 for what the user can fix in the command, its
# files or its installation; 3 for a tier or server that does not answer now (the same command may
# succeed later). Looked up along the error's classes, most specific first.
EXIT_CODES = {InvalidInput: 2, NotFound: 2, Unsupported: 2, Unavailable: 3, ChameleonError: 2, OSError: 2}


def exit_code(error: BaseException) -> int:
    return next(EXIT_CODES[kind] for kind in type(error).__mro__ if kind in EXIT_CODES)


def main() -> None:
    try:
        app()
    except (ChameleonError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(exit_code(e))
