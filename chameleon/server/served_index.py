"""The passage index as the server serves it, and its retrieval tier: which version is served,
whether its tier answers, and reloading a changed index without a restart.

``reload`` opens the new version beside the one being served, its tier processes included,
switches searches to it between two searches, then stops the old one. Requests in flight go on; a
later retrieval of the same answer already searches the new version. With a tier of others (a
deployment's coordinators), the new version's nodes join that tier beside the old version's, and the
switch waits until every shard of the new version has a live node: each search names its version,
so the coordinators never answer it from the other version's nodes. ``watch`` reloads by itself
when the index on disk changes (a deployment points the server at a link to its current version).
"""

from __future__ import annotations

import logging
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
from retriever.errors import ChameleonError, Unavailable
from retriever.index import content_fingerprint, content_now, read_manifest
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

    def __init__(self, served: ServedIndex, reopen: Callable[[RagIndex], ServedIndex], metrics=None, source: Path | None = None):
        self.served = served
        self.source = source or served.rag_index.path  # where the index is read again: a link a deployment moves, or a directory
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
        """``ready`` plus why not: every shard of the served version has a live node when
        retrieval runs in a tier; ``index``: the version served."""
        index = {"index": self.served.describe()}
        if self.served.tier is None:
            return {"ready": True, "retrieval": "in-process", **index}
        failed = self.served.keeper.failed() if self.served.keeper is not None else []
        if failed:  # processes given up on: why, whether or not the rest still makes the tier whole
            index["failed"] = failed
        return {**tier_readiness(self.tier_info(), self.served.content, failed), "retrieval": "tier", **index}

    def reload(self, pipeline: RagPipeline) -> dict:
        """Serve the passage index on disk, searched by ``pipeline``, if it is another version than the
        one served (see the module's docstring). Whatever fails before the switch leaves the served version as it was."""
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgress("a reload is already under way")
        outcome = "refused"
        try:
            started = time.perf_counter()
            current = self.served
            rag_index = RagIndex(self.source, pipeline.embedder.fingerprint)
            if rag_index.fingerprint == current.rag_index.fingerprint:
                outcome = "unchanged"
                return {"reloaded": False, "index": current.describe(), "seconds": round(time.perf_counter() - started, 3)}
            fresh = self._reopen(rag_index)
            try:
                if fresh.tier is not None:
                    try:
                        info = fresh.tier.info(timeout=1.0)
                    except ChameleonError:
                        info = None
                    ready = tier_readiness(info, fresh.content)
                    if not ready["ready"]:
                        raise Unavailable(f"index {fresh.content} is not served yet: {ready['reason']}")
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

    def watch(self, pipeline: RagPipeline, interval: float, stop: threading.Event) -> threading.Thread:
        """Every ``interval`` s until ``stop``, reload when the index on disk holds another version.
        With a tier of others, only once that tier serves the new version whole (its nodes are
        started by the deployment); until then the served version goes on, and why is logged once."""
        log = logging.getLogger("chameleon.server")

        def waiting_for(content: str) -> str | None:
            if self.served.tier is None or self.served.state_dir is not None:
                return None  # in process, or a tier of its own: the reload starts what serves the new version
            return tier_readiness(self.tier_info(), content).get("reason")

        def run():
            said = refused = None  # refused: a version that does not open is not tried again
            while not stop.wait(interval):
                content = content_now(self.source / "index")
                if content in (None, self.served.content, refused):
                    continue
                try:
                    reason = waiting_for(content)
                    if reason is None:
                        outcome = self.reload(pipeline)
                        said = None
                        if outcome["reloaded"]:
                            index = outcome["index"]
                            log.info(
                                "now serving index %s (%d passages), in %.1f s", index["fingerprint"], index["passages"], outcome["seconds"]
                            )
                        continue
                except ReloadInProgress:
                    continue
                except Unavailable as e:  # its tier stopped serving it between the look and the reload
                    reason = str(e)
                except ChameleonError as e:
                    reason, refused = str(e), content
                if reason != said:
                    log.info("the index on disk changed to %s; not served yet: %s", content, reason)
                    said = reason

        thread = threading.Thread(target=run, name="index-watch", daemon=True)
        thread.start()
        return thread

    def stop_reloads(self) -> None:
        """Wait for a reload under way to end and refuse any later one: the server is stopping."""
        self._reloading.acquire()


def tier_readiness(info: dict | None, content: str, failed: list[str] = ()) -> dict:
    """``ready`` plus why not, from a coordinator's INFO (None: it does not answer), for searches
    of the index version ``content``: every shard of one of its layouts has a live node."""
    if info is None:
        return {"ready": False, "reason": "the coordinator does not answer"}
    version = info.get("versions", {}).get(content)
    if version is None:
        serves = sorted(info.get("versions", {})) or "none"
        return {"ready": False, "reason": "; ".join([f"the retrieval tier has no node of index {content} (it serves: {serves})", *failed])}
    if not version["ready"]:
        live = {n["shard"] for n in info["nodes"] if n["alive"] and n["fingerprint"] == version["fingerprint"]}
        missing = sorted(set(range(version["nshards"])) - live) if version["nshards"] else "all"
        return {"ready": False, "reason": "; ".join([f"no live node for shard(s) {missing}", *failed])}
    alive = sum(n["alive"] and n["content"] == content for n in info["nodes"])
    return {"ready": True, "shards": version["nshards"], "nodes": alive}
