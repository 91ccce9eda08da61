"""Client side of the retrieval tier: send SEARCH / HEARTBEAT to a coordinator (or a node) and wait."""

from __future__ import annotations

import itertools
import time

import numpy as np
import zmq

from retriever.errors import ChameleonError, InvalidInput, Timeout, Unavailable
from retriever.search import SearchResult
from retriever.wire import protocol
from retriever.wire.protocol import Message, ProtocolError
from retriever.wire.security import CurveKeys, secure_client

# ERROR codes that say the tier cannot answer now, not that the request is wrong.
UNAVAILABLE_CODES = frozenset({"unavailable", "shutting_down", "overloaded"})
# ERROR codes that blame neither the request nor the tier's state (a fault on the other side).
FAULT_CODES = frozenset({"internal"})


class RemoteError(ChameleonError):
    """The other side answered ERROR with ``code``; :func:`remote_error` gives it its kind."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class RemoteUnavailable(RemoteError, Unavailable):
    """The other side cannot answer now (no live replica, shutting down, overloaded)."""


class RemoteRefusal(RemoteError, InvalidInput):
    """The other side refused the request as malformed or unacceptable."""


def remote_error(code: str, message: str) -> RemoteError:
    """The error an ERROR reply with ``code`` stands for."""
    if code in UNAVAILABLE_CODES:
        return RemoteUnavailable(code, message)
    return RemoteError(code, message) if code in FAULT_CODES else RemoteRefusal(code, message)


def result_of_reply(reply: Message) -> SearchResult:
    """The answer a RESULT ``reply`` carries."""
    if reply.op != "RESULT":
        raise remote_error("bad_request", f"expected RESULT, got {reply.op}")
    distances, ids = reply.arrays
    return SearchResult(distances, ids, reply.fields.get("partial", False), reply.fields.get("missing", []))


class RepliesByRid:
    """A client's requests in flight and the replies that came for them, matched by rid; an early
    RESULT is kept apart from the final reply that follows it."""

    def __init__(self):
        self._outstanding: set[int] = set()  # rids sent and not yet received
        self._replies: dict[int, Message] = {}  # replies that came while waiting for another rid
        self._early: dict[int, Message] = {}  # early RESULTs not yet asked for

    def _check_outstanding(self, rid: int) -> None:
        if rid not in self._outstanding:
            raise InvalidInput(f"no request {rid} is waiting for an answer")

    def _keep(self, reply: Message) -> None:
        """Keep ``reply`` for its request, unless that was given up on (a late answer)."""
        if reply.rid in self._outstanding:
            (self._early if reply.fields.get("early") else self._replies)[reply.rid] = reply

    def _has_reply(self, rid: int, early: bool) -> bool:
        return rid in self._replies or (early and rid in self._early)

    def _take_reply(self, rid: int, early: bool) -> Message:
        """The reply :meth:`_has_reply` found (ERROR raised as :class:`RemoteError`). With ``early``,
        the early RESULT, or the final reply if that came first; the request then stays open for its
        final reply."""
        if early and rid in self._early:
            reply = self._early.pop(rid)
        else:
            reply = self._replies[rid]
            if not early or reply.op == "ERROR":
                self._close_request(rid)
        if reply.op == "ERROR":
            raise remote_error(reply.fields["code"], reply.fields["message"])
        return reply

    def _close_request(self, rid: int) -> None:
        self._outstanding.discard(rid)
        self._replies.pop(rid, None)
        self._early.pop(rid, None)


class RetrievalClient(RepliesByRid):
    """One DEALER connection (one thread at a time); ``timeout`` seconds per request, never a hang."""

    def __init__(self, endpoint: str, keys: CurveKeys | None = None, timeout: float = 10.0, resend_after: float | None = None):
        """``resend_after``: seconds without an answer after which a request is sent again, for a
        peer that answers every request within a bound of its own (a coordinator: its per-shard
        timeout): a longer silence means that it lost the request (it restarted on the same
        endpoint), and ZeroMQ delivers the copy once it is back. The first answer counts."""
        super().__init__()
        self.endpoint = endpoint
        self.timeout = timeout
        self.resend_after = resend_after
        self._sent: dict[int, tuple[Message, float]] = {}  # with resend_after: rid -> (request, when last sent)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_client(self._socket, keys)
        self._socket.connect(endpoint)
        self._rids = itertools.count(1)

    def _close_request(self, rid: int) -> None:
        super()._close_request(rid)
        self._sent.pop(rid, None)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, message: Message, timeout: float | None = None) -> Message:
        """Send ``message`` (its rid is assigned here) and return the reply with the same rid."""
        return self.receive(self.send(message), timeout)

    def send(self, message: Message) -> int:
        """Send ``message`` without waiting; its reply is ``receive(rid)`` with the rid returned.
        Several requests may be in flight: replies are matched to them by rid."""
        message.rid = next(self._rids)
        protocol.send(self._socket, message)
        self._outstanding.add(message.rid)
        if self.resend_after is not None:
            self._sent[message.rid] = (message, time.monotonic())
        return message.rid

    def receive(self, rid: int, timeout: float | None = None, early: bool = False) -> Message:
        """The reply to request ``rid`` (ERROR raised as :class:`RemoteError`), within ``timeout`` s.

        With ``early``, the early RESULT to a SEARCH that asked for one, or the final reply if that
        came first; the request then stays open for its final reply."""
        self._check_outstanding(rid)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while not self._has_reply(rid, early):
                now = time.monotonic()
                until = deadline
                if rid in self._sent:
                    message, sent = self._sent[rid]
                    until = min(deadline, sent + self.resend_after)
                    if now >= until and until < deadline and not self._socket.poll(0, zmq.POLLIN):
                        protocol.send(self._socket, message)
                        self._sent[rid] = (message, now)
                        continue
                if not self._socket.poll(int(max(0.0, until - now) * 1000), zmq.POLLIN):
                    if until < deadline:
                        continue  # time to send it again
                    raise Timeout(f"no answer from {self.endpoint} within {self.timeout if timeout is None else timeout:g} s")
                try:
                    reply = protocol.decode(self._socket.recv_multipart(copy=False))
                except ProtocolError as e:
                    raise remote_error(e.code, f"malformed reply from {self.endpoint}: {e}") from None
                self._keep(reply)
        except Exception:
            self._close_request(rid)
            raise
        return self._take_reply(rid, early)

    def search(
        self, queries: np.ndarray, list_ids: np.ndarray, k: int, timeout: float | None = None, content: str | None = None
    ) -> SearchResult:
        return self.search_result(self.send_search(queries, list_ids, k, content=content), timeout)

    def send_search(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int | None = None, content: str | None = None) -> int:
        """Start a SEARCH; ``search_result(rid)`` waits for it. With ``early``, an early answer
        after the first ``early`` probed lists also comes: ``search_result(rid, early=True)``.
        ``content``: the index version searched (the coordinator's own when None)."""
        return self.send(protocol.search_request(0, queries, list_ids, k, early, content))

    def search_result(self, rid: int, timeout: float | None = None, early: bool = False) -> SearchResult:
        return result_of_reply(self.receive(rid, timeout, early))

    def info(self, timeout: float | None = None) -> dict:
        reply = self.request(Message("HEARTBEAT", 0), timeout)
        if reply.op != "INFO":
            raise remote_error("bad_request", f"expected INFO, got {reply.op}")
        return reply.fields["info"]
