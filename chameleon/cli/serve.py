"""``chameleon serve``: the appliance (``chameleon.server``)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    config: Path | None = typer.Option(None, "--config", help="YAML file of settings (the flags' long names, with - or _)."),
    index: Path | None = typer.Option(None, "--index", help="Passage index (default: built-in python-docs, built on first run)."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in SmolLM2-135M)."),
    engine: str | None = typer.Option(
        None, "--engine", help="LLM engine: auto (vllm on a CUDA host where it is installed, else torch), torch or vllm."
    ),
    decode_weights: str | None = typer.Option(
        None,
        "--decode-weights",
        help="Torch engine on CPU: decode with the model's weights (model), int8 or int4 copies (faster), or auto (int4 where lossless).",
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
    wait_for_index: float | None = typer.Option(None, "--wait-for-index", help="Wait up to this many seconds for --index to appear (0)."),
    watch_index: float | None = typer.Option(
        None, "--watch-index", help="Every this many seconds, serve the index on disk again if it changed (0: only on POST /admin/reload)."
    ),
    coordinator: str | None = typer.Option(
        None, "--coordinator", help="Search a running retrieval tier through its coordinator (tcp://HOST:PORT) instead of starting one."
    ),
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
        decode_weights=decode_weights,
        max_batch=max_batch,
        reorder_window=reorder_window,
        shards=shards,
        replicas=replicas,
        retrieval_engine=retrieval_engine,
        fpga_mode=fpga_mode,
        xclbin=xclbin,
        keys=keys,
        state_dir=state_dir,
        coordinator=coordinator,
        wait_for_index=wait_for_index,
        watch_index=watch_index,
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
