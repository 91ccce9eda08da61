"""Client side of the retrieval tier: send SEARCH / HEARTBEAT to a coordinator (or a node) and wait."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import zmq

from coordinator import protocol
from coordinator.protocol import Message, ProtocolError
from coordinator.security import CurveKeys, secure_client
from retriever.errors import RetrieverError


class RemoteError(RetrieverError):
    """The other side answered ERROR."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class SearchResult:
    distances: np.ndarray
    ids: np.ndarray
    partial: bool
    missing: list[int]


class RetrievalClient:
    """One DEALER connection; one request at a time; ``timeout`` seconds per request, never a hang."""

    def __init__(self, endpoint: str, keys: CurveKeys | None = None, timeout: float = 10.0, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_client(self._socket, keys)
        self._socket.connect(endpoint)
        self._rids = itertools.count(1)

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, message: Message, timeout: float | None = None) -> Message:
        """Send ``message`` (its rid is assigned here) and return the reply with the same rid."""
        message.rid = next(self._rids)
        protocol.send(self._socket, message)
        deadline_ms = int(1000 * (self.timeout if timeout is None else timeout))
        while self._socket.poll(deadline_ms, zmq.POLLIN):
            try:
                reply = protocol.decode(self._socket.recv_multipart(copy=False))
            except ProtocolError as e:
                raise RemoteError(e.code, f"malformed reply from {self.endpoint}: {e}") from None
            if reply.rid != message.rid:
                continue  # a late answer to an earlier request that timed out
            if reply.op == "ERROR":
                raise RemoteError(reply.fields["code"], reply.fields["message"])
            return reply
        raise RetrieverError(f"no answer from {self.endpoint} within {deadline_ms / 1000:g} s")

    def search(self, queries: np.ndarray, list_ids: np.ndarray, k: int, timeout: float | None = None) -> SearchResult:
        reply = self.request(protocol.search_request(0, queries, list_ids, k), timeout)
        if reply.op != "RESULT":
            raise RemoteError("bad_request", f"expected RESULT, got {reply.op}")
        distances, ids = reply.arrays
        return SearchResult(distances, ids, reply.fields.get("partial", False), reply.fields.get("missing", []))

    def info(self, timeout: float | None = None) -> dict:
        reply = self.request(Message("HEARTBEAT", 0), timeout)
        if reply.op != "INFO":
            raise RemoteError("bad_request", f"expected INFO, got {reply.op}")
        return reply.fields["info"]
