"""``chameleon serve``: build what is missing, start the retrieval tier and the HTTP server.

One process holds the HTTP server, the LLM engine, the embedder and the coarse quantizer (the
inference side); the retrieval nodes and the coordinator are child processes on loopback
(``chameleon.cluster``), asked to exit if this process dies. SIGTERM or Ctrl-C stops accepting
requests, finishes the ones in flight, then stops every process this one started. The torch
engine runs in this process behind the continuous batcher and the document KV cache; the vLLM
engine batches and caches prefixes itself, in processes of its own, and the document cache's tree
orders each prompt's documents for it and follows what it holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from chameleon.server.settings import ServeSettings
from chameleon.server.starting import StartingResponder
from retriever.errors import InvalidInput, Unavailable
from retriever.files import wait_for_path, write_json_atomic

GRACEFUL_SHUTDOWN_S = 120
READY_TIMEOUT_S = 180


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    """The server's own loggers (``chameleon.access``, ``chameleon.server``) write their lines to
    stderr as they are; uvicorn keeps its own handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("chameleon")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _interrupt(*_signal_args) -> None:
    raise KeyboardInterrupt


def serve(settings: ServeSettings, ready_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT; ``ready_file`` gets the URL once requests are accepted."""
    import uvicorn

    from chameleon.engines import engine_kind, make_llm_engine
    from chameleon.engines.batching import BatchingEngine
    from chameleon.models import BUILTIN_LLM
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.embedder import Embedder
    from chameleon.rag.pipeline import RagPipeline, prompt_segments
    from chameleon.server.api import create_app
    from chameleon.server.metrics import Metrics
    from chameleon.server.service import Service
    from coordinator.speculation import SpeculativePrefill
    from retriever.datasets import cache_dir

    signal.signal(signal.SIGTERM, _interrupt)  # until uvicorn takes over: a stop during startup cleans up too
    _log_to_stderr()
    listener = _listen(settings.host, settings.port)
    starting = StartingResponder(listener).start()
    state_dir = (settings.state_dir or cache_dir() / "serve").resolve()
    served = service = app = engine = kind = None
    watching = threading.Event()  # set: the index watch stops
    try:
        kind = engine_kind("torch" if settings.engine == "auto" and settings.knnlm is not None else settings.engine)
        if settings.index is not None and settings.wait_for_index:
            starting.step(f"waiting for the index at {settings.index}")
            wait_for_path(settings.index, settings.wait_for_index)
        starting.step("loading the embedder and the passage index")
        embedder = Embedder()
        index_source = settings.index or builtin_rag_index(embedder, progress=True)  # a link, with a deployment's --watch-index
        rag_index = RagIndex(index_source, embedder.fingerprint)
        starting.step("loading the LLM")
        _say(f"loading the LLM ({settings.model or BUILTIN_LLM}, {kind} engine)")
        engine = make_llm_engine(kind, settings.model, max_batch=settings.max_batch, decode_weights=settings.decode_weights)
        if kind == "torch":  # vLLM batches by itself
            engine = BatchingEngine(engine, settings.max_batch, settings.reorder_window or None)
        knnlm = None
        if settings.knnlm is not None:
            from chameleon.rag.knnlm import KnnLm

            knnlm = KnnLm.open(settings.knnlm, engine)
        starting.step("starting the retrieval tier")
        served = open_index(settings, rag_index, state_dir)
        reloads = itertools.count(1)
        metrics = Metrics(
            tier_info=lambda: service.tier_info() if service is not None else None,
            tier_processes=lambda: service.tier_processes() if service is not None else [],
        )
        metrics.queue_depth.set_function(lambda: engine.waiting)
        metrics.batch_size.set_function(lambda: engine.running)
        template = prompt_segments(engine, "?", rag_index.passages[:1])[0]  # the head every standard request shares
        starting.step("preparing the document KV cache")
        doc_cache = _document_cache(kind, engine, settings, cache_dir(), template)
        metrics.watch_cache(doc_cache)
        speculation = SpeculativePrefill(busy=lambda: engine.waiting > 0) if settings.speculative else None
        metrics.watch_speculation(speculation)
        pipeline = RagPipeline(
            rag_index,
            embedder,
            engine,
            k=settings.k,
            nprobe=settings.nprobe,
            retrieval=served.retrieval,
            doc_cache=doc_cache,
            speculation=speculation,
        )
        model_id = Path(settings.model).name if settings.model else BUILTIN_LLM
        # a reloaded version's tier starts beside the one it replaces, in a directory of its own
        service = Service(
            pipeline,
            model_id,
            served,
            lambda fresh: open_index(settings, fresh, state_dir / f"reload-{next(reloads)}"),
            knnlm,
            metrics,
            index_source,
        )
        app = create_app(service, settings, metrics)
        starting.step("waiting for every tier to answer")
        _wait_until_answering(service)
        if settings.watch_index:
            service.index.watch(pipeline, settings.watch_index, watching)
        host, port = listener.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        _banner(url, model_id, rag_index, settings)
        if ready_file is not None:
            write_json_atomic(
                ready_file, {"url": url, "pid": os.getpid(), "state_dir": str(served.state_dir) if served.state_dir else None}
            )
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False)
        starting.stop()
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not cut the cleanup short
        watching.set()
        if service is not None:
            service.index.stop_reloads()  # the version to stop is the one served last
        starting.stop()
        listener.close()
        if app is not None:
            app.state.context.workers.shutdown(wait=False, cancel_futures=True)
        if engine is not None:
            engine.close()
        served = service.served if service is not None else served  # the version served last
        if served is not None and served.tier is not None:
            _say(f"stopped {len(served.close())} tier process(es)")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if kind == "vllm":
        # vLLM on a CPU leaves a native thread behind that now and then aborts the interpreter's
        # own shutdown ("terminate called without an active exception", SIGABRT: 3 stops of 14 in
        # tests/test_engines.py, 2026-12-07). Everything this process owns is stopped by now: end
        # here, without that shutdown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _wait_until_answering(service, timeout: float = READY_TIMEOUT_S) -> None:
    """Return once a request would succeed: every tier ready, then one passage search answered
    through the retrieval tier (connections made, kernels compiled). Startup under load can keep a
    tier's heartbeats from being seen for a while: this waits it out, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        readiness = service.readiness()
        if readiness["ready"]:
            try:
                service.search("Is the retrieval tier answering?", None, 1, None)
                return
            except Unavailable as e:
                readiness = {"reason": str(e)}
        if time.monotonic() > deadline:
            raise Unavailable(f"not ready after {timeout:.0f} s: {readiness['reason']}")
        time.sleep(0.1)


def spawn(work_dir: Path, *args, timeout: float = 300) -> tuple[subprocess.Popen, dict]:
    """Start ``chameleon serve ARGS`` in the background on a free port, its state in
    ``WORK_DIR/state`` and its output in ``WORK_DIR/serve.log``, and wait until it accepts
    requests. Returns the process and what its ready file says (``url``, ``pid``, ``state_dir``)."""
    ready, log = work_dir / "ready.json", work_dir / "serve.log"
    ready.unlink(missing_ok=True)
    command = [sys.executable, "-m", "chameleon", "serve", "--port", "0", "--ready-file", ready, "--state-dir", work_dir / "state", *args]
    with open(log, "ab") as out:
        process = subprocess.Popen(list(map(str, command)), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise InvalidInput(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def open_index(settings: ServeSettings, rag_index, state_dir: Path):
    """Serve ``rag_index`` as ``settings`` say: a retrieval tier of ``settings.shards`` shards
    (processes with their state in ``state_dir``) or, with no shards, a search in this process.
    Returns a ``chameleon.server.served_index.ServedIndex``."""
    from chameleon import cluster
    from chameleon.server.served_index import ServedIndex
    from coordinator.client import RetrievalClient
    from retriever.engines import engine_options
    from retriever.search import Searcher
    from retriever.wire.security import CurveKeys

    if settings.coordinator is not None:
        return _tier_of_others(settings, rag_index)
    if not settings.shards:
        searcher = Searcher(
            rag_index.index, settings.retrieval_engine, **engine_options(settings.retrieval_engine, settings.fpga_mode, settings.xclbin)
        )
        searcher.engine.warm_up()
        return ServedIndex(rag_index, searcher)
    _say(f"starting {settings.shards} retrieval shard(s) x {settings.replicas} replica(s) and the coordinator ({state_dir})")
    state = cluster.up(
        rag_index.path / "index",
        settings.shards,
        state_dir,
        settings.replicas,
        engine=settings.retrieval_engine,
        keys_dir=settings.keys,
        die_with_parent=True,
        fpga_mode=settings.fpga_mode,
        xclbin=settings.xclbin,
    )
    keeper = cluster.ClusterKeeper(state_dir).start()  # processes that exit or go silent are restarted
    try:
        keys = CurveKeys.load(settings.keys) if settings.keys is not None else None
        return ServedIndex(
            rag_index,
            cluster.ClusterSearcher.open(state_dir),
            RetrievalClient(state["coordinator"]["endpoint"], keys=keys, timeout=1.0),
            state_dir,
            keeper,
        )
    except BaseException:
        keeper.stop()
        cluster.down(state_dir)
        raise


def _tier_of_others(settings: ServeSettings, rag_index):
    """``rag_index`` searched through the coordinator of a tier this server did not start. A tier
    that answers and searches vectors of another metric is refused at once; one that does not
    answer yet, or has no node of this version yet (a new version rolling out), keeps the server
    from being ready until it does (``IndexServing.readiness``)."""
    from chameleon import cluster
    from chameleon.server.served_index import ServedIndex
    from coordinator.client import RetrievalClient
    from retriever.errors import ChameleonError
    from retriever.wire.security import CurveKeys

    keys = CurveKeys.load(settings.keys) if settings.keys is not None else None
    tier = RetrievalClient(settings.coordinator, keys=keys, timeout=1.0)
    try:
        serves = tier.info()["metric"]
    except ChameleonError:
        serves = None
    served = ServedIndex(rag_index, cluster.ClusterSearcher.connect(settings.coordinator, rag_index.path / "index", keys), tier)
    if serves not in (None, rag_index.index.params.metric):
        served.close()
        raise InvalidInput(
            f"the retrieval tier at {settings.coordinator} serves {serves} indexes, not this passage index's ({rag_index.index.params.metric})"
        )
    _say(f"searching the retrieval tier through its coordinator at {settings.coordinator}")
    return served


def _document_cache(kind: str, engine, settings: ServeSettings, cache: Path, template: list[int]):
    """The document KV cache, or None; gdsf/pgdsf cost requests with a prefill profile, measured
    once per model and device (a few seconds) unless one is given. With vLLM, which evicts by
    itself, the tree follows its KV cache (its size where vLLM reports it, else the device budget)."""
    from chameleon.engines.prefill_timing import measure_quick
    from chameleon.rag.doc_cache import DocumentKVCache, VllmDocumentCache
    from coordinator.prefill_profile import PrefillProfile

    if settings.cache_policy == "none":
        return None
    if kind == "vllm":
        return VllmDocumentCache.of(engine, settings.cache_device_mb << 20, template)
    profile = None
    if settings.cache_policy in ("gdsf", "pgdsf"):
        path = settings.prefill_profile or cache / "profiles" / f"{Path(engine.model.config._name_or_path).name}-{engine.device}.json"
        if settings.prefill_profile is None and not path.is_file():
            _say(f"measuring the prefill profile once ({path})")
            measure_quick(engine.engine).save(path)
        profile = PrefillProfile.load(path)
    return DocumentKVCache(engine, settings.cache_policy, settings.cache_device_mb << 20, settings.cache_host_mb << 20, profile, template)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before the slow startup, so a taken port fails at once and port 0 is known early."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _banner(url: str, model_id: str, rag_index, settings: ServeSettings) -> None:
    auth = " -H 'Authorization: Bearer YOUR_KEY'" if settings.api_keys else ""
    key = "YOUR_KEY" if settings.api_keys else "none"
    question = json.dumps({"question": "How do I read a file line by line?"})
    tier = f"retrieval through {settings.coordinator}" if settings.coordinator else f"{settings.shards or 'no'} retrieval shard(s)"
    print(
        f"\nChameleon serves {model_id} over {len(rag_index.passages):,} passages of {rag_index.meta['corpus']} "
        f"({tier}) at {url}\n\n"
        f"  curl -s {url}/v1/rag -H 'Content-Type: application/json'{auth} -d '{question}'\n\n"
        f"  python -c \"from openai import OpenAI; client = OpenAI(base_url='{url}/v1', api_key='{key}'); "
        f"print(client.chat.completions.create(model='{model_id}', messages=[{{'role': 'user', "
        f"'content': 'How do I sort a list of dicts by a key?'}}]).choices[0].message.content)\"\n\n"
        f"  docs {url}/docs   metrics {url}/metrics   stop with Ctrl-C\n",
        flush=True,
    )
