"""A retrieval node: serves one shard of an IVF-PQ index over ZeroMQ.

One ROUTER socket answers the wire protocol (:mod:`retriever.wire.protocol`). The I/O thread
receives, validates and batches SEARCH requests and answers HEARTBEAT at once; a scan thread runs
the engine on one batch at a time (the Numba kernels release the GIL, so heartbeats are answered
while a batch is scanned). Requests that arrive while a batch is scanned form the next batch; an
idle node starts at once, or waits ``window`` seconds (whole milliseconds, never spinning) for
others to join. A small batch (at most :data:`INLINE_MAX_CODES` codes, about a millisecond) is
scanned on the I/O thread itself: two thread hand-offs would cost more than the scan, and a
heartbeat waits a millisecond at most. A SEARCH with ``early`` is answered twice: after its
first ``early`` lists, then whole (speculative prefill starts on the first). Any malformed request
gets an ERROR reply; the node never dies of one. On SIGTERM it stops taking searches (answering
``shutting_down`` so a coordinator fails over), finishes what it holds, replies, and exits.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import zmq

from retriever.engines import make_scan_engine
from retriever.errors import InvalidInput
from retriever.index import content_fingerprint, index_fingerprint, load_index, read_manifest
from retriever.search import merge_topk, split_probes
from retriever.wire import protocol
from retriever.wire.protocol import Message, ProtocolError
from retriever.wire.security import CurveKeys
from retriever.wire.transport import bind_router, receive_all

DEFAULT_WINDOW = 0.0
MAX_BATCH_QUERIES = 4096
MAX_PENDING_QUERIES = 65536
POLL_MS = 50
# Batches that scan at most this many codes (~1.5 ms) run on the I/O thread itself.
INLINE_MAX_CODES = 200_000
_BATCH_DONE = b""


@dataclass
class _Request:
    envelope: list
    rid: int
    queries: np.ndarray
    list_ids: np.ndarray
    k: int
    early: int | None  # answer early after this many lists (the SEARCH's ``early``)


class RetrievalNode:
    def __init__(
        self,
        index_dir: str | os.PathLike,
        shard: int,
        engine: str = "numba",
        window: float = DEFAULT_WINDOW,
        keys: CurveKeys | None = None,
        threads: int | None = None,
        engine_options: dict | None = None,
    ):
        manifest = read_manifest(index_dir)
        self.index = load_index(index_dir, shard=shard)
        self.engine = make_scan_engine(engine, self.index, **(engine_options or {}))
        self.engine.warm_up()
        self.window = window
        self.keys = keys
        self.threads = threads
        self.info = {
            "role": "retrieval",
            "shard": shard,
            "nshards": len(manifest["shards"]),
            "fingerprint": index_fingerprint(manifest),
            "content": content_fingerprint(manifest),
            "engine": engine,
            "metric": self.index.params.metric,
            "dim": self.index.params.dim,
            "nlist": self.index.params.nlist,
            "ntotal": self.index.ntotal,
            "pid": os.getpid(),
        }
        self.endpoint: str | None = None
        # A plain flag, not a threading.Event: drain() runs as a SIGTERM handler, and a second
        # SIGTERM landing inside Event.set() would wait forever on the lock the first one holds
        # (a killed parent sends one per thread it loses, through PR_SET_PDEATHSIG).
        self._draining = False
        self._ready_file: str | os.PathLike | None = None
        self._served_batches = 0
        self._served_queries = 0

    def drain(self, *_signal_args) -> None:
        """Stop taking searches; :meth:`serve` returns once the work it holds is answered. The
        ready file goes at once: a coordinator that follows its directory stops sending here."""
        self._draining = True
        self._withdraw()

    def _withdraw(self) -> None:
        if self._ready_file is not None:
            Path(self._ready_file).unlink(missing_ok=True)

    def serve(self, bind: str, ready_file: str | os.PathLike | None = None, stop: threading.Event | None = None) -> None:
        """Serve until drained (SIGTERM, :meth:`drain`) or ``stop`` is set. ``ready_file`` gets
        ``{endpoint, pid}`` once the node answers and is removed when it stops taking searches:
        an announcement that a coordinator's ``dir://`` source reads (:mod:`coordinator.membership`)."""
        self._ready_file = ready_file
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.drain)
        self._use_threads()  # small batches are scanned on this thread
        context = zmq.Context()
        router, authenticator, self.endpoint = bind_router(context, bind, self.keys, ready_file)
        replies = context.socket(zmq.PAIR)
        doorbell = f"inproc://node-replies-{id(self)}"
        replies.bind(doorbell)
        batches: queue.Queue = queue.Queue()
        scanner = threading.Thread(target=self._scan_loop, args=(context, doorbell, batches), daemon=True)
        scanner.start()
        try:
            self._loop(router, replies, batches, stop or threading.Event())
        finally:
            self._withdraw()
            batches.put(None)
            scanner.join(timeout=5)
            router.close()
            replies.close()
            if authenticator:
                authenticator.stop()
            context.term()

    def _loop(self, router, replies, batches, stop) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        pending: list[_Request] = []
        pending_since = 0.0
        busy = 0
        while not stop.is_set():
            if self._draining and not pending and not busy:
                return
            timeout = POLL_MS
            if pending and not busy:  # rounded up: spinning here would take a core from the other processes
                timeout = max(0, math.ceil((pending_since + self.window - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout))
            if replies in events:
                for frames in receive_all(replies):
                    if len(frames) == 1 and frames[0].bytes == _BATCH_DONE:
                        busy -= 1
                    else:
                        router.send_multipart(frames, copy=False)
            if router in events:
                for frames in receive_all(router):
                    request = self._handle(router, frames, sum(r.queries.shape[0] for r in pending))
                    if request is not None:
                        if not pending:
                            pending_since = time.monotonic()
                        pending.append(request)
            if pending and not busy and time.monotonic() >= pending_since + self.window:
                batch, pending = _take_batch(pending)
                pending_since = time.monotonic()
                if sum(self.engine.codes_to_scan(r.list_ids) for r in batch) <= INLINE_MAX_CODES:
                    self._scan(router, batch)  # cheaper than two thread hand-offs; heartbeats wait ~1 ms at most
                else:
                    busy += 1
                    batches.put(batch)

    def _handle(self, router, frames, pending_queries: int) -> _Request | None:
        """Answer what can be answered at once; return a validated SEARCH to batch."""
        envelope, body = frames[:1], frames[1:]
        rid = 0
        try:
            message = protocol.decode(body)
            rid = message.rid
            if message.op == "HEARTBEAT":
                info = {
                    **self.info,
                    "load": pending_queries,
                    "batches": self._served_batches,
                    "queries": self._served_queries,
                    "draining": self._draining,
                }
                protocol.send(router, Message("INFO", rid, {"info": info}), envelope)
                return None
            if message.op != "SEARCH":
                raise ProtocolError("bad_request", f"a retrieval node answers SEARCH and HEARTBEAT, not {message.op}")
            if self._draining:
                raise ProtocolError("shutting_down", "this node is shutting down")
            content = message.fields.get("content", self.info["content"])
            if content != self.info["content"]:  # sent before its coordinator heard that this address now serves another version
                raise ProtocolError("unavailable", f"this node serves index {self.info['content']}, not {content}")
            queries, list_ids, k = self.engine.check(*message.arrays, message.fields["k"])
            if pending_queries + queries.shape[0] > MAX_PENDING_QUERIES:
                raise ProtocolError("overloaded", f"more than {MAX_PENDING_QUERIES} queries are waiting")
            return _Request(envelope, rid, queries, list_ids, k, message.fields.get("early"))
        except (ProtocolError, InvalidInput) as e:
            code, rid = (e.code, e.rid or rid) if isinstance(e, ProtocolError) else ("bad_request", rid)
            protocol.send(router, protocol.error_reply(rid, code, str(e)), envelope)
            return None

    def _use_threads(self) -> None:
        if self.threads is not None:
            numba.set_num_threads(self.threads)  # Numba's thread count belongs to the calling thread

    def _scan_loop(self, context, doorbell, batches) -> None:
        self._use_threads()
        replies = context.socket(zmq.PAIR)
        replies.connect(doorbell)
        try:
            while (batch := batches.get()) is not None:
                try:
                    self._scan(replies, batch)
                finally:
                    replies.send(_BATCH_DONE)
        finally:
            replies.close()

    def _scan(self, replies, batch: list[_Request]) -> None:
        """Scan a batch and answer each request. Requests that asked for an early answer are
        scanned in two stages (their first ``early`` lists with everything else, then the rest):
        the early RESULT leaves between the two, and the final one is the two stages merged."""
        k = max(r.k for r in batch)
        queries, first, rest, rows = _stack(batch)
        staged = [n for n, r in enumerate(batch) if r.early]
        unanswered = batch
        try:
            distances, ids = self.engine.search_checked(queries, first, k)  # each request was checked on arrival
            for n, r in enumerate(batch):
                reply = protocol.result_reply(r.rid, distances[rows[n], : r.k], ids[rows[n], : r.k], early=bool(r.early))
                protocol.send(replies, reply, r.envelope)
            unanswered = [batch[n] for n in staged]
            if staged:
                later = np.concatenate([np.arange(queries.shape[0])[rows[n]] for n in staged])
                rest_d, rest_i = self.engine.search_checked(queries[later], rest[later], k)
                distances[later], ids[later] = merge_topk([distances[later], rest_d], [ids[later], rest_i], k, self.index.params.metric)
        except Exception as e:  # a node answers, whatever went wrong
            for r in unanswered:
                protocol.send(replies, protocol.error_reply(r.rid, "internal", f"{type(e).__name__}: {e}"), r.envelope)
            return
        for n in staged:
            r = batch[n]
            protocol.send(replies, protocol.result_reply(r.rid, distances[rows[n], : r.k], ids[rows[n], : r.k]), r.envelope)
        self._served_batches += 1
        self._served_queries += queries.shape[0]


def _stack(batch: list[_Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[slice]]:
    """The batch as one search: all queries, the lists each scans first (a request with ``early``:
    its first ``early``) and then, and each request's rows."""
    if len(batch) == 1 and not batch[0].early:  # the usual batch, used as it is: no copies
        request = batch[0]
        return request.queries, request.list_ids, request.list_ids[:, :0], [slice(0, request.queries.shape[0])]
    nprobe = max(r.list_ids.shape[1] for r in batch)
    queries = np.concatenate([r.queries for r in batch])
    first = np.full((queries.shape[0], nprobe), -1, np.int64)  # shorter probe lists end in skips
    rest = np.full_like(first, -1)
    rows, row = [], 0
    for r in batch:
        rows.append(slice(row, row + r.queries.shape[0]))
        head, tail = split_probes(r.list_ids, r.early) if r.early else (r.list_ids, r.list_ids[:, :0])
        first[rows[-1], : head.shape[1]] = head
        rest[rows[-1], : tail.shape[1]] = tail
        row += r.queries.shape[0]
    return queries, first, rest, rows


def _take_batch(pending: list[_Request]) -> tuple[list[_Request], list[_Request]]:
    """Requests in arrival order up to :data:`MAX_BATCH_QUERIES` queries (at least one request)."""
    total = 0
    for n, request in enumerate(pending):
        total += request.queries.shape[0]
        if total > MAX_BATCH_QUERIES and n > 0:
            return pending[:n], pending[n:]
    return pending, []
