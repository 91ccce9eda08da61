"""``chameleon ask``: a question answered here, or by a running server."""

from __future__ import annotations

from pathlib import Path

import typer

from retriever.errors import InvalidInput, Unavailable


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
