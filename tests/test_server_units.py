"""The server's parts that need no server: settings precedence and checks, the text stream
(stop strings, held-back text, reported tokens), and what the port answers while the server starts."""

import json
import socket
import urllib.error
import urllib.request

import pytest

from retriever.errors import InvalidInput


def test_settings_precedence_flags_env_file_defaults(tmp_path, monkeypatch):
    from chameleon.server.settings import ServeSettings

    config = tmp_path / "serve.yaml"
    config.write_text("port: 9000\nshards: 3\nmax-concurrency: 4\napi_keys: [a]\n")
    monkeypatch.setenv("CHAMELEON_SHARDS", "1")
    monkeypatch.setenv("CHAMELEON_API_KEYS", "x, y")
    settings = ServeSettings.load(config, port=None, k=8)
    assert (settings.port, settings.shards, settings.max_concurrency, settings.k) == (9000, 1, 4, 8)
    assert settings.api_keys == ["x", "y"] and settings.nprobe == 16
    assert ServeSettings.load(config, shards=0).shards == 0
    config.write_text("prot: 1\n")
    with pytest.raises(InvalidInput, match="prot: Extra inputs"):
        ServeSettings.load(config)
    config.write_text("[1, 2")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        ServeSettings.load(config)
    with pytest.raises(InvalidInput, match="port"):
        ServeSettings.load(None, port=70000)
    assert ServeSettings.load(None, max_tokens=8).default_max_tokens == 8
    with pytest.raises(InvalidInput, match="default_max_tokens"):
        ServeSettings.load(None, max_tokens=8, default_max_tokens=9)
    assert ServeSettings.load(None, retrieval_engine="numba-fastscan").retrieval_engine == "numba-fastscan"
    with pytest.raises(InvalidInput, match="needs --fpga-mode"):
        ServeSettings.load(None, retrieval_engine="fpga")
    with pytest.raises(InvalidInput, match="go with the fpga engine"):
        ServeSettings.load(None, xclbin=tmp_path / "x.xclbin")
    with pytest.raises(InvalidInput, match="retrieval_engine"):
        ServeSettings.load(None, retrieval_engine="warp-drive")


def test_text_stream_cuts_at_stop_strings_and_holds_back_their_beginnings(tiny_model):
    from transformers import AutoTokenizer

    from chameleon.server.text_stream import TextStream

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Hello wörld. The answer is 42. STOP and more"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id}

    plain = TextStream(tokenizer, eos)
    assert "".join(plain.push(t) for t in tokens) + plain.finish() == text

    stream = TextStream(tokenizer, eos, stop=["STOP"])
    deltas = [stream.push(t) for t in tokens]
    assert stream.stopped and "".join(deltas) + stream.finish() == "Hello wörld. The answer is 42. "
    assert "S" not in "".join(deltas[: tokens.index(tokenizer(" STOP", add_special_tokens=False)["input_ids"][0])])

    held = TextStream(tokenizer, eos, stop=["42!"])  # "42" is the start of a stop string that never completes
    sent = "".join(held.push(t) for t in tokens)
    assert not held.stopped and sent + held.finish() == text

    from chameleon.engines.sampling import TokenLogprob

    # Tokens come out with the text they start, up to the one the stop string begins in.
    reported, sent = TextStream(tokenizer, eos, stop=["STOP"]), ""
    for n, t in enumerate(tokens):
        sent += reported.push(t, TokenLogprob(t, -n / 10, ((t, -n / 10),)))
        assert all(r.offset < len(sent) for r in reported.released)  # never ahead of the text
    reported.finish()
    through_stop = tokens[: tokens.index(tokenizer(" STOP", add_special_tokens=False)["input_ids"][0]) + 1]
    assert [r.text for r in reported.released] == [tokenizer.decode([t]) for t in through_stop]
    assert [r.offset for r in reported.released] == [len(tokenizer.decode(through_stop[:n])) for n in range(len(through_stop))]
    assert [(r.logprob, r.top) for r in reported.released] == [(-n / 10, ((r.text, -n / 10),)) for n, r in enumerate(reported.released)]


def test_each_kind_of_error_has_one_status_and_one_exit_code():
    from chameleon.cli import exit_code
    from chameleon.server.errors import status_of
    from coordinator.client import RemoteError, RemoteRefusal, RemoteUnavailable, remote_error
    from retriever.errors import ChameleonError, NotFound, Timeout, Unavailable, Unsupported
    from retriever.wire.protocol import ProtocolError

    kinds = {
        InvalidInput("bad k"): (400, 2),
        ProtocolError("bad_request", "no such op"): (400, 2),
        NotFound("no index at x"): (404, 2),
        Unsupported("no CUDA here"): (400, 2),
        Unavailable("no live replica"): (503, 3),
        Timeout("no answer within 2 s"): (504, 3),
        ChameleonError("something else"): (500, 2),
    }
    for error, (status, code) in kinds.items():
        assert (status_of(error)[0], exit_code(error)) == (status, code), error
    assert exit_code(FileNotFoundError("x")) == 2

    # An ERROR reply becomes the kind its code stands for.
    unavailable, refused, fault = (
        remote_error("unavailable", "no live replica"),
        remote_error("bad_request", "k"),
        remote_error("internal", "x"),
    )
    assert isinstance(unavailable, RemoteUnavailable) and isinstance(unavailable, Unavailable) and status_of(unavailable)[0] == 503
    assert isinstance(refused, RemoteRefusal) and isinstance(refused, InvalidInput) and status_of(refused)[0] == 400
    assert type(fault) is RemoteError and status_of(fault)[0] == 500
    assert all(e.code in str(e) for e in (unavailable, refused, fault))


def test_the_port_answers_while_the_server_starts_and_is_handed_over_intact():
    from chameleon.server.starting import StartingResponder

    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    starting = StartingResponder(listener).start()
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:  # alive: a liveness probe leaves it be
            assert response.status == 200
        starting.step("loading the LLM")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v1/rag", data=b"{}", method="POST"), timeout=5)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert json.loads(refused.value.read()) == {"ready": False, "starting": "loading the LLM"}
    finally:
        starting.stop()
    # the socket stays open and listening for whoever serves next
    with socket.create_connection(listener.getsockname(), timeout=5):
        accepted, _ = listener.accept()
        accepted.close()
    listener.close()


def test_readiness_of_a_version_names_what_is_missing_from_a_coordinators_view():
    from chameleon.server.served_index import tier_readiness

    def node(shard, content, layout, alive=True):
        return {"shard": shard, "content": content, "fingerprint": layout, "alive": alive}

    assert tier_readiness(None, "v2") == {"ready": False, "reason": "the coordinator does not answer"}
    only_v1 = {"versions": {"c1": {"fingerprint": "l1", "nshards": 2, "ready": True}}, "nodes": [node(0, "c1", "l1"), node(1, "c1", "l1")]}
    assert tier_readiness(only_v1, "c2", ["node-0 failed: exit 2"]) == {
        "ready": False,
        "reason": "the retrieval tier has no node of index c2 (it serves: ['c1']); node-0 failed: exit 2",
    }
    both = {
        "versions": {**only_v1["versions"], "c2": {"fingerprint": "l2", "nshards": 2, "ready": False}},
        "nodes": [*only_v1["nodes"], node(0, "c2", "l2"), node(1, "c2", "l2", alive=False)],
    }
    assert tier_readiness(both, "c2") == {"ready": False, "reason": "no live node for shard(s) [1]"}
    assert tier_readiness(both, "c1") == {"ready": True, "shards": 2, "nodes": 2}  # the other version's nodes are not counted
