"""Chameleon's wire protocol between tiers (version 1).

A message is a ZeroMQ multipart message::

    frame 0      header: a msgpack map
    frame 1..n   one raw, C-ordered array per entry of header["arrays"], sent and received zero-copy

The header always has::

    v       protocol version (int, currently 1)
    op      one of SEARCH, RESULT, HEARTBEAT, INFO, ERROR
    rid     request id (int, 0 <= rid < 2**63); a reply carries the id of its request
    arrays  [[dtype, [dim, ...]], ...] describing frames 1..n (dtype one of float32, int64, bool)

and per op:

    SEARCH     arrays: queries float32 (nq, d), list_ids int64 (nq, nprobe) (-1 = skip)
               fields: k (int, 1 <= k <= 65536); optional early (int, 1 <= early < nprobe): also
               answer with an early RESULT once the first ``early`` lists of every query are scanned;
               optional content (str): the index version (its content fingerprint) the list ids
               and the answer's ids belong to; a coordinator searches only that version's nodes,
               and a node of another version answers ``unavailable``
    RESULT     arrays: distances float32 (nq, k), ids int64 (nq, k) (-1 = empty slot)
               fields: partial (bool), missing (list of shard numbers without an answer); early
               (bool, true on the early answer to a SEARCH with ``early``, which always comes
               before the final one with the same rid)
    HEARTBEAT  no arrays, no fields (asks for INFO)
    INFO       fields: info (map: role, shard, nshards, fingerprint (of the shard layout), content
               (of the index version, whatever its layout), load, ...)
    ERROR      fields: code (str, one of ERROR_CODES), message (str)

Distances follow faiss: squared L2 ascending, or inner product descending. A receiver checks every
field; anything malformed raises :class:`ProtocolError`, which a server answers with ERROR and
never dies of. Sizes are bounded (:data:`MAX_HEADER_BYTES`, :data:`MAX_MESSAGE_BYTES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from retriever.errors import InvalidInput

VERSION = 1
OPS = ("SEARCH", "RESULT", "HEARTBEAT", "INFO", "ERROR")
DTYPES = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64), "bool": np.dtype(np.bool_)}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ERROR_CODES = ("bad_request", "unsupported_version", "too_large", "overloaded", "shutting_down", "unavailable", "internal")
MAX_HEADER_BYTES = 64 << 10
MAX_MESSAGE_BYTES = 256 << 20
MAX_ARRAYS = 8
MAX_NDIM = 4
MAX_K = 1 << 16
MAX_RID = (1 << 63) - 1


class ProtocolError(InvalidInput):
    """A malformed or unacceptable message; ``code`` is the ERROR code to answer with, ``rid`` the
    request id to answer (0 when the header did not get as far as a valid one)."""

    def __init__(self, code: str, message: str, rid: int = 0):
        super().__init__(message)
        self.code = code
        self.rid = rid


@dataclass
class Message:
    op: str
    rid: int
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)


def encode(message: Message) -> list:
    """Frames for ``message``: the header, then each array as a zero-copy buffer."""
    arrays = [np.ascontiguousarray(a) for a in message.arrays]
    header = {
        "v": VERSION,
        "op": message.op,
        "rid": message.rid,
        "arrays": [[_DTYPE_NAMES.get(a.dtype) or a.dtype.name, list(a.shape)] for a in arrays],  # dtype.name costs ~3 µs
        **message.fields,
    }
    return [msgpack.packb(header, use_bin_type=True), *(memoryview(a).cast("B") if a.size else b"" for a in arrays)]


def send(socket: zmq.Socket, message: Message, envelope: list | None = None, flags: int = 0) -> None:
    socket.send_multipart([*(envelope or []), *encode(message)], flags=flags, copy=False)


def decode(frames: list) -> Message:
    """Parse and check a message (``frames`` as bytes or zmq.Frame, without the routing envelope)."""
    if not frames:
        raise ProtocolError("bad_request", "empty message")
    if len(frames) > 1 + MAX_ARRAYS:
        raise ProtocolError("too_large", f"too many frames ({len(frames)}, at most {1 + MAX_ARRAYS})")
    buffers = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
    if sum(b.nbytes for b in buffers) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message larger than {MAX_MESSAGE_BYTES} bytes")
    if buffers[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header larger than {MAX_HEADER_BYTES} bytes")
    try:
        header = msgpack.unpackb(buffers[0], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise ProtocolError("bad_request", f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_request", "header must be a map")
    if header.get("v") != VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {header.get('v')!r} is not {VERSION}")
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError("bad_request", f"unknown op {op!r}")
    rid = header.get("rid")
    if not _is_int(rid) or not 0 <= rid <= MAX_RID:
        raise ProtocolError("bad_request", "rid must be an integer in [0, 2**63)")
    try:
        arrays = _decode_arrays(header.get("arrays"), buffers[1:])
        fields = {k: v for k, v in header.items() if k not in ("v", "op", "rid", "arrays")}
        message = Message(op, rid, fields, arrays)
        _CHECKS[op](message)
    except ProtocolError as e:
        e.rid = rid  # the sender can match the ERROR to its request
        raise
    return message


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_arrays(descriptors, buffers) -> list[np.ndarray]:
    if not isinstance(descriptors, list) or len(descriptors) != len(buffers):
        raise ProtocolError("bad_request", f"header describes {descriptors!r} arrays but {len(buffers)} frames follow")
    arrays = []
    for i, (descriptor, buffer) in enumerate(zip(descriptors, buffers)):
        if not (isinstance(descriptor, list) and len(descriptor) == 2 and descriptor[0] in DTYPES):
            raise ProtocolError("bad_request", f"array {i}: descriptor must be [dtype, shape] with dtype in {list(DTYPES)}")
        dtype, shape = DTYPES[descriptor[0]], descriptor[1]
        if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_NDIM and all(_is_int(s) and 0 <= s for s in shape)):
            raise ProtocolError("bad_request", f"array {i}: shape must be a list of 1 to {MAX_NDIM} non-negative integers")
        expected = dtype.itemsize * math.prod(shape)  # Python ints: no overflow on absurd shapes (np.prod costs ~5 µs)
        if expected != buffer.nbytes:
            raise ProtocolError("bad_request", f"array {i}: {dtype.name}{shape} needs {expected:.0f} bytes, frame has {buffer.nbytes}")
        arrays.append(np.frombuffer(buffer, dtype=dtype).reshape(shape))
    return arrays


def _expect_arrays(message: Message, spec: list[tuple[str, str]]) -> None:
    if len(message.arrays) != len(spec):
        raise ProtocolError(
            "bad_request", f"{message.op} takes {len(spec)} arrays ({', '.join(n for n, _ in spec)}), got {len(message.arrays)}"
        )
    for array, (name, dtype) in zip(message.arrays, spec):
        if array.dtype != DTYPES[dtype] or array.ndim != 2:
            raise ProtocolError("bad_request", f"{message.op}: {name} must be a 2-D {dtype} array, got {array.dtype}{list(array.shape)}")
    rows = {a.shape[0] for a in message.arrays}
    if len(rows) != 1:
        raise ProtocolError("bad_request", f"{message.op}: arrays disagree on the number of rows")


def _expect_fields(message: Message, allowed: set[str]) -> None:
    extra = set(message.fields) - allowed
    if extra:
        raise ProtocolError("bad_request", f"{message.op}: unknown field(s) {sorted(extra)}")


def _check_search(message: Message) -> None:
    _expect_fields(message, {"k", "early", "content"})
    _expect_arrays(message, [("queries", "float32"), ("list_ids", "int64")])
    queries, list_ids = message.arrays
    if queries.shape[0] < 1 or queries.shape[1] < 1 or list_ids.shape[1] < 1:
        raise ProtocolError("bad_request", "SEARCH needs at least one query, one dimension and one list id")
    k = message.fields.get("k")
    if not _is_int(k) or not 1 <= k <= MAX_K:
        raise ProtocolError("bad_request", f"SEARCH: k must be an integer in [1, {MAX_K}], got {k!r}")
    early = message.fields.get("early")
    if early is not None and not (_is_int(early) and 1 <= early < list_ids.shape[1]):
        raise ProtocolError("bad_request", f"SEARCH: early must be an integer in [1, nprobe = {list_ids.shape[1]}), got {early!r}")
    content = message.fields.get("content")
    if content is not None and not (isinstance(content, str) and 0 < len(content) <= 64):
        raise ProtocolError("bad_request", f"SEARCH: content must be an index version's fingerprint, got {content!r}")


def _check_result(message: Message) -> None:
    _expect_fields(message, {"partial", "missing", "early"})
    _expect_arrays(message, [("distances", "float32"), ("ids", "int64")])
    if message.arrays[0].shape != message.arrays[1].shape:
        raise ProtocolError("bad_request", "RESULT: distances and ids must have the same shape")
    if not all(isinstance(message.fields.get(flag, False), bool) for flag in ("partial", "early")):
        raise ProtocolError("bad_request", "RESULT: partial and early must be booleans")
    missing = message.fields.get("missing", [])
    if not isinstance(missing, list) or not all(_is_int(s) for s in missing):
        raise ProtocolError("bad_request", "RESULT: missing must be a list of shard numbers")


def _check_heartbeat(message: Message) -> None:
    _expect_fields(message, set())
    if message.arrays:
        raise ProtocolError("bad_request", "HEARTBEAT takes no arrays")


def _check_info(message: Message) -> None:
    _expect_fields(message, {"info"})
    if message.arrays or not isinstance(message.fields.get("info"), dict):
        raise ProtocolError("bad_request", "INFO takes an info map and no arrays")


def _check_error(message: Message) -> None:
    _expect_fields(message, {"code", "message"})
    if message.fields.get("code") not in ERROR_CODES or not isinstance(message.fields.get("message"), str):
        raise ProtocolError("bad_request", "ERROR needs a known code and a message string")


_CHECKS = {"SEARCH": _check_search, "RESULT": _check_result, "HEARTBEAT": _check_heartbeat, "INFO": _check_info, "ERROR": _check_error}


def check(message: Message) -> None:
    """What :func:`decode` checks of a message, for one handed over in process instead of received."""
    if sum(a.nbytes for a in message.arrays) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message larger than {MAX_MESSAGE_BYTES} bytes", rid=message.rid)
    try:
        _CHECKS[message.op](message)
    except ProtocolError as e:
        e.rid = message.rid
        raise


def search_request(
    rid: int, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int | None = None, content: str | None = None
) -> Message:
    fields = {"k": int(k)}
    if early is not None:
        fields["early"] = int(early)
    if content is not None:
        fields["content"] = content
    return Message("SEARCH", rid, fields, [np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(list_ids, np.int64)])


def result_reply(rid: int, distances: np.ndarray, ids: np.ndarray, missing: list[int] | None = None, early: bool = False) -> Message:
    fields = {"partial": bool(missing), "missing": sorted(missing)} if missing else {}
    if early:
        fields["early"] = True
    return Message("RESULT", rid, fields, [np.ascontiguousarray(distances, np.float32), np.ascontiguousarray(ids, np.int64)])


def error_reply(rid: int, code: str, text: str) -> Message:
    return Message("ERROR", rid, {"code": code, "message": text[:1000]})
