"""Local cluster launcher: retrieval nodes and a coordinator as background processes on loopback.

``up`` starts S x R retrieval nodes (sharding the index on the fly when it has another shard
count) and a coordinator, waits until the coordinator serves every node, and writes
``STATE/cluster.json`` (endpoints, pids, logs). The nodes announce themselves in ``STATE/nodes/``,
which the coordinator follows, so ``scale`` changes the replicas per shard or the number of shards
while the cluster serves. ``down`` stops them (SIGTERM, then SIGKILL after a grace period);
``status`` reports which processes live and what the coordinator sees. Every process is the same
``chameleon node ...`` command a multi-machine deployment runs.
``ClusterSearcher.open(..., embedded=True)`` runs the coordinator inside the searching process
instead (the same code, driven by the searcher's own calls), one network hop fewer per search.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chameleon.supervisor import Child, RestartPolicy, Supervisor
from coordinator.client import RetrievalClient
from coordinator.membership import RESOLVE_INTERVAL
from coordinator.router import ClusterConfig, Coordinator, InlineCoordinator
from retriever.coarse import CoarseQuantizer
from retriever.engines import engine_options
from retriever.errors import ChameleonError, InvalidInput, NotFound, Timeout
from retriever.files import write_json_atomic
from retriever.index import content_fingerprint, load_index, read_manifest, save_layout
from retriever.search import SearchResult
from retriever.vectors import as_query_matrix, prepare_vectors
from retriever.wire.security import CurveKeys

STATE_FILE = "cluster.json"
NODES_DIR = "nodes"  # the nodes' announcements, which the coordinators follow
START_TIMEOUT = 180.0
STOP_GRACE = 10.0
# How long a withdrawn node keeps serving before it is stopped: a coordinator re-reads the
# announcements every RESOLVE_INTERVAL and needs a heartbeat's answer to take a new node in.
WITHDRAW_S = 2 * RESOLVE_INTERVAL + 0.5


def _chameleon(*args) -> list[str]:
    return [sys.executable, "-m", "chameleon", *map(str, args)]


# The processes this one started to own (they die with it), by pid, until the keeper in this
# process takes them over and reads their exit status. Others are not held here: a Popen nobody
# holds is reaped by the subprocess module, not left a zombie.
_STARTED: dict[int, subprocess.Popen] = {}


def _spawn(command: list[str], log: Path, die_with_parent: bool = False) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    # The processes of a local cluster share the machine's cores: idle OpenMP workers must sleep, not
    # spin on a core that another node needs.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_term_when_parent_dies if die_with_parent and _PRCTL is not None else None,
        )
    if die_with_parent:
        _STARTED[process.pid] = process
    return process


# Linux: a child can ask for SIGTERM when its parent dies, so a killed server leaves no nodes behind.
_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _term_when_parent_dies() -> None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ready_file(state_dir: str | os.PathLike, name: str) -> Path:
    """Where the process ``name`` of a cluster says it is ready: a node's announcement, which the
    coordinators follow, or the coordinator's own file."""
    if name == "coordinator":
        return Path(state_dir) / "run" / "coordinator.json"
    return Path(state_dir) / NODES_DIR / f"{name}.json"


def _wait_ready(process: subprocess.Popen, ready_file: Path, log: Path, deadline: float) -> dict:
    while time.monotonic() < deadline:
        if ready_file.is_file():
            return json.loads(ready_file.read_text())
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise InvalidInput(f"{' '.join(process.args[2:5])} exited with status {process.returncode}:\n{tail}")
        time.sleep(0.05)
    raise Timeout(f"{' '.join(process.args[2:5])} was not ready within {START_TIMEOUT:.0f} s (log: {log})")


def _is_ours(pid: int) -> bool:
    """True when ``pid`` is alive and still one of our processes (pids get reused)."""
    try:
        return b"chameleon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_state(state_dir: str | os.PathLike) -> dict:
    path = Path(state_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no cluster is up in {state_dir} ({STATE_FILE} is missing)") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is corrupt: {e}") from None


def up(
    index_dir: str | os.PathLike,
    nshards: int,
    state_dir: str | os.PathLike,
    replicas: int = 1,
    engine: str = "numba",
    keys_dir: str | os.PathLike | None = None,
    timeout: float = 2.0,
    on_missing: str = "partial",
    die_with_parent: bool = False,
    threads: int | None = None,
    fpga_mode: str | None = None,
    xclbin: str | os.PathLike | None = None,
    keep: bool = False,
) -> dict:
    """Start the cluster and return its state (also written to ``STATE/cluster.json``).

    The nodes announce themselves in ``STATE/nodes/`` and the coordinator follows that directory
    (:mod:`coordinator.membership`), so :func:`scale` adds and removes nodes while it serves.
    With ``die_with_parent`` (Linux) the processes get SIGTERM when the calling process dies, for
    a cluster owned by one process (``chameleon serve``) rather than left running in the background.
    ``threads``: scan threads per node (default: this machine's cores shared among the nodes).
    ``fpga_mode``: with ``engine="fpga"``, ``emu`` or ``hw``; ``xclbin``: the bitstream for ``hw``
    (see ``chameleon node retrieval``).
    ``keep``: leave a keeper process beside the cluster that restarts what exits or goes silent
    (:class:`ClusterKeeper`); ``down`` stops it first.
    """
    state_dir = Path(state_dir).resolve()
    if (state_dir / STATE_FILE).is_file():
        state = read_state(state_dir)
        if _keeper_running(state) or any(_is_ours(p["pid"]) for p in [state["coordinator"], *state["nodes"]]):
            raise InvalidInput(f"a cluster is already up in {state_dir} (`chameleon cluster down --state-dir {state_dir}`)")
    check_size(nshards, replicas)
    keys = CurveKeys.load(keys_dir) if keys_dir is not None else None  # fail now, not in every child
    options = engine_options(engine, fpga_mode, xclbin)
    source = Path(index_dir).resolve()
    read_manifest(source)
    for stale in [*(state_dir / "run").glob("*.json"), *(state_dir / NODES_DIR).glob("*.json")]:
        stale.unlink()
    security = ["--keys", str(Path(keys_dir).resolve())] if keys_dir is not None else []
    node_flags = ["--scan-engine", engine, *(["--fpga-mode", options["mode"]] if "mode" in options else [])]
    node_flags += ["--xclbin", str(options["xclbin"])] if "xclbin" in options else []
    node_flags += ["--threads", str(threads or max(1, len(os.sched_getaffinity(0)) // (nshards * replicas)))]  # the cores we may use
    state = {
        "source_index": str(source),
        "index": None,
        "nshards": nshards,
        "replicas": replicas,
        "metric": read_manifest(source)["metric"],
        "keys": str(Path(keys_dir).resolve()) if keys_dir is not None else None,
        "state_dir": str(state_dir),
        "owner": os.getpid() if die_with_parent else None,  # nodes it starts die with it
        "node_flags": [*node_flags, *security],
        "coordinator": {},
        "nodes": [],
    }
    started: list[subprocess.Popen] = []
    try:
        state["index"] = str(_layout(state, nshards))
        nodes = [(shard, replica) for shard in range(nshards) for replica in range(replicas)]
        state["nodes"] = _start_nodes(state, Path(state["index"]), nodes, started)
        logs = state_dir / "logs"
        command = _chameleon(
            "node",
            "coordinator",
            "--index",
            state["index"],
            "--nodes",
            f"dir://{state_dir / NODES_DIR}",
            "--bind",
            "tcp://127.0.0.1:*",
            "--timeout",
            timeout,
            "--on-missing",
            on_missing,
            "--ready-file",
            _ready_file(state_dir, "coordinator"),
            *security,
        )
        coordinator = _spawn(command, logs / "coordinator.log", die_with_parent)
        started.append(coordinator)
        front = _wait_ready(coordinator, _ready_file(state_dir, "coordinator"), logs / "coordinator.log", time.monotonic() + START_TIMEOUT)
        command[command.index("--bind") + 1] = front["endpoint"]  # a restart takes the same endpoint: clients reconnect
        state["coordinator"] = {
            **front,
            "log": str(logs / "coordinator.log"),
            "timeout": timeout,
            "on_missing": on_missing,
            "command": list(map(str, command)),
        }
        with RetrievalClient(front["endpoint"], keys=keys) as client:
            _wait_serving(client, state["nodes"], time.monotonic() + START_TIMEOUT)
    except BaseException:
        for process in started:
            process.kill()
        raise
    write_json_atomic(state_dir / STATE_FILE, state)
    if keep:
        state = _start_keeper(state_dir)
    return state


def _start_keeper(state_dir: Path) -> dict:
    """Start the keeper of the cluster in ``state_dir`` and return the state once it keeps it."""
    log = state_dir / "logs" / "keeper.log"
    keeper = _spawn(_chameleon("cluster", "keep", "--state-dir", state_dir), log)
    deadline = time.monotonic() + START_TIMEOUT
    while (state := read_state(state_dir)).get("keeper", {}).get("pid") != keeper.pid:
        if keeper.poll() is not None or time.monotonic() > deadline:
            keeper.kill()
            raise InvalidInput(f"the cluster's keeper did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return state


def check_size(nshards: int, replicas: int) -> None:
    if not 1 <= nshards <= 256 or not 1 <= replicas <= 16:
        raise InvalidInput(f"shards must be in 1..256 and replicas in 1..16, got {nshards} and {replicas}")


def _layout(state: dict, nshards: int) -> Path:
    """The cluster's index split into ``nshards`` shards: the source itself, or a re-sharded copy in the state directory."""
    source = Path(state["source_index"])
    if len(read_manifest(source)["shards"]) == nshards:
        return source
    return save_layout(source, nshards, Path(state["state_dir"]) / f"index-{nshards}-shards")


def _start_nodes(state: dict, index_dir: Path, nodes: list[tuple[int, int]], started: list[subprocess.Popen]) -> list[dict]:
    """Start a node for each (shard, replica) of the layout in ``index_dir`` (each process also
    goes into ``started``) and wait until each has announced itself; their entries for the state."""
    state_dir = Path(state["state_dir"])
    nshards = len(read_manifest(index_dir)["shards"])
    entries, processes = [], []
    for shard, replica in nodes:
        name = f"node-{shard}-{replica}-of-{nshards}"
        log = state_dir / "logs" / f"{name}.log"
        announcement = _ready_file(state_dir, name)
        announcement.unlink(missing_ok=True)  # a dead node's, whose name this one takes over
        command = _chameleon(
            "node", "retrieval", "--index", index_dir, "--shard", shard, "--bind", "tcp://127.0.0.1:*", "--ready-file", announcement
        )
        command = [*map(str, command), *state["node_flags"]]
        process = _spawn(command, log, die_with_parent=state.get("owner") == os.getpid())
        started.append(process)
        processes.append(process)
        entries.append({"shard": shard, "replica": replica, "nshards": nshards, "name": name, "log": str(log), "command": command})
    deadline = time.monotonic() + START_TIMEOUT
    for entry, process in zip(entries, processes):
        entry.update(_wait_ready(process, _ready_file(state_dir, entry["name"]), Path(entry["log"]), deadline))
    return entries


def _serves_every_node(info: dict) -> bool:
    """Whether a coordinator's INFO shows every listed node alive and a layout with every shard."""
    return info["ready"] and all(n["alive"] for n in info["nodes"] if n["listed"])


def _wait_serving(client: RetrievalClient, nodes: list[dict], deadline: float) -> None:
    """Wait until the coordinator sees each of ``nodes`` alive and serves their layout with a live
    node for every shard."""
    wanted = {n["endpoint"] for n in nodes}
    while time.monotonic() < deadline:
        info = client.info(timeout=2.0)
        alive = {n["endpoint"] for n in info["nodes"] if n["alive"]}
        layouts = {n["fingerprint"] for n in info["nodes"] if n["endpoint"] in wanted}
        if wanted <= alive and info["ready"] and layouts == {info["fingerprint"]}:
            return
        time.sleep(0.02)
    raise Timeout("the coordinator did not see every node alive in time")


def scale(state_dir: str | os.PathLike, replicas: int | None = None, shards: int | None = None) -> dict:
    """Change the running cluster's replicas per shard and/or its number of shards while it
    serves, and return its new state.

    More replicas: new nodes start, announce themselves, and the coordinators take them into
    rotation. Fewer: the surplus nodes withdraw their announcements, then drain (SIGTERM) once the
    coordinators had time to send elsewhere. Another shard count: the index is split again (same
    vectors, another layout), a whole set of nodes for it starts, the coordinators switch to it
    once every shard has a live node, then the old layout's nodes withdraw and drain. Searches go
    on throughout; none fails while a replica of each shard remains. Nodes whose process died are
    replaced.
    """
    state = read_state(state_dir)
    replicas = state["replicas"] if replicas is None else replicas
    shards = state["nshards"] if shards is None else shards
    check_size(shards, replicas)
    keys = CurveKeys.load(state["keys"]) if state.get("keys") else None
    started: list[subprocess.Popen] = []
    try:
        if shards != state["nshards"]:
            index = _layout(state, shards)
            fresh = _start_nodes(state, index, [(s, r) for s in range(shards) for r in range(replicas)], started)
            leaving, kept = state["nodes"], fresh
            state["index"] = str(index)
        else:
            # a node whose process died is replaced, as if the cluster had one replica fewer (under a
            # keeper, only one it gave up on: it restarts the others itself)
            kept_alive = _keeper_running(state)
            dead = [n for n in state["nodes"] if not _is_ours(n["pid"]) and (not kept_alive or n.get("supervision") == "failed")]
            fresh, kept, leaving = [], [], dead
            for shard in range(shards):
                ours = sorted((n for n in state["nodes"] if n["shard"] == shard and n not in leaving), key=lambda n: n["replica"])
                kept += ours[:replicas]
                leaving += ours[replicas:]
                taken = {n["replica"] for n in ours}
                wanted = [r for r in range(len(ours) + replicas) if r not in taken][: max(0, replicas - len(ours))]
                fresh += _start_nodes(state, Path(state["index"]), [(shard, r) for r in wanted], started)
            kept += fresh
        with RetrievalClient(state["coordinator"]["endpoint"], keys=keys) as client:
            _wait_serving(client, kept, time.monotonic() + START_TIMEOUT)
    except BaseException:
        for process in started:
            process.kill()
        raise
    with _state_locked(state_dir) as current:  # a keeper may have restarted some of the kept nodes meanwhile
        now = {n["name"]: n for n in current["nodes"]}
        started_here = {n["name"] for n in fresh}
        nodes = [n if n["name"] in started_here else now.get(n["name"], n) for n in kept]
        current.update(
            index=state["index"], nshards=shards, replicas=replicas, nodes=sorted(nodes, key=lambda n: (n["shard"], n["replica"]))
        )
    _retire(state_dir, leaving)
    return current


def _retire(state_dir: str | os.PathLike, nodes: list[dict]) -> None:
    """Withdraw ``nodes``' announcements, give every coordinator following them time to notice,
    then stop them (SIGTERM: they answer what they hold and exit)."""
    for node in nodes:
        _ready_file(state_dir, node["name"]).unlink(missing_ok=True)
    if nodes:
        time.sleep(WITHDRAW_S)
    _stop([n["pid"] for n in nodes if _is_ours(n["pid"])])


def _stop(pids: list[int]) -> None:
    """SIGTERM ``pids``, SIGKILL what outlives the grace."""
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and any(_is_ours(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)


def cluster_config(state: dict) -> ClusterConfig:
    """What a coordinator of the cluster in ``state`` serves, following its nodes' announcements."""
    return ClusterConfig.of_index(state["index"], [f"dir://{Path(state['state_dir']) / NODES_DIR}"])


def _embedded_coordinator(state: dict, keys: CurveKeys | None) -> Coordinator:
    """A coordinator for the nodes of ``state``, with the options of its coordinator process."""
    options = {name: state["coordinator"][name] for name in ("timeout", "on_missing") if name in state["coordinator"]}
    return Coordinator(cluster_config(state), keys=keys, **options)


def down(state_dir: str | os.PathLike) -> list[int]:
    """SIGTERM every process of the cluster (its keeper first, then the coordinator), SIGKILL what
    outlives the grace."""
    state = read_state(state_dir)
    if _keeper_running(state):
        _stop([state["keeper"]["pid"]])
        state = read_state(state_dir)  # with what it restarted last
    pids = [p["pid"] for p in [state["coordinator"], *state["nodes"]] if _is_ours(p["pid"])]
    _stop(pids)
    (Path(state_dir) / STATE_FILE).unlink()
    return pids


def keep(state_dir: str | os.PathLike) -> None:
    """Keep the processes of the cluster in ``state_dir`` running until SIGTERM or SIGINT (the
    keeper process ``cluster up`` leaves beside the cluster; ``down`` stops it first)."""
    stopping = []
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: stopping.append(True))  # a plain list: safe in a handler
    keeper = ClusterKeeper(state_dir).start()
    with _state_locked(state_dir) as state:
        state["keeper"] = {"pid": os.getpid(), "log": str(Path(state_dir) / "logs" / "keeper.log")}
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        keeper.stop()


def _keeper_running(state: dict) -> bool:
    return "keeper" in state and _is_ours(state["keeper"]["pid"])


def status(state_dir: str | os.PathLike) -> dict:
    """Which processes live, and the coordinator's view of the nodes (None if it does not answer)."""
    state = read_state(state_dir)
    keys = CurveKeys.load(state["keys"]) if state.get("keys") else None
    try:
        with RetrievalClient(state["coordinator"]["endpoint"], keys=keys, timeout=2.0) as client:
            view = client.info()
    except ChameleonError:
        view = None
    return {
        "keeper": {**state["keeper"], "running": _keeper_running(state)} if "keeper" in state else None,
        "coordinator": {**state["coordinator"], "running": _is_ours(state["coordinator"]["pid"])},
        "nodes": [{**n, "running": _is_ours(n["pid"])} for n in state["nodes"]],
        "view": view,
    }


class ClusterKeeper:
    """The processes of the local cluster in ``state_dir`` kept running (:mod:`chameleon.supervisor`):
    one that exits, or that the coordinator stops hearing, is started again with the same command;
    a node comes back through the same path as any node (its announcement, its shard and index
    version checked), the coordinator on the same endpoint, so its clients reconnect. Each change
    is written to ``STATE/cluster.json`` (pids, endpoints, restarts, why a process failed), and the
    nodes that :func:`scale` adds or retires are followed from there.

    ``chameleon serve`` keeps the cluster it starts in its own process; ``chameleon cluster up``
    leaves a keeper process (``cluster keep``) beside the cluster, which ``down`` stops first.
    Processes another process started are watched by pid: that they ended is known, not how."""

    def __init__(self, state_dir: str | os.PathLike, policy: RestartPolicy = RestartPolicy()):
        self.state_dir = Path(state_dir)
        self.state = read_state(state_dir)
        self._keys = CurveKeys.load(self.state["keys"]) if self.state.get("keys") else None
        self._view: RetrievalClient | None = None  # made and used on the supervisor's thread
        self.supervisor = Supervisor(
            [self._child(self.state["coordinator"]), *map(self._child, self.state["nodes"])],
            self._spawn,
            self._changed,
            self._unheard,
            policy,
        )

    def start(self) -> ClusterKeeper:
        self.supervisor.start()
        return self

    def stop(self) -> None:
        """Restart nothing from now on; the processes go on until ``down``."""
        self.supervisor.stop()
        if self._view is not None:
            self._view.close()

    def failed(self) -> list[str]:
        return self.supervisor.failed()

    def _child(self, entry: dict) -> Child:
        name = entry.get("name", "coordinator")
        tier, shard = ("coordinator", None) if name == "coordinator" else ("retrieval", entry["shard"])
        process = _STARTED.pop(entry["pid"], None) or _Adopted(entry["pid"])
        return Child(name, tier, shard, entry["command"], Path(entry["log"]), _ready_file(self.state_dir, name), process, state="running")

    def _spawn(self, child: Child) -> subprocess.Popen:
        # Under serve, PR_SET_PDEATHSIG fires when the supervisor's thread ends, not the process:
        # it ends only with stop(), when the server stops its tier anyway.
        process = _spawn(child.command, child.log, die_with_parent=self.state.get("owner") == os.getpid())
        _STARTED.pop(process.pid, None)  # this keeper holds it
        return process

    def _changed(self, child: Child) -> None:
        with _state_locked(self.state_dir) as state:
            entry = _entry(state, child.name)
            if entry is None:
                return  # retired by scale meanwhile
            entry.update(pid=child.process.pid, restarts=child.restarts, supervision=child.state, cause=child.cause)
            if child.ready:
                entry["endpoint"] = child.ready["endpoint"]
        self.state = state

    def _unheard(self) -> set[str]:
        """Once a second, on the supervisor's thread: the nodes :func:`scale` changed, then the
        processes the tier does not hear: the coordinator if it does not answer, else the nodes it
        does not see alive."""
        self._follow_scale()
        if self._view is None:
            self._view = RetrievalClient(self.state["coordinator"]["endpoint"], keys=self._keys, timeout=1.0)
        try:
            info = self._view.info()
        except ChameleonError:
            return {"coordinator"}
        alive = {n["endpoint"] for n in info["nodes"] if n["alive"]}
        return {n["name"] for n in self.state["nodes"] if n["endpoint"] not in alive}

    def _follow_scale(self) -> None:
        """Take the nodes ``scale`` started under supervision and let go of those it retired (or
        replaced: another pid under the same name)."""
        self.state = read_state(self.state_dir)
        listed = {n["name"]: n for n in self.state["nodes"]}
        for child in list(self.supervisor.children.values()):
            entry = listed.get(child.name)
            if child.tier == "retrieval" and (entry is None or entry["pid"] != child.process.pid):
                self.supervisor.remove(child.name)
        for name, entry in listed.items():
            if name not in self.supervisor.children:
                self.supervisor.add(self._child(entry))


@dataclass
class _Adopted:
    """A process of the cluster that another process started: a keeper sees that it ended, not how."""

    pid: int

    def poll(self) -> int | str | None:
        return None if _is_ours(self.pid) else "exited (its exit status went to the process that started it)"

    def kill(self) -> None:
        if _is_ours(self.pid):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        while _is_ours(self.pid):
            time.sleep(0.05)


def _entry(state: dict, name: str) -> dict | None:
    if name == "coordinator":
        return state["coordinator"]
    return next((n for n in state["nodes"] if n["name"] == name), None)


@contextlib.contextmanager
def _state_locked(state_dir: str | os.PathLike) -> Iterator[dict]:
    """``cluster.json``, read and then written back under an exclusive lock: a keeper and ``scale``
    both change it."""
    with open(Path(state_dir) / "cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(state_dir)
        yield state
        write_json_atomic(Path(state_dir) / STATE_FILE, state)


@dataclass
class ClusterSearcher:
    """Search through a running retrieval tier: coarse search here, everything else in the tier.
    ``index_dir``: the index (any layout of the version the tier serves) the coarse search uses."""

    index_dir: Path
    quantizer: CoarseQuantizer
    client: RetrievalClient | InlineCoordinator
    content: str  # the version of index_dir: every search names it, so the tier answers from that version's nodes alone

    @classmethod
    def connect(
        cls,
        coordinator: str,
        index_dir: str | os.PathLike,
        keys: CurveKeys | None = None,
        timeout: float = 30.0,
        coordinator_timeout: float = 2.0,
    ) -> ClusterSearcher:
        """Search through the coordinator at ``coordinator``, with the coarse search of ``index_dir``.
        ``coordinator_timeout``: its per-shard timeout. It answers within that, failing over once,
        so a search unanswered for twice as long was lost (it restarted) and is sent again."""
        index = load_index(index_dir, shard=0)
        quantizer = CoarseQuantizer(index.centroids, index.params.metric)
        client = RetrievalClient(coordinator, keys=keys, timeout=timeout, resend_after=2 * coordinator_timeout + 1.0)
        return cls(Path(index_dir), quantizer, client, content_fingerprint(read_manifest(index_dir)))

    @classmethod
    def open(cls, state_dir: str | os.PathLike, timeout: float = 30.0, embedded: bool = False) -> ClusterSearcher:
        """Search through the cluster in ``state_dir``. With ``embedded``, through a coordinator in
        this process that this searcher's calls drive on their own thread (:class:`InlineCoordinator`),
        talking to the nodes itself: one hop fewer than through the coordinator process, whose place
        it takes for this searcher. ``timeout``: seconds a search waits for its answer."""
        state = read_state(state_dir)
        keys = CurveKeys.load(state["keys"]) if state.get("keys") else None
        if not embedded:
            return cls.connect(state["coordinator"]["endpoint"], state["index"], keys, timeout, state["coordinator"]["timeout"])
        index = load_index(state["index"], shard=0)
        client = InlineCoordinator(_embedded_coordinator(state, keys), timeout=timeout)
        content = content_fingerprint(read_manifest(state["index"]))
        searcher = cls(Path(state["index"]), CoarseQuantizer(index.centroids, index.params.metric), client, content)
        try:
            # A node is out of rotation until it answers the first heartbeat; one silent for as long as
            # a coordinator waits for a node stays out (partial answers), as with the process.
            deadline = time.monotonic() + client.coordinator.silence_limit
            while time.monotonic() < deadline and not _serves_every_node(client.info()):
                time.sleep(0.01)
        except BaseException:
            searcher.close()
            raise
        return searcher

    def close(self) -> None:
        self.client.close()

    def search(self, queries, k: int, nprobe: int) -> SearchResult:
        return self.scan(*self._coarse(queries, nprobe), k)

    def submit(self, queries, k: int, nprobe: int) -> Callable[[], SearchResult]:
        """Start a search (coarse search here, then the request leaves) and return a function that
        waits for its result; a shard missing from a partial answer leaves ids -1."""
        rid = self.client.send_search(*self._coarse(queries, nprobe), k, content=self.content)
        return lambda: self.client.search_result(rid)

    def _coarse(self, queries, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The prepared queries and the lists each probes: the part of a search done here."""
        queries = prepare_vectors(as_query_matrix(queries, self.quantizer.dim), self.quantizer.metric)
        return queries, self.quantizer.search(queries, nprobe)[0]

    def scan(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> SearchResult:
        """The top-k of prepared ``queries`` through the tier."""
        return self.client.search(queries, list_ids, k, content=self.content)

    def scan_staged(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int) -> TierStagedScan:
        """``scan`` with an early answer from the tier after the first ``early`` lists (the
        interface of ``retriever.search.StagedScan``)."""
        return TierStagedScan(self.client, self.client.send_search(queries, list_ids, k, early, self.content))

    def serves(self, index_dir: str | os.PathLike) -> bool:
        """True when the tier serves the same vectors as ``index_dir`` (whatever its sharding)."""
        return self.content == content_fingerprint(read_manifest(index_dir))


@dataclass
class TierStagedScan:
    """A SEARCH with ``early`` in flight: :meth:`early` waits for the tier's early answer (every
    shard's top-k over its first lists, merged), :meth:`final` for the whole answer."""

    client: RetrievalClient | InlineCoordinator
    rid: int
    _early: SearchResult | None = None

    def early(self) -> SearchResult:
        if self._early is None:
            self._early = self.client.search_result(self.rid, early=True)
        return self._early

    def final(self) -> SearchResult:
        return self.client.search_result(self.rid)


def search_in_batches(search, queries: np.ndarray, k: int, nprobe: int, batch: int = 1024) -> tuple[np.ndarray, ...]:
    """(distances, ids, partial per query) of ``search(queries, k, nprobe) -> SearchResult`` over batches."""
    parts = [search(queries[start : start + batch], k, nprobe) for start in range(0, len(queries), batch)]
    distances = np.concatenate([p.distances for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    partial = np.concatenate([np.full(len(p.ids), p.partial) for p in parts])
    return distances, ids, partial
