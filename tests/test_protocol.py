import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retriever.wire import protocol
from retriever.wire.protocol import Message, ProtocolError

# The wire format is a contract between processes of different versions: these bytes must not change
# without a protocol version bump.
GOLDEN_SEARCH_HEADER = bytes.fromhex(
    "85a17601a26f70a6534541524348a372696407a66172726179739292a7666c6f6174333292010292a5696e743634920102a16b05"
)
GOLDEN_SEARCH_ARRAYS = [bytes.fromhex("0000803f00000040"), bytes.fromhex("0300000000000000ffffffffffffffff")]


def golden_search():
    return protocol.search_request(7, np.array([[1.0, 2.0]], np.float32), np.array([[3, -1]], np.int64), 5)


def test_golden_search_message():
    frames = [bytes(f) for f in protocol.encode(golden_search())]
    assert frames == [GOLDEN_SEARCH_HEADER, *GOLDEN_SEARCH_ARRAYS]
    assert msgpack.unpackb(frames[0]) == {
        "v": 1,
        "op": "SEARCH",
        "rid": 7,
        "arrays": [["float32", [1, 2]], ["int64", [1, 2]]],
        "k": 5,
    }
    decoded = protocol.decode([GOLDEN_SEARCH_HEADER, *GOLDEN_SEARCH_ARRAYS])
    assert (decoded.op, decoded.rid, decoded.fields) == ("SEARCH", 7, {"k": 5})
    np.testing.assert_array_equal(decoded.arrays[1], [[3, -1]])


@pytest.mark.parametrize(
    "message",
    [
        golden_search(),
        protocol.result_reply(3, np.zeros((2, 4), np.float32), np.arange(8).reshape(2, 4), missing=[1]),
        protocol.result_reply(3, np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int64)),
        protocol.search_request(4, np.ones((2, 3), np.float32), np.arange(8).reshape(2, 4), 10, early=3),
        protocol.search_request(4, np.ones((2, 3), np.float32), np.arange(8).reshape(2, 4), 10, content="0123456789abcdef"),
        protocol.result_reply(4, np.zeros((2, 10), np.float32), np.zeros((2, 10), np.int64), early=True),
        Message("HEARTBEAT", 2**63 - 1),
        Message("INFO", 1, {"info": {"shard": 0, "nodes": [{"alive": True}]}}),
        protocol.error_reply(9, "overloaded", "busy"),
    ],
)
def test_round_trip(message):
    decoded = protocol.decode(protocol.encode(message))
    assert (decoded.op, decoded.rid, decoded.fields) == (message.op, message.rid, message.fields)
    for a, b in zip(decoded.arrays, message.arrays):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def frames_with(header_changes=None, arrays=None):
    header = msgpack.unpackb(GOLDEN_SEARCH_HEADER)
    header.update(header_changes or {})
    header = {k: v for k, v in header.items() if v is not None}
    return [msgpack.packb(header), *(GOLDEN_SEARCH_ARRAYS if arrays is None else arrays)]


@pytest.mark.parametrize(
    "frames, code, text",
    [
        ([], "bad_request", "empty"),
        ([b"\xc1garbage"], "bad_request", "not valid msgpack"),
        ([msgpack.packb([1, 2])], "bad_request", "must be a map"),
        (frames_with({"v": 2}), "unsupported_version", "version 2"),
        (frames_with({"op": "DELETE"}), "bad_request", "unknown op"),
        (frames_with({"rid": -1}), "bad_request", "rid"),
        (frames_with({"rid": True}), "bad_request", "rid"),
        (frames_with({"k": 0}), "bad_request", "k must be"),
        (frames_with({"k": 10**9}), "bad_request", "k must be"),
        (frames_with({"k": None}), "bad_request", "k must be"),
        (frames_with({"extra": 1}), "bad_request", "unknown field"),
        (frames_with({"early": 2}), "bad_request", "early must be"),  # nprobe is 2: nothing left for later
        (frames_with({"early": 0}), "bad_request", "early must be"),
        (frames_with({"early": True}), "bad_request", "early must be"),
        (frames_with({"content": 7}), "bad_request", "content must be"),
        (frames_with({"content": ""}), "bad_request", "content must be"),
        (frames_with({"content": "f" * 65}), "bad_request", "content must be"),
        (frames_with(arrays=GOLDEN_SEARCH_ARRAYS[:1]), "bad_request", "describes"),
        (frames_with(arrays=[GOLDEN_SEARCH_ARRAYS[0][:-1], GOLDEN_SEARCH_ARRAYS[1]]), "bad_request", "needs 8 bytes"),
        (frames_with({"arrays": [["float32", [10**12, 10**12]], ["int64", [1, 2]]]}), "bad_request", "needs"),
        (frames_with({"arrays": [["float64", [1, 2]], ["int64", [1, 2]]]}), "bad_request", "descriptor"),
        (frames_with({"arrays": [["float32", [2]], ["int64", [1, 2]]]}), "bad_request", "2-D float32"),
        (frames_with({"arrays": [["float32", [1, 2, 1, 1, 1]], ["int64", [1, 2]]]}), "bad_request", "shape must be"),
        (frames_with({"arrays": [["float32", [1, -2]], ["int64", [1, 2]]]}), "bad_request", "shape must be"),
        (
            frames_with({"arrays": [["int64", [1, 2]], ["float32", [1, 2]]]}, arrays=GOLDEN_SEARCH_ARRAYS[::-1]),
            "bad_request",
            "queries must be",
        ),
        ([b"\x00" * (protocol.MAX_HEADER_BYTES + 1)], "too_large", "header larger"),
        ([GOLDEN_SEARCH_HEADER] + [b""] * 9, "too_large", "too many frames"),
    ],
)
def test_malformed_messages_are_rejected(frames, code, text):
    with pytest.raises(ProtocolError, match=text) as error:
        protocol.decode(frames)
    assert error.value.code == code


@pytest.mark.parametrize("changes", [{"k": 0}, {"early": 2}, {"extra": 1}, {"arrays": [["float32", [2]], ["int64", [1, 2]]]}])
def test_errors_found_after_the_request_id_carry_it(changes):
    with pytest.raises(ProtocolError) as error:
        protocol.decode(frames_with(changes))
    assert error.value.rid == 7  # so the sender can match the ERROR to its request
    with pytest.raises(ProtocolError) as error:
        protocol.decode(frames_with({"rid": -1}))
    assert error.value.rid == 0


def test_check_applies_decodes_rules_to_a_message_in_hand():
    queries, list_ids = np.zeros((2, 4), np.float32), np.zeros((2, 3), np.int64)
    protocol.check(protocol.search_request(5, queries, list_ids, 10, early=2))
    for k, early, code in ((0, None, "bad_request"), (10, 3, "bad_request")):
        with pytest.raises(ProtocolError) as error:
            protocol.check(protocol.search_request(5, queries, list_ids, k, early))
        assert (error.value.code, error.value.rid) == (code, 5)
    huge = np.zeros((protocol.MAX_MESSAGE_BYTES // 16 + 1, 4), np.float32)
    with pytest.raises(ProtocolError) as error:
        protocol.check(protocol.search_request(6, huge, np.zeros((len(huge), 1), np.int64), 10))
    assert (error.value.code, error.value.rid) == ("too_large", 6)


headers = st.dictionaries(
    st.sampled_from(["v", "op", "rid", "arrays", "k", "early", "content", "code", "message", "info", "partial", "missing", "x"]),
    st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=8),
        st.booleans(),
        st.none(),
        st.sampled_from(protocol.OPS),
        st.just(1),
        st.lists(st.tuples(st.sampled_from(["float32", "int64", "bool", "x"]), st.lists(st.integers(-2, 5), max_size=5)), max_size=3),
    ),
)


@settings(max_examples=500, deadline=None)
@given(header=headers, payloads=st.lists(st.binary(max_size=64), max_size=4), raw=st.booleans(), junk=st.binary(max_size=64))
def test_decode_never_fails_other_than_with_protocol_error(header, payloads, raw, junk):
    frames = [junk if raw else msgpack.packb(header, use_bin_type=True), *payloads]
    try:
        message = protocol.decode(frames)
    except ProtocolError as e:
        assert e.code in protocol.ERROR_CODES
    else:
        assert message.op in protocol.OPS
