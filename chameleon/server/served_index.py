"""The passage index as the server serves it, and its retrieval tier: which version is served,
whether its tier answers, and reloading a changed index without a restart.

``reload`` opens the new version beside the one being served, its tier processes included,
switches searches to it between two searches, then stops the old one. Requests in flight go on; a
later retrieval of the same answer already searches the new version.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chameleon.rag.corpus import RagIndex
from chameleon.rag.pipeline import RagPipeline
from coordinator.client import RetrievalClient
from retriever.errors import ChameleonError
from retriever.index import content_fingerprint, read_manifest
from retriever.search import Retrieval

if TYPE_CHECKING:
    from chameleon.cluster import ClusterKeeper


@dataclass
class ServedIndex:
    """One version of the passage index as the server serves it: its passages, what searches them
    (a ``retriever.Searcher`` in this process, or a ``chameleon.cluster.ClusterSearcher``) and, with
    a tier, a client of its coordinator (readiness, metrics) and, when this server started the
    tier, the directory of its processes and what keeps them running."""

    rag_index: RagIndex
    retrieval: Retrieval
    tier: RetrievalClient | None = None
    state_dir: Path | None = None
    keeper: ClusterKeeper | None = None  # restarts the tier's processes that exit or go silent
    content: str = field(init=False)  # the vectors' content fingerprint, which a tier must serve

    def __post_init__(self):
        self.content = content_fingerprint(read_manifest(self.rag_index.path / "index"))

    def describe(self) -> dict:
        if self.tier is None:
            where = {"retrieval": "in-process"}
        else:
            where = {"retrieval": "tier", "coordinator": self.tier.endpoint, "state_dir": str(self.state_dir) if self.state_dir else None}
        return {
            "path": str(self.rag_index.path),
            "passages": len(self.rag_index.passages),
            "fingerprint": self.rag_index.fingerprint,
            **where,
        }

    def close(self, discard_copies: bool = False) -> list[int]:
        """Close the clients and stop the tier's processes (their pids); with ``discard_copies``,
        also delete the re-sharded copies of the index the tier made (a retired version's)."""
        if self.tier is None:
            return []
        from chameleon import cluster

        if self.keeper is not None:
            self.keeper.stop()  # nothing restarted while the tier stops
        self.retrieval.close()
        self.tier.close()
        if self.state_dir is None:
            return []  # a tier of others: it goes on serving
        stopped = cluster.down(self.state_dir)
        if discard_copies:
            for index_copy in self.state_dir.glob("index-*-shards"):
                shutil.rmtree(index_copy, ignore_errors=True)
        return stopped


class ReloadInProgress(ChameleonError):
    """A reload is already under way (the API answers 409)."""


class IndexServing:
    """The version being served (``served``) and ``reopen(rag_index)``, which serves another
    version the way the server started the first: its tier, or its in-process search."""

    def __init__(self, served: ServedIndex, reopen: Callable[[RagIndex], ServedIndex], metrics=None):
        self.served = served
        self._reopen = reopen
        self.metrics = metrics
        self._tier_lock = threading.Lock()  # the coordinator's client is not thread-safe
        self._reloading = threading.Lock()

    def tier_info(self) -> dict | None:
        """The coordinator's view of the nodes, None when retrieval is in process or it does not answer."""
        with self._tier_lock:
            if self.served.tier is None:
                return None
            try:
                return self.served.tier.info(timeout=1.0)
            except ChameleonError:
                return None

    def readiness(self) -> dict:
        """``ready`` plus why not: every shard has a live node when retrieval runs in a tier;
        ``index``: the version served."""
        index = {"index": self.served.describe()}
        if self.served.tier is None:
            return {"ready": True, "retrieval": "in-process", **index}
        failed = self.served.keeper.failed() if self.served.keeper is not None else []
        if failed:  # processes given up on: why, whether or not the rest still makes the tier whole
            index["failed"] = failed
        info = self.tier_info()
        if info is None:
            return {"ready": False, "retrieval": "tier", "reason": "the coordinator does not answer", **index}
        if info["content"] != self.served.content:
            reason = f"the retrieval tier serves index {info['content']}, not {self.served.content}"
            return {"ready": False, "retrieval": "tier", "reason": reason, **index}
        if not info["ready"]:
            live = {n["shard"] for n in info["nodes"] if n["alive"] and n["fingerprint"] == info["fingerprint"]}
            missing = sorted(set(range(info["nshards"])) - live) if info["nshards"] else "all"
            reason = "; ".join([f"no live node for shard(s) {missing}", *failed])
            return {"ready": False, "retrieval": "tier", "reason": reason, **index}
        alive = sum(n["alive"] for n in info["nodes"])
        return {"ready": True, "retrieval": "tier", "shards": info["nshards"], "nodes": alive, **index}

    def reload(self, pipeline: RagPipeline) -> dict:
        """Serve the passage index on disk, searched by ``pipeline``, if it is another version than the
        one served (see the module's docstring). Whatever fails before the switch leaves the served version as it was."""
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgress("a reload is already under way")
        outcome = "refused"
        try:
            started = time.perf_counter()
            current = self.served
            rag_index = RagIndex(current.rag_index.path, pipeline.embedder.fingerprint)
            if rag_index.fingerprint == current.rag_index.fingerprint:
                outcome = "unchanged"
                return {"reloaded": False, "index": current.describe(), "seconds": round(time.perf_counter() - started, 3)}
            fresh = self._reopen(rag_index)
            try:
                pipeline.swap_index(fresh.rag_index, fresh.retrieval)
            except BaseException:
                fresh.close(discard_copies=True)
                raise
            with self._tier_lock:
                self.served = fresh
            outcome = "reloaded"
            stopped = current.close(discard_copies=True)
            return {
                "reloaded": True,
                "index": fresh.describe(),
                "previous": current.describe(),
                "stopped_processes": len(stopped),
                "seconds": round(time.perf_counter() - started, 3),
            }
        finally:
            self._reloading.release()
            if self.metrics is not None:
                self.metrics.reloads.labels(outcome).inc()
