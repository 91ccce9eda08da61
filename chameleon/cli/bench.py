"""``chameleon bench``: the benchmark harness (``chameleon.bench``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from tqdm.auto import tqdm

from chameleon.cli.common import number_list, say
from retriever.errors import InvalidInput

app = typer.Typer(no_args_is_help=True, help="Benchmarks.")


@app.command("recall")
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
    thread_counts = number_list(threads, "--threads")
    loaded = load_index(index)
    if nprobe is None:
        nprobes = [1 << i for i in range(9) if 1 << i <= loaded.params.nlist]
    else:
        nprobes = number_list(nprobe, "--nprobe")
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
        say(f"wrote {json_out}")
    if plot:
        plot_rows(rows, plot, title=data.name)
        say(f"wrote {plot}")


@app.command("fpga-model")
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
    nprobes = number_list(nprobe, "--nprobe") if nprobe else [n for n in (1, 4, 16, 64) if n <= loaded.params.nlist]
    result = fpga_model_benchmark(loaded, data, nprobes, number_list(l1, "--l1"), k, clock_mhz, banks, queries)
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
        say(f"wrote {json_out}")


@app.command("knnlm")
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

    lambdas, temperatures = number_list(lam, "--lambda", float), number_list(temperature, "--temperature", float)
    if not all(0 <= x <= 1 for x in lambdas) or not all(t > 0 for t in temperatures) or not 1 <= k <= 1024 or max_train_tokens < 256:
        raise InvalidInput("need 0 <= --lambda <= 1, --temperature > 0, 1 <= --k <= 1024, --max-train-tokens >= 256")
    with tempfile.TemporaryDirectory() as workdir:
        result = knnlm_benchmark(read_corpus(corpus), TorchEngine(model), workdir, k, lambdas, temperatures, max_train_tokens)
    typer.echo(json.dumps(result))
    if json_out:
        write_json_atomic(json_out, result)


@app.command("pipeline")
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

    every = number_list(intervals, "--intervals")
    if not every or min(every) < 1 or not 1 <= batch <= 256 or not 1 <= tokens <= 4096 or prompt_tokens < 1 or repeats < 1:
        raise InvalidInput("need --intervals >= 1, 1 <= --batch <= 256, 1 <= --tokens <= 4096, --prompt-tokens >= 1, --repeats >= 1")
    cores = default_cores()
    chosen = [
        set(number_list(text, flag)) if text else default
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


@app.command("kvcache")
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
        tuple(number_list(zipf, "--zipf", float)),
        tuple(chosen),
        speculation,
        device_docs,
        host_docs,
        tuple(number_list(load, "--load", float)),
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
