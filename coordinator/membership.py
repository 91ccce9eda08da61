"""Which retrieval nodes a coordinator talks to: sources it reads again while it serves.

A source is one of::

    tcp://HOST:PORT   one node at a fixed address
    dns://NAME:PORT   every address NAME resolves to: a Docker Compose service (or a network alias
                      several services share) or a Kubernetes headless Service, whose DNS answer
                      lists every replica running now
    dir://PATH        every node announcement in the directory PATH: a JSON file with the node's
                      ``endpoint``, which a node started with ``--ready-file PATH/NAME.json``
                      writes once it answers and removes when it stops (the local cluster's way)

A node is not configured with its shard: its INFO says which shard of which index layout it
serves, and the coordinator routes by that. So a node started anywhere joins the tier once a
source lists it (a new container behind the service name, a new announcement file), and leaves
when no source lists it any more. DNS and files are read on a thread of their own, every
``interval`` seconds: a slow resolver never stalls the routing loop.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from retriever.errors import InvalidInput

SCHEMES = ("tcp", "dns", "dir")
RESOLVE_INTERVAL = 1.0


@dataclass(frozen=True)
class NodeSource:
    """One source of node endpoints (see the module's docstring)."""

    spec: str

    def __post_init__(self):
        scheme = self.spec.partition("://")[0]
        if scheme not in SCHEMES or "://" not in self.spec:
            raise InvalidInput(f"a node source is tcp://HOST:PORT, dns://NAME:PORT or dir://PATH, got {self.spec!r}")
        if scheme != "dir":
            try:
                parts = urlsplit(self.spec)
                port = parts.port
            except ValueError as e:
                raise InvalidInput(f"{self.spec!r}: {e}") from None
            if not parts.hostname or port is None or parts.path not in ("", "/"):
                raise InvalidInput(f"{self.spec!r} needs a host and a port, e.g. {scheme}://retrieval:5555")
        elif not self.spec[len("dir://") :]:
            raise InvalidInput(f"{self.spec!r} names no directory")

    @property
    def dynamic(self) -> bool:
        """Whether what this source lists can change while the coordinator runs."""
        return not self.spec.startswith("tcp://")

    def endpoints(self) -> frozenset[str] | None:
        """The ZeroMQ endpoints this source lists now; None when that cannot be known now (a DNS
        server that does not answer), so that a resolver's hiccup does not empty the tier."""
        scheme, _, rest = self.spec.partition("://")
        if scheme == "tcp":
            return frozenset([self.spec])
        if scheme == "dir":
            return _announced(Path(rest))
        parts = urlsplit(self.spec)
        try:
            answers = socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            # No such name is an answer (a service scaled to zero has none); anything else is not.
            return frozenset() if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) else None
        return frozenset(_tcp_endpoint(address[4][0], parts.port) for address in answers)


def _tcp_endpoint(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def _announced(directory: Path) -> frozenset[str]:
    """The endpoints of the announcements in ``directory`` (files being replaced or unreadable are skipped)."""
    endpoints = set()
    for file in directory.glob("*.json"):
        try:
            endpoint = json.loads(file.read_text()).get("endpoint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(endpoint, str) and endpoint.startswith("tcp://"):
            endpoints.add(endpoint)
    return frozenset(endpoints)


class Membership:
    """The endpoints every source lists, kept current by a thread when a source can change.

    ``endpoints`` is replaced, never changed in place: a reader compares it by identity to learn
    that something changed.
    """

    def __init__(self, sources: list[str], interval: float = RESOLVE_INTERVAL):
        if not sources:
            raise InvalidInput("a coordinator needs at least one node source (tcp://, dns:// or dir://)")
        if not 0 < interval <= 3600:
            raise InvalidInput(f"the resolve interval must be between 0 and 3600 seconds, got {interval}")
        self.sources = [NodeSource(spec) for spec in sources]
        self.interval = interval
        self._listed: dict[NodeSource, frozenset[str]] = {}
        self.endpoints: frozenset[str] = frozenset()
        self._resolve()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Re-read the dynamic sources every ``interval`` seconds until :meth:`stop`."""
        if self._thread is None and any(source.dynamic for source in self.sources):
            self._thread = threading.Thread(target=self._follow, name="membership", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._resolve()

    def _resolve(self) -> None:
        for source in self.sources:
            listed = source.endpoints()
            if listed is not None:
                self._listed[source] = listed
        endpoints = frozenset().union(*self._listed.values())
        if endpoints != self.endpoints:
            self.endpoints = endpoints
