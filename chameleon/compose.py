"""Scaling a Compose deployment of the appliance (``deploy/compose.yaml``) while it serves, and
rolling out a new version of its index.

Compose scales a service, not a shard layout: replicas per shard are each shard service's
replica count, but another number of shards, or another index version, needs services that the
file does not have. So the scaler keeps an overlay beside the file, ``compose.scale.PROJECT.json``,
that holds what runs now: every shard service's replicas, plus the services of a layout the file
lacks (a job that writes the layout with ``chameleon index reshard`` and a service per shard, under
the same network alias the coordinator follows). ``docker compose -f compose.yaml -f THAT up -d``
brings back what the scaler left. A re-shard runs in the order ``cluster.scale`` uses on one
machine: the new layout's nodes start beside the old ones, the coordinator switches once every
new shard has a live node, then the old layout's containers stop (they drain). An update
(``update``) runs the same way across versions: a job writes the new version beside the current
one (``versions/NAME`` on the data volume: a copy with documents added and removed) and moves the
``current`` link, its nodes start beside the old version's, the servers (``--watch-index``) switch
once the coordinator serves it whole, then the old version's nodes drain. Searches go on throughout.

The deployment is read through ``docker compose config`` (the merged, resolved model), so this
needs no YAML parser and follows whatever the file's variables and anchors say.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from chameleon.cluster import check_size
from chameleon.versions import check_name
from retriever.errors import InvalidInput, Timeout, Unavailable
from retriever.files import write_json_atomic

# Containers start slowly: an image's first start compiles the scan kernels before the node answers.
WAIT_S = 600.0
UPDATE_MOUNT = "/var/lib/chameleon/update"  # where a version's job reads the documents it adds


@dataclass(frozen=True)
class Layout:
    """The shard services of one layout of one index version: ``services[i]`` serves shard ``i``."""

    version: str  # its directory's name under versions/
    nshards: int
    index: str  # the layout's directory, as the containers see it
    services: tuple[str, ...]
    generated: bool  # services the overlay adds (the file has none for this layout)


@dataclass(frozen=True)
class VersionWrite:
    """A new index version that a job writes: a copy of ``base`` with the documents of ``add`` (a
    corpus file or folder on this host) added and ``remove_docs`` removed, split into ``shards``."""

    version: str
    base: str
    shards: int  # the layout its nodes serve
    add: Path | None = None
    remove_docs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Deployment:
    """A Compose deployment of the appliance: its file, project, and the parts the scaler uses."""

    file: Path
    project: str
    config: dict  # ``docker compose config`` of the file alone
    base: Layout  # the layout the file's own shard services serve
    source_index: str  # what the server serves: the passage index in the link to the current version
    coordinator: str  # the coordinator's service
    coordinator_port: int
    server: str  # the server's service

    @property
    def versions(self) -> PurePosixPath:
        """The directory of the index versions, as the containers see it."""
        return PurePosixPath(self.base.index).parent.parent

    @property
    def current_link(self) -> PurePosixPath:
        return PurePosixPath(self.source_index).parent

    @property
    def overlay(self) -> Path:
        return self.file.parent / f"compose.scale.{self.project}.json"

    @classmethod
    def read(cls, file: str | os.PathLike, project: str | None = None) -> Deployment:
        file = Path(file).resolve()
        if not file.is_file():
            raise InvalidInput(f"{file}: no such Compose file")
        return cls.of_config(
            file, json.loads(_docker("compose", *(["-p", project] if project else []), "-f", file, "config", "--format", "json"))
        )

    @classmethod
    def of_config(cls, file: Path, config: dict) -> Deployment:
        """The deployment that ``config`` (``docker compose config --format json`` of ``file``) describes."""
        shards: dict[str, dict[int, str]] = {}
        coordinators, servers = [], []
        for name, service in config["services"].items():
            command = [str(part) for part in service.get("command") or []]
            if command[:2] == ["node", "retrieval"]:
                shards.setdefault(_flag(command, "--index", name), {})[int(_flag(command, "--shard", name))] = name
            elif command[:2] == ["node", "coordinator"]:
                coordinators.append((name, command))
            elif command[:1] == ["serve"]:
                servers.append((name, _flag(command, "--index", name)))
        if len(shards) != 1 or len(coordinators) != 1 or len(servers) != 1:
            raise InvalidInput(
                f"{file} is not an appliance deployment the scaler knows: it needs one layout of shard services "
                f"(`node retrieval`), one coordinator service and one server (`serve --index`); it has "
                f"{len(shards)}, {len(coordinators)} and {len(servers)}"
            )
        (index, services), ((coordinator, command),) = next(iter(shards.items())), coordinators
        if sorted(services) != list(range(len(services))):
            raise InvalidInput(f"{file}: the shard services of {index} serve shards {sorted(services)}, not 0..{len(services) - 1}")
        version = PurePosixPath(index).parent
        if version.parent.name != "versions" or PurePosixPath(servers[0][1]).parent.name != "current":
            raise InvalidInput(
                f"{file}: the nodes serve {index} and the server {servers[0][1]}; the scaler needs the layout "
                f"of a version (DATA/versions/VERSION/shards-N) and the passage index of the current one (DATA/current/rag)"
            )
        base = Layout(version.name, len(services), index, tuple(services[s] for s in range(len(services))), generated=False)
        port = int(_flag(command, "--bind", coordinator).rsplit(":", 1)[1])
        return cls(file, config["name"], config, base, servers[0][1], coordinator, port, servers[0][0])

    def layout(self, nshards: int, version: str) -> Layout:
        """The layout of ``nshards`` shards of ``version``: the file's own, or services the overlay adds."""
        if (version, nshards) == (self.base.version, self.base.nshards):
            return self.base
        index = str(self.versions / version / f"shards-{nshards}")
        return Layout(version, nshards, index, tuple(f"retrieval-{version}-{nshards}-{s}" for s in range(nshards)), generated=True)

    def compose(self, *args: str) -> str:
        """``docker compose ARGS`` on the file and the overlay of what runs."""
        files = ["-f", str(self.file), *(["-f", str(self.overlay)] if self.overlay.is_file() else [])]
        return _docker("compose", "-p", self.project, *files, *args)

    def running(self) -> Counter:
        """Running containers per service of the project."""
        out = _docker(
            "ps", "--filter", f"label=com.docker.compose.project={self.project}", "--format", '{{.Label "com.docker.compose.service"}}'
        )
        return Counter(out.split())

    def probe(self) -> dict:
        """The coordinator's INFO (``chameleon node probe`` inside its container)."""
        probe = ["exec", "-T", self.coordinator, "chameleon", "node", "probe", f"tcp://127.0.0.1:{self.coordinator_port}"]
        result = subprocess.run(["docker", "compose", "-p", self.project, "-f", str(self.file), *probe], capture_output=True, text=True)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise Unavailable(f"the coordinator of {self.project} does not answer: {result.stderr.strip()[-500:]}") from None

    def current_version(self) -> str:
        """The version the ``current`` link names (read in the coordinator's container)."""
        target = self.compose("exec", "-T", self.coordinator, "readlink", str(self.current_link)).strip()
        return PurePosixPath(target).name

    def served_versions(self) -> list[str]:
        """The index version each running server container serves (its ``/readyz``)."""
        command = [str(part) for part in self.config["services"][self.server]["command"]]
        port = _flag(command, "--port", self.server) if "--port" in command else "8000"
        read = (
            "import json, urllib.error, urllib.request\n"
            "try:\n"
            f"    answer = urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=5)\n"
            "except urllib.error.HTTPError as not_ready:\n"
            "    answer = not_ready\n"
            "print(json.load(answer).get('index', {}).get('path', ''))"
        )
        served = []
        for replica in range(1, self.running()[self.server] + 1):
            path = self.compose("exec", "-T", "--index", str(replica), self.server, "python3", "-c", read).strip()
            served.append(PurePosixPath(path).parent.name)
        return served


def overlay(deployment: Deployment, replicas: dict[Layout, int], write: VersionWrite | None = None) -> dict:
    """The overlay that runs ``replicas[layout]`` containers per shard service of each layout
    (the file's own shard services not named run none), and, with ``write``, the job that writes
    that new version (the job of its layouts waits for it)."""
    template = deployment.config["services"][deployment.base.services[0]]
    data = str(deployment.versions.parent)
    writable = [{**v, "read_only": False} for v in template.get("volumes", []) if v.get("target") == data]
    if not writable:
        raise InvalidInput(f"{deployment.file}: no volume of {deployment.base.services[0]} is mounted at {data}")
    services = {name: {"deploy": {"replicas": 0}} for name in deployment.base.services}
    if write is not None:
        services[f"version-{write.version}"] = version_job(deployment, write, writable)
    for layout, count in replicas.items():
        if not layout.generated:
            services.update({name: {"deploy": {"replicas": count}} for name in layout.services})
            continue
        job = f"layout-{layout.version}-{layout.nshards}"
        version = str(deployment.versions / layout.version / "rag")
        services[job] = {
            "image": template["image"],
            "command": ["index", "reshard", "--index", version, "--shards", str(layout.nshards), "--out", layout.index],
            "volumes": writable,
            "networks": list(template.get("networks", {})),
            "depends_on": template.get("depends_on", {}),
        }
        if write is not None and write.version == layout.version:
            services[job]["depends_on"] = {f"version-{write.version}": {"condition": "service_completed_successfully", "required": True}}
        for shard, name in enumerate(layout.services):
            command = [str(part) for part in template["command"]]
            command[command.index("--index") + 1] = layout.index
            command[command.index("--shard") + 1] = str(shard)
            services[name] = {
                **template,
                "command": command,
                "depends_on": {job: {"condition": "service_started", "required": True}},
                "deploy": {**template.get("deploy", {}), "replicas": count},
            }
    return {"services": services}


def version_job(deployment: Deployment, write: VersionWrite, writable: list[dict]) -> dict:
    """A one-shot service that writes ``write.version`` with ``chameleon index version`` (a copy of
    the base, changed, verified, split into the layout served, then made ``current``). It runs the
    server's image, which holds the embedder that adding documents needs."""
    server = deployment.config["services"][deployment.server]
    volumes = [*writable, *(v for v in server.get("volumes", []) if v.get("target") != str(deployment.versions.parent))]
    command = ["index", "version", write.version, "--data", str(deployment.versions.parent), "--from", write.base]
    if write.add is not None:
        corpus = f"{UPDATE_MOUNT}/{write.add.name}"
        command += ["--add", corpus]
        volumes.append({"type": "bind", "source": str(write.add.resolve()), "target": corpus, "read_only": True})
    for doc in write.remove_docs:
        command += ["--remove-doc", doc]
    return {
        "image": server["image"],
        "command": [*command, "--shards", str(write.shards)],
        "volumes": volumes,
        "networks": list(server.get("networks", {})),
    }


def scale(
    file: str | os.PathLike, replicas: int | None = None, shards: int | None = None, project: str | None = None, wait: float = WAIT_S
) -> dict:
    """Change a running Compose deployment's replicas per shard and/or its number of shards while
    it serves; return what runs after (services and their containers, the coordinator's view)."""
    deployment = Deployment.read(file, project)
    info = deployment.probe()
    if not info.get("ready"):
        raise Unavailable(f"the coordinator of {deployment.project} is not serving the current version yet: scale it once it does")
    running = deployment.running()
    version = deployment.current_version()
    now = deployment.layout(info["nshards"], version)
    replicas = min(running[name] for name in now.services) if replicas is None else replicas
    shards = now.nshards if shards is None else shards
    check_size(shards, replicas)
    target = deployment.layout(shards, version)
    if target != now:
        # both layouts run until the coordinator serves the new one; then the old one drains
        _apply(deployment, {now: min(running[name] for name in now.services), target: replicas})
        # every new node in rotation, not one per shard: nodes still warming up slow the others down
        _wait(deployment, lambda view: _serves_whole(view, shards, replicas), wait, f"the coordinator serving {shards} shards x {replicas}")
        _apply(deployment, {now: 0, target: replicas})
    _apply(deployment, {target: replicas})
    wanted = shards * replicas
    _wait(
        deployment, lambda view: _serves_whole(view, shards, replicas) and len(view["nodes"]) == wanted, wait, f"{wanted} nodes in rotation"
    )
    return _report(deployment, target, replicas)


def update(
    file: str | os.PathLike,
    version: str,
    add: str | os.PathLike | None = None,
    remove_docs: tuple[str, ...] = (),
    project: str | None = None,
    wait: float = WAIT_S,
) -> dict:
    """Serve a new version of a running Compose deployment's index, named ``version``: the
    current one with the documents of the corpus ``add`` added and ``remove_docs`` removed (no
    training), in the order of the module's docstring; return what runs after."""
    check_name(version)
    if add is None and not remove_docs:
        raise InvalidInput("say what the new version changes: --add CORPUS and/or --remove-doc ID")
    if add is not None and not Path(add).exists():
        raise InvalidInput(f"{add}: no such corpus file or folder")
    deployment = Deployment.read(file, project)
    info = deployment.probe()
    if not info.get("ready"):
        raise Unavailable(f"the coordinator of {deployment.project} is not serving the current version yet: update it once it does")
    current = deployment.current_version()
    if version == current:
        raise InvalidInput(f"{version} is the version served now: name the new one")
    running = deployment.running()
    now = deployment.layout(info["nshards"], current)
    replicas = min(running[name] for name in now.services)
    target = deployment.layout(now.nshards, version)
    write = VersionWrite(version, current, now.nshards, Path(add) if add is not None else None, tuple(remove_docs))
    try:
        _apply(deployment, {now: replicas, target: replicas}, write)
    except Unavailable as e:
        # the job failed (`up` stops on it before the new nodes start, and `current` moves only at
        # the job's end): what ran before runs on, and the new version's services go
        said = deployment.compose("logs", "--no-color", "--tail", "5", f"version-{version}").strip()
        _apply(deployment, {now: replicas})
        raise InvalidInput(f"the update to {version} stopped and {current} serves on: {e}\n{said}") from None
    # the job moves `current`; the coordinator's own version follows it
    _wait(
        deployment,
        lambda view: view["content"] != info["content"] and _serves_whole(view, target.nshards, replicas),
        wait,
        f"the coordinator serving {version} whole",
    )
    _wait_until(lambda: set(deployment.served_versions()) == {version}, wait, f"{deployment.project}: not every server on {version}")
    _apply(deployment, {target: replicas})  # the old version's nodes drain
    wanted = target.nshards * replicas
    _wait(
        deployment,
        lambda view: _serves_whole(view, target.nshards, replicas) and len(view["nodes"]) == wanted,
        wait,
        f"{wanted} nodes of {version} alone in rotation",
    )
    return {**_report(deployment, target, replicas), "previous": current}


def _report(deployment: Deployment, layout: Layout, replicas: int) -> dict:
    running = deployment.running()
    return {
        "project": deployment.project,
        "overlay": str(deployment.overlay),
        "version": layout.version,
        "nshards": layout.nshards,
        "replicas": replicas,
        "services": {name: running[name] for name in layout.services},
        "nodes_alive": layout.nshards * replicas,
    }


def _apply(deployment: Deployment, replicas: dict[Layout, int], write: VersionWrite | None = None) -> None:
    """Write the overlay for ``replicas`` (and ``write``) and bring the deployment to it (no container recreated)."""
    write_json_atomic(deployment.overlay, overlay(deployment, replicas, write))
    deployment.compose("up", "--detach", "--no-recreate", "--remove-orphans")


def _serves_whole(view: dict, shards: int, replicas: int) -> bool:
    """Whether a coordinator's INFO shows a layout of ``shards`` served with ``replicas`` live nodes each."""
    if not view["ready"] or view["nshards"] != shards:
        return False
    return sum(n["alive"] and n["fingerprint"] == view["fingerprint"] for n in view["nodes"]) == shards * replicas


def _wait(deployment: Deployment, condition, seconds: float, what: str) -> None:
    """Until ``condition(the coordinator's INFO)``."""
    _wait_until(lambda: condition(deployment.probe()), seconds, f"{deployment.project}: no {what}")


def _wait_until(condition, seconds: float, what: str) -> None:
    """Until ``condition()``; what does not answer yet (Unavailable) counts as not yet."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            raise Timeout(f"{what} within {seconds:.0f} s")
        time.sleep(1.0)


def _flag(command: list[str], flag: str, service: str) -> str:
    if flag not in command[:-1]:
        raise InvalidInput(f"service {service}: its command has no {flag}: {' '.join(command)}")
    return command[command.index(flag) + 1]


def _docker(*args) -> str:
    if shutil.which("docker") is None:
        raise Unavailable("no docker command here: scaling a Compose deployment needs Docker and Compose v2 (docs/deployment.md)")
    result = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise Unavailable(f"docker {' '.join(map(str, args[:3]))} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result.stdout
