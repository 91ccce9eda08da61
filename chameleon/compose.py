"""Scaling a Compose deployment of the appliance (``deploy/compose.yaml``) while it serves.

Compose scales a service, not a shard layout: replicas per shard are each shard service's
replica count, but another number of shards needs services that the file does not have. So the
scaler keeps an overlay beside the file, ``compose.scale.PROJECT.json``, that holds what runs
now: every shard service's replicas, plus the services of a layout the file lacks (a job that
writes the layout with ``chameleon index reshard`` and a service per shard, under the same network
alias the coordinator follows). ``docker compose -f compose.yaml -f THAT up -d`` brings back what
the scaler left. A re-shard runs in the order ``cluster.scale`` uses on one machine: the new
layout's nodes start beside the old ones, the coordinator switches once every new shard has a
live node, then the old layout's containers stop (they drain). Searches go on throughout.

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
from retriever.errors import InvalidInput, Timeout, Unavailable
from retriever.files import write_json_atomic

# Containers start slowly: an image's first start compiles the scan kernels before the node answers.
WAIT_S = 600.0


@dataclass(frozen=True)
class Layout:
    """The shard services of one layout of the index: ``services[i]`` serves shard ``i``."""

    nshards: int
    index: str  # the layout's directory, as the containers see it
    services: tuple[str, ...]
    generated: bool  # services the overlay adds (the file has none for this layout)


@dataclass(frozen=True)
class Deployment:
    """A Compose deployment of the appliance: its file, project, and the parts the scaler uses."""

    file: Path
    project: str
    config: dict  # ``docker compose config`` of the file alone
    base: Layout  # the layout the file's own shard services serve
    source_index: str  # the index every layout is a split of: what the server serves
    coordinator: str  # the coordinator's service
    coordinator_port: int

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
                servers.append(_flag(command, "--index", name))
        if len(shards) != 1 or len(coordinators) != 1 or len(servers) != 1:
            raise InvalidInput(
                f"{file} is not an appliance deployment the scaler knows: it needs one layout of shard services "
                f"(`node retrieval`), one coordinator service and one server (`serve --index`); it has "
                f"{len(shards)}, {len(coordinators)} and {len(servers)}"
            )
        (index, services), ((coordinator, command),) = next(iter(shards.items())), coordinators
        if sorted(services) != list(range(len(services))):
            raise InvalidInput(f"{file}: the shard services of {index} serve shards {sorted(services)}, not 0..{len(services) - 1}")
        base = Layout(len(services), index, tuple(services[s] for s in range(len(services))), generated=False)
        port = int(_flag(command, "--bind", coordinator).rsplit(":", 1)[1])
        return cls(file, config["name"], config, base, servers[0], coordinator, port)

    def layout(self, nshards: int) -> Layout:
        """The layout of ``nshards`` shards: the file's own, or services the overlay adds."""
        if nshards == self.base.nshards:
            return self.base
        index = str(PurePosixPath(self.base.index).parent / f"shards-{nshards}")
        return Layout(nshards, index, tuple(f"retrieval-{nshards}-{s}" for s in range(nshards)), generated=True)

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


def overlay(deployment: Deployment, replicas: dict[Layout, int]) -> dict:
    """The overlay that runs ``replicas[layout]`` containers per shard service of each layout
    (the file's own shard services not named run none)."""
    template = deployment.config["services"][deployment.base.services[0]]
    services = {name: {"deploy": {"replicas": 0}} for name in deployment.base.services}
    for layout, count in replicas.items():
        if not layout.generated:
            services.update({name: {"deploy": {"replicas": count}} for name in layout.services})
            continue
        job = f"layout-{layout.nshards}"
        writable = [
            {**v, "read_only": False} for v in template.get("volumes", []) if v.get("target") == str(PurePosixPath(layout.index).parent)
        ]
        if not writable:
            raise InvalidInput(f"{deployment.file}: no volume of {deployment.base.services[0]} holds {layout.index}")
        services[job] = {
            "image": template["image"],
            "command": ["index", "reshard", "--index", deployment.source_index, "--shards", str(layout.nshards), "--out", layout.index],
            "volumes": writable,
            "networks": list(template.get("networks", {})),
            "depends_on": template.get("depends_on", {}),
        }
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


def scale(
    file: str | os.PathLike, replicas: int | None = None, shards: int | None = None, project: str | None = None, wait: float = WAIT_S
) -> dict:
    """Change a running Compose deployment's replicas per shard and/or its number of shards while
    it serves; return what runs after (services and their containers, the coordinator's view)."""
    deployment = Deployment.read(file, project)
    info = deployment.probe()
    if not info.get("ready"):
        raise Unavailable(f"the coordinator of {deployment.project} is not serving yet: scale a deployment once it serves")
    running = deployment.running()
    now = deployment.layout(info["nshards"])
    replicas = min(running[name] for name in now.services) if replicas is None else replicas
    shards = now.nshards if shards is None else shards
    check_size(shards, replicas)
    target = deployment.layout(shards)
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
    running = deployment.running()
    return {
        "project": deployment.project,
        "overlay": str(deployment.overlay),
        "nshards": shards,
        "replicas": replicas,
        "services": {name: running[name] for name in target.services},
        "nodes_alive": wanted,
    }


def _apply(deployment: Deployment, replicas: dict[Layout, int]) -> None:
    """Write the overlay for ``replicas`` and bring the deployment to it (no container recreated)."""
    write_json_atomic(deployment.overlay, overlay(deployment, replicas))
    deployment.compose("up", "--detach", "--no-recreate", "--remove-orphans")


def _serves_whole(view: dict, shards: int, replicas: int) -> bool:
    """Whether a coordinator's INFO shows a layout of ``shards`` served with ``replicas`` live nodes each."""
    if not view["ready"] or view["nshards"] != shards:
        return False
    return sum(n["alive"] and n["fingerprint"] == view["fingerprint"] for n in view["nodes"]) == shards * replicas


def _wait(deployment: Deployment, condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition(deployment.probe()):
                return
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            raise Timeout(f"{deployment.project}: no {what} within {seconds:.0f} s")
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
