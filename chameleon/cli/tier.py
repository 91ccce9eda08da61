"""``chameleon node``, ``cluster`` and ``keys``: the retrieval tier's processes, a local cluster of them, and their CURVE keys."""

from __future__ import annotations

from pathlib import Path

import typer

from chameleon.cli.common import say
from retriever.errors import InvalidInput, Unavailable

node_app = typer.Typer(no_args_is_help=True, help="Run one process of the retrieval tier.")
cluster_app = typer.Typer(no_args_is_help=True, help="A local cluster of retrieval nodes and a coordinator.")
keys_app = typer.Typer(no_args_is_help=True, help="CURVE keys for encrypted, authenticated tiers.")


@node_app.command("retrieval")
def node_retrieval(
    index: Path = typer.Option(..., "--index", help="Index directory."),
    shard: int = typer.Option(..., "--shard", help="The shard this node serves."),
    wait_for_index: float = typer.Option(
        0, "--wait-for-index", help="Wait up to this many seconds for the index to appear (a deployment's index job may still write it)."
    ),
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
    ready_file: Path | None = typer.Option(
        None,
        "--ready-file",
        help="Write {endpoint, pid} here once serving, removed on SIGTERM: an announcement for coordinators following its directory (dir://).",
    ),
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
    _wait_for_index(index, wait_for_index)
    node = RetrievalNode(
        index,
        shard,
        engine=engine,
        window=window_ms / 1000,
        keys=CurveKeys.load(keys) if keys else None,
        threads=threads,
        engine_options=engine_options(engine, fpga_mode, xclbin),
    )
    say(f"retrieval node: shard {shard}/{node.info['nshards']} of {index} ({node.info['ntotal']:,} vectors, {engine})")
    node.serve(bind, ready_file=ready_file)
    say("retrieval node: drained, exiting")


@node_app.command("coordinator")
def node_coordinator(
    index: Path = typer.Option(..., "--index", help="The index the nodes serve (any of its shard layouts; only its manifest is read)."),
    wait_for_index: float = typer.Option(
        0, "--wait-for-index", help="Wait up to this many seconds for the index to appear (a deployment's index job may still write it)."
    ),
    nodes: list[str] = typer.Option(
        ...,
        "--nodes",
        help="Where the nodes are, followed while serving (repeat for several): dns://NAME:PORT (every address of a "
        "Compose service or Kubernetes headless Service), dir://PATH (announcement files), tcp://HOST:PORT (one node).",
    ),
    bind: str = typer.Option(..., "--bind", help="ZeroMQ endpoint for clients."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds before a shard's sub-request fails over."),
    on_missing: str = typer.Option("partial", "--on-missing", help="partial (answer with what is there) or fail."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE key directory (`chameleon keys gen`)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write {endpoint, pid} here once serving."),
):
    """Fan searches out to every shard, merge, fail over between replicas, until SIGTERM; nodes join and leave as the sources list them."""
    from coordinator.router import ClusterConfig, Coordinator
    from retriever.wire.security import CurveKeys

    if not 0 < timeout <= 3600:
        raise InvalidInput(f"timeout must be between 0 and 3600 seconds, got {timeout}")
    _wait_for_index(index, wait_for_index)
    cluster = ClusterConfig.of_index(index, nodes)
    coordinator = Coordinator(cluster, timeout=timeout, on_missing=on_missing, keys=CurveKeys.load(keys) if keys else None)
    say(f"coordinator: index {cluster.content}, nodes from {', '.join(nodes)}")
    coordinator.serve(bind, ready_file=ready_file)
    say("coordinator: drained, exiting")


@node_app.command("probe")
def node_probe(
    endpoint: str = typer.Argument(..., help="A retrieval node's or a coordinator's ZeroMQ endpoint, e.g. tcp://127.0.0.1:6000."),
    keys: Path | None = typer.Option(None, "--keys", help="CURVE key directory, if the tier is encrypted."),
    timeout: float = typer.Option(2.0, "--timeout", help="Seconds to wait for the answer."),
):
    """Print the INFO of the process at ENDPOINT; exit 0 when it is ready (a coordinator: a live node
    for every shard of an index version, whichever; a node: answering and not draining), 3
    otherwise. For container health checks and Kubernetes probes."""
    import json

    from coordinator.client import RetrievalClient
    from retriever.wire.security import CurveKeys

    with RetrievalClient(endpoint, keys=CurveKeys.load(keys) if keys else None, timeout=timeout) as client:
        info = client.info()
    typer.echo(json.dumps(info))
    if info.get("role") == "coordinator":
        # any version: once a new version rolled out, the one it started with may have no node left
        ready = any(version["ready"] for version in info.get("versions", {}).values())
    else:
        ready = not info.get("draining")
    if not ready:
        raise Unavailable(f"the {info.get('role', 'process')} at {endpoint} is not ready")


def _wait_for_index(index: Path, seconds: float) -> None:
    from retriever.files import wait_for_path

    if not 0 <= seconds <= 86400:
        raise InvalidInput(f"--wait-for-index must be between 0 and 86400 seconds, got {seconds}")
    if seconds and not index.exists():
        say(f"waiting up to {seconds:g} s for the index at {index}")
        wait_for_path(index, seconds)


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
    keep: bool = typer.Option(True, "--keep/--no-keep", help="Leave a keeper that restarts processes that exit or go silent."),
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
        keep=keep,
    )
    kept = f", kept running by pid {state['keeper']['pid']}" if keep else ""
    say(f"cluster up: {shards} shard(s) x {replicas} replica(s){kept}; state in {state_dir}/cluster.json")
    typer.echo(state["coordinator"]["endpoint"])


@cluster_app.command("down")
def cluster_down(state_dir: Path = typer.Option(..., "--state-dir")):
    """Stop every process of the cluster."""
    from chameleon.cluster import down

    pids = down(state_dir)
    typer.echo(f"stopped {len(pids)} process(es)")


@cluster_app.command("keep", hidden=True)
def cluster_keep(state_dir: Path = typer.Option(..., "--state-dir")):
    """Keep the cluster's processes running until SIGTERM (`cluster up` starts it, `cluster down` stops it)."""
    from chameleon.cluster import keep

    keep(state_dir)


@cluster_app.command("scale")
def cluster_scale(
    state_dir: Path | None = typer.Option(None, "--state-dir", help="A local cluster (`cluster up`)."),
    compose: Path | None = typer.Option(None, "--compose", help="Or a Compose deployment: its file (deploy/compose.yaml)."),
    project: str | None = typer.Option(None, "--project", "-p", help="With --compose: the project name, if not the file's directory's."),
    replicas: int | None = typer.Option(None, "--replicas", help="Nodes per shard from now on."),
    shards: int | None = typer.Option(None, "--shards", help="Shards from now on (the index is split again; searches go on)."),
):
    """Change the nodes per shard or the number of shards while the retrieval tier serves, on a
    local cluster or a Compose deployment; print what runs after."""
    if replicas is None and shards is None:
        raise InvalidInput("say --replicas N, --shards N or both")
    if (state_dir is None) == (compose is None):
        raise InvalidInput("say which deployment: --state-dir DIR (a local cluster) or --compose FILE")
    if compose is not None:
        from chameleon.compose import scale as scale_compose

        report = scale_compose(compose, replicas=replicas, shards=shards, project=project)
        typer.echo(
            f"{report['project']}: {report['nshards']} shard(s) x {report['replicas']} replica(s), {report['nodes_alive']} node(s) in rotation"
        )
        for service, count in report["services"].items():
            typer.echo(f"service {service}: {count} container(s)")
        say(f"what runs now: docker compose -p {report['project']} -f {compose} -f {report['overlay']} up -d")
        return
    from chameleon.cluster import scale

    state = scale(state_dir, replicas=replicas, shards=shards)
    typer.echo(f"cluster: {state['nshards']} shard(s) x {state['replicas']} replica(s)")
    for n in state["nodes"]:
        typer.echo(f"node shard {n['shard']} replica {n['replica']} {n['endpoint']} pid {n['pid']}")


@cluster_app.command("update")
def cluster_update(
    compose: Path = typer.Option(..., "--compose", help="A Compose deployment: its file (deploy/compose.yaml)."),
    version: str = typer.Option(..., "--version", help="The new version's name (lowercase letters, digits, '-')."),
    add: Path | None = typer.Option(None, "--add", help="A corpus (folder or .jsonl) whose documents the new version adds."),
    remove_doc: list[str] | None = typer.Option(None, "--remove-doc", help="A document the new version removes (repeatable)."),
    project: str | None = typer.Option(None, "--project", "-p", help="The project name, if not the file's directory's."),
):
    """Serve a new version of a Compose deployment's index while it serves: the current version
    with documents added and removed, written beside it, its nodes started, the servers switched,
    then the old version's nodes drained; print what runs after."""
    from chameleon.compose import update

    report = update(compose, version, add=add, remove_docs=tuple(remove_doc or ()), project=project)
    typer.echo(
        f"{report['project']}: index {report['version']} (was {report['previous']}), "
        f"{report['nshards']} shard(s) x {report['replicas']} replica(s), {report['nodes_alive']} node(s) in rotation"
    )
    for service, count in report["services"].items():
        typer.echo(f"service {service}: {count} container(s)")
    say(f"what runs now: docker compose -p {report['project']} -f {compose} -f {report['overlay']} up -d")


@cluster_app.command("status")
def cluster_status(state_dir: Path = typer.Option(..., "--state-dir")):
    """Processes and the coordinator's view of the nodes."""
    from chameleon.cluster import status

    report = status(state_dir)
    if report["keeper"] is not None:
        k = report["keeper"]
        typer.echo(f"keeper pid {k['pid']} {'running' if k['running'] else 'NOT RUNNING: nothing is restarted'}")
    c = report["coordinator"]
    typer.echo(f"coordinator {c['endpoint']} pid {c['pid']} {'running' if c['running'] else 'NOT RUNNING'}{_supervision(c)}")
    seen = {n["endpoint"]: n["alive"] for n in (report["view"] or {}).get("nodes", [])}
    for n in report["nodes"]:
        view = seen.get(n["endpoint"])
        state = "alive" if view else ("unknown" if view is None else "dead")
        typer.echo(
            f"node shard {n['shard']} replica {n['replica']} {n['endpoint']} pid {n['pid']} "
            f"{'running' if n['running'] else 'NOT RUNNING'}, coordinator sees it {state}{_supervision(n)}"
        )
    if report["view"] is None:
        raise Unavailable("the coordinator does not answer")


def _supervision(entry: dict) -> str:
    """What the keeper of a process did about it (``chameleon.supervisor``), if anything."""
    if entry.get("supervision") == "failed":
        return f"; FAILED, not restarted again: {entry['cause']}"
    if entry.get("restarts"):
        return f"; restarted {entry['restarts']} time(s) (last: {entry['cause']})"
    return ""
