"""`chameleon serve`: real server processes on loopback, the official openai client, metrics, limits,
and a property-based run over the OpenAPI schema. Most tests use a tiny random model; the
integration ones use the built-in model and retrieval shards as separate processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from retriever.errors import InvalidInput
from tests.helpers import start_server, wait_for

KEY = "test-key"


def call(
    url: str, body: dict | bytes | None = None, key: str | None = KEY, method: str | None = None, headers: dict | None = None
) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}) | (headers or {})
    request = urllib.request.Request(url, data, headers, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw[:1] in (b"{", b"[") else {"text": raw.decode()}, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def events(url: str, body: dict, key: str | None = KEY, headers: dict | None = None):
    """The (event, data) pairs of a server-sent event stream, as they arrive."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"} | (headers or {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        event = None
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, line[6:]
                event = None


def _alive(pid: int) -> bool:
    try:
        return b"chameleon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _tier_pids(state_dir: str) -> list[int]:
    state = json.loads((Path(state_dir) / "cluster.json").read_text())
    return [p["pid"] for p in [state["coordinator"], *state["nodes"]]]


def _wait_gone(pids: list[int], limit: float = 60) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _sample(metrics_text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_reload_serves_a_changed_index_and_keeps_the_old_one_when_it_cannot(facts_index, embedder, tiny32, tmp_path):
    import shutil

    from chameleon.rag.corpus import RagIndex, add_to_rag_index
    from chameleon.rag.pipeline import RagPipeline
    from chameleon.server.launch import open_index
    from chameleon.server.served_index import ReloadInProgress
    from chameleon.server.service import Service
    from chameleon.server.settings import ServeSettings

    index = tmp_path / "facts"
    shutil.copytree(facts_index, index)
    settings = ServeSettings.load(None, shards=0)
    served = open_index(settings, RagIndex(index, embedder.fingerprint), tmp_path / "state")
    pipeline = RagPipeline(served.rag_index, embedder, tiny32, k=3, nprobe=4, retrieval=served.retrieval)
    entered, gate, opened = threading.Event(), threading.Event(), []

    def reopen(rag_index):
        entered.set()
        gate.wait(60)
        opened.append(open_index(settings, rag_index, tmp_path / "state"))
        return opened[-1]

    service = Service(pipeline, "tiny", served, reopen)
    gate.set()
    unchanged = service.reload()
    assert not unchanged["reloaded"] and unchanged["index"]["passages"] == 300 and not opened
    question = "What are the moons of Quibblex-7 made of?"
    assert service.search(question, None, 1, None)[0][0]["doc_id"] != "quibblex"
    (tmp_path / "new.jsonl").write_text(
        json.dumps({"id": "quibblex", "title": "Quibblex-7", "text": "The moons of Quibblex-7 are made of solid copper."}) + "\n"
    )
    add_to_rag_index(index, tmp_path / "new.jsonl", embedder)

    gate.clear()  # a second reload while the first opens the new version is refused
    first = threading.Thread(target=lambda: opened.append(service.reload()))
    first.start()
    assert entered.wait(60)
    with pytest.raises(ReloadInProgress):
        service.reload()
    gate.set()
    first.join(60)
    reloaded = opened[-1]
    assert reloaded["reloaded"] and reloaded["index"]["passages"] == 301 and reloaded["previous"]["passages"] == 300
    assert reloaded["index"]["fingerprint"] != unchanged["index"]["fingerprint"]
    assert service.served.rag_index is pipeline.rag_index and pipeline.retrieval is service.served.retrieval
    assert service.search(question, None, 1, None)[0][0]["doc_id"] == "quibblex"
    assert service.readiness()["index"] == reloaded["index"]

    # a damaged version is refused and the served one goes on
    (index / "docstore.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidInput, match="damaged"):
        service.reload()
    shutil.rmtree(index / "index")
    with pytest.raises(InvalidInput, match="manifest"):
        service.reload()
    assert service.search(question, None, 1, None)[0][0]["doc_id"] == "quibblex" and service.readiness()["ready"]


# -- a tiny model, retrieval in process ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, facts_index, tiny_model):
    server = start_server(
        tmp_path_factory.mktemp("tiny-server"),
        "--index",
        facts_index,
        "--model",
        tiny_model,
        "--shards",
        0,
        "--api-key",
        KEY,
        "--max-tokens",
        64,
        "--max-concurrency",
        3,
    )
    yield server
    assert server.stop() == 0


def test_api_keys_guard_v1_but_not_the_probes(tiny_server):
    status, body, headers = call(tiny_server.url + "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    assert call(tiny_server.url + "/v1/models", key="wrong")[0] == 401
    status, body, _ = call(tiny_server.url + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny-llama"
    assert call(tiny_server.url + "/healthz", key=None)[:2] == (200, {"status": "ok"})
    assert call(tiny_server.url + "/readyz", key=None)[1]["ready"] is True
    assert call(tiny_server.url + "/metrics", key=None)[0] == 200


def test_bad_requests_get_clear_errors_and_the_server_goes_on(tiny_server):
    url = tiny_server.url
    status, body, _ = call(url + "/v1/rag", {"question": "x", "k": 0})
    assert status == 422 and "k" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    status, body, _ = call(url + "/v1/rag", {"question": "x", "max_tokens": 65})
    assert status == 400 and "at most 64" in body["error"]["message"]
    status, body, _ = call(url + "/v1/rag", {"question": "x", "mode": "knnlm"})
    assert status == 400 and "--knnlm" in body["error"]["message"]
    status, body, _ = call(url + "/v1/rag", {"question": "x", "max_tokens": 8, "retrieval_interval": 9})
    assert status == 400 and "retrieval_interval" in body["error"]["message"]
    status, body, _ = call(url + "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = call(url + "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]})
    assert status == 400 and "last message" in body["error"]["message"]
    assert call(url + "/v1/chat/completions", {"messages": []})[0] == 422
    assert call(url + "/v1/rag", b"{not json")[0] == 422
    assert call(url + "/v1/rag", b'{"question": "' + b"a" * (2 << 20) + b'"}')[0] == 413
    status, body, _ = call(url + "/v1/search", {"vector": [0.1] * 5})
    assert status == 400 and "384" in body["error"]["message"]
    status, body, _ = call(url + "/v1/search", b'{"vector": [' + b",".join([b"NaN"] + [b"0.1"] * 383) + b"]}")
    assert status == 400 and "NaN" in body["error"]["message"]
    status, body, _ = call(url + "/v1/search", {"query": "x", "vector": [0.1] * 384})
    assert status == 400 and "exactly one" in body["error"]["message"]
    assert call(url + "/healthz")[0] == 200


def test_search_by_text_and_by_vector(tiny_server):
    status, body, _ = call(tiny_server.url + "/v1/search", {"query": "What colour are the oceans of Zorblax-42?", "k": 5})
    assert status == 200 and len(body["results"]) == 5 and body["partial"] is False
    assert body["results"][0]["doc_id"] == "fact-42" and "Zorblax-42 " in body["results"][0]["snippet"]
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True) and set(body["timings"]) >= {"embed_s", "coarse_s", "retrieval_s"}
    vector = np.random.default_rng(0).standard_normal(384).tolist()
    status, body, _ = call(tiny_server.url + "/v1/search", {"vector": vector, "k": 3, "nprobe": 4})
    assert status == 200 and len(body["results"]) == 3 and "embed_s" not in body["timings"]


def test_embeddings_are_the_indexs_own_and_search_like_the_text(tiny_server, embedder):
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    question = "What colour are the oceans of Zorblax-42?"
    texts = [question, "The planet Zorblax-7 has red oceans.", "moons " * 400]  # the last one is truncated as the index's were
    reply = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64 and decodes it
    got = np.array([item.embedding for item in reply.data], np.float32)
    np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)
    assert [item.index for item in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens == embedder.count_tokens(texts) > 256
    status, body, _ = call(tiny_server.url + "/v1/embeddings", {"input": question, "encoding_format": "float", "dimensions": 384})
    assert status == 200 and len(body["data"]) == 1 and np.allclose(body["data"][0]["embedding"], got[0], atol=1e-6)
    by_text = call(tiny_server.url + "/v1/search", {"query": question, "k": 3})[1]["results"]
    by_vector = call(tiny_server.url + "/v1/search", {"vector": body["data"][0]["embedding"], "k": 3})[1]["results"]
    assert [hit["passage_id"] for hit in by_vector] == [hit["passage_id"] for hit in by_text]
    assert [m.id for m in client.models.list()] == ["tiny-llama", "all-minilm-l6-v2"]
    for request, status, words in [
        ({"input": question, "model": "text-embedding-3-small"}, 404, "all-minilm-l6-v2"),
        ({"input": question, "dimensions": 256}, 400, "384 dimensions"),
        ({"input": []}, 422, "at least 1"),
        ({"input": [question] * 2049}, 422, "at most 2048"),
        ({"input": [""]}, 422, "at least 1 character"),
        ({"input": [[1, 2, 3]]}, 422, "input"),
    ]:
        answer = call(tiny_server.url + "/v1/embeddings", request)
        assert answer[0] == status and words in answer[1]["error"]["message"], answer[1]


def test_completions_stop_strings_and_streaming_agree(tiny_server):
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    prompt = "The planet Zorblax-42 has"
    whole = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, extra_body={"rag": False})
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24 and len(text) > 10
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, stop=[stop], extra_body={"rag": False})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=24, stop=stop, stream=True, extra_body={"rag": False}
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.choices[0].text
    augmented = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4)
    assert augmented.usage.prompt_tokens > whole.usage.prompt_tokens  # the passages came first
    assert "fact-42" in [s["doc_id"] for s in augmented.model_extra["chameleon"]["sources"]]


def test_openai_parameters_we_do_not_implement_are_refused_unless_they_ask_for_nothing(tiny_server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Zorblax?"}], "max_tokens": 3, "extra_body": {"rag": False}}
    defaults = {
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "user": "someone",
        "metadata": {"run": "1"},
    }
    plain = client.chat.completions.create(**chat)
    assert client.chat.completions.create(**chat, **defaults).choices[0].message.content == plain.choices[0].message.content
    for asked in [
        {"response_format": {"type": "json_object"}},
        {"presence_penalty": 0.5, "logit_bias": {"42": 5}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    ]:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(**chat, **asked)
        assert all(name in str(refused.value) for name in asked) and refused.value.code == "unsupported_parameter"
    for asked in [{"best_of": 2}, {"suffix": "the end"}]:
        status, body, _ = call(tiny_server.url + "/v1/completions", {"prompt": "Zorblax", "max_tokens": 2, "rag": False, **asked})
        assert status == 400 and next(iter(asked)) in body["error"]["message"]
    assert (
        call(tiny_server.url + "/v1/completions", {"prompt": "Zorblax", "max_tokens": 2, "rag": False, "best_of": 1, "echo": False})[0]
        == 200
    )
    status, body, _ = call(tiny_server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert status == 400 and "echo" in body["error"]["message"]  # a completions parameter


def test_logprobs_come_with_the_tokens_of_the_answer_whole_or_streamed(tiny_server):
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Zorblax?"}], "max_tokens": 12, "extra_body": {"rag": False}}
    whole = client.chat.completions.create(**chat, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop")  # the end token is no text
    assert "".join(t.token for t in content).lstrip() == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)  # greedy: the most likely
        assert bytes(t.bytes).decode() == t.token
    streamed = [
        chunk.choices[0].logprobs
        for chunk in client.chat.completions.create(**chat, logprobs=True, top_logprobs=2, stream=True)
        if chunk.choices
    ]
    assert [t.model_dump() for part in streamed if part for t in part.content] == [t.model_dump() for t in content]
    assert client.chat.completions.create(**chat).choices[0].logprobs is None
    iterative = client.chat.completions.create(**{**chat, "extra_body": {"retrieval_interval": 4}}, logprobs=True)  # three generate calls
    assert "".join(t.token for t in iterative.choices[0].logprobs.content).lstrip() == iterative.choices[0].message.content
    assert iterative.model_extra["chameleon"]["timings"]["retrievals"] >= 2
    assert (
        call(tiny_server.url + "/v1/chat/completions", {**{k: v for k, v in chat.items() if k != "extra_body"}, "top_logprobs": 2})[0]
        == 422
    )

    text = (
        client.completions.create(model="tiny-llama", prompt="The planet Zorblax-42 has", max_tokens=16, extra_body={"rag": False})
        .choices[0]
        .text
    )
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(
        model="tiny-llama", prompt="The planet Zorblax-42 has", max_tokens=16, stop=[stop], logprobs=1, extra_body={"rag": False}
    )
    choice = cut.choices[0]
    assert choice.text == text[: text.index(stop)] and "".join(choice.logprobs.tokens).startswith(choice.text)
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset) and all(
        o < len(choice.text) for o in choice.logprobs.text_offset
    )
    assert all(
        choice.text[o:].startswith(t) or t.startswith(choice.text[o:]) for o, t in zip(choice.logprobs.text_offset, choice.logprobs.tokens)
    )
    assert [len(top) for top in choice.logprobs.top_logprobs] == [1] * len(choice.logprobs.tokens)


def test_echo_scores_the_prompt_after_the_passages_and_before_the_continuation(tiny_server):
    """OpenAI's echo + logprobs (what evaluation harnesses send to score a text): the prompt's
    tokens with their log-probabilities, then the continuation's."""
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    prompt = "The planet Zorblax-42 has purple oceans"
    plain = {"model": "tiny-llama", "prompt": prompt, "extra_body": {"rag": False}}
    scored = client.completions.create(**plain, max_tokens=0, echo=True, logprobs=2).choices[0]
    assert scored.text == prompt and scored.finish_reason == "length"
    tokens = scored.logprobs.tokens
    assert "".join(tokens) == prompt and scored.logprobs.text_offset == [len("".join(tokens[:n])) for n in range(len(tokens))]
    assert scored.logprobs.token_logprobs[0] is None and scored.logprobs.top_logprobs[0] is None  # nothing before it
    assert all(lp <= 0 for lp in scored.logprobs.token_logprobs[1:]) and all(len(top) <= 2 for top in scored.logprobs.top_logprobs[1:])

    continued = client.completions.create(**plain, max_tokens=5, echo=True, logprobs=1).choices[0]
    alone = client.completions.create(**plain, max_tokens=5, logprobs=1).choices[0]
    assert continued.text == prompt + alone.text
    assert continued.logprobs.tokens == tokens + alone.logprobs.tokens
    assert continued.logprobs.token_logprobs == pytest.approx(scored.logprobs.token_logprobs + alone.logprobs.token_logprobs, abs=1e-4)
    assert continued.logprobs.text_offset[len(tokens) :] == [len(prompt) + o for o in alone.logprobs.text_offset]
    assert client.completions.create(**plain, max_tokens=3, echo=True).choices[0].logprobs is None

    chunks = list(client.completions.create(**plain, max_tokens=5, echo=True, logprobs=1, stream=True))
    assert chunks[0].choices[0].text == prompt and "".join(c.choices[0].text for c in chunks if c.choices) == continued.text
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == continued.logprobs.tokens

    augmented = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert augmented.model_extra["chameleon"]["sources"] and augmented.choices[0].text == prompt
    assert (
        augmented.choices[0].logprobs.tokens == tokens and augmented.choices[0].logprobs.token_logprobs[0] is not None
    )  # after the passages
    assert call(tiny_server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 0})[0] == 422


def test_every_request_has_an_id_and_ends_with_one_access_log_line(tiny_server):
    def logged(request_id: str) -> dict:
        for _ in range(100):  # the line follows the response's last byte
            lines = [json.loads(line) for line in tiny_server.log.read_text().splitlines() if line.startswith('{"time"')]
            found = [line for line in lines if line["request_id"] == request_id]
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no access log line for {request_id}")

    chat = {"messages": [{"role": "user", "content": "Zorblax?"}], "max_tokens": 3, "rag": False}
    status, body, headers = call(tiny_server.url + "/v1/chat/completions", chat, headers={"X-Request-ID": "trace-42.a"})
    assert status == 200 and headers["x-request-id"] == "trace-42.a" and body["id"] == "chatcmpl-trace-42.a"
    line = logged("trace-42.a")
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/chat/completions", 200) and line["seconds"] > 0
    assert line["usage"] == body["usage"] and "messages" not in json.dumps(line)  # what was asked stays out of the log

    status, _, headers = call(tiny_server.url + "/v1/chat/completions", chat, headers={"X-Request-ID": "no spaces " * 3})
    assert status == 200 and len(headers["x-request-id"]) == 32 and logged(headers["x-request-id"])["status"] == 200

    status, body, headers = call(tiny_server.url + "/v1/search", {"vector": [0.1] * 5})
    line = logged(headers["x-request-id"])
    assert status == line["status"] == 400 and line["error"] == body["error"]["message"] and line["route"] == "/v1/search"

    chunks = [
        data for _, data in events(tiny_server.url + "/v1/chat/completions", {**chat, "stream": True}, headers={"X-Request-ID": "streamed"})
    ]
    assert json.loads(chunks[0])["id"] == "chatcmpl-streamed"
    assert logged("streamed")["usage"]["completion_tokens"] == 3  # known once the stream has ended


def test_sampling_settings_reach_the_engine(tiny_server):
    from openai import OpenAI

    url = tiny_server.url
    client = OpenAI(base_url=url + "/v1", api_key=KEY)
    chat = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me about Zorblax-42."}],
        "max_tokens": 12,
        "extra_body": {"rag": False},
    }

    def text(**options):
        return client.chat.completions.create(**chat, **options).choices[0].message.content

    greedy = text()
    assert text(temperature=0) == greedy and text(top_p=0.5, seed=1) == greedy  # no temperature: greedy
    sampled = text(temperature=1.0, seed=3)
    assert text(temperature=1.0, seed=3) == sampled != greedy
    assert text(temperature=1.0, seed=4) != sampled
    streamed = client.chat.completions.create(**chat, temperature=1.0, seed=3, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == sampled
    rag = {"question": "What colour are the oceans of Zorblax-42?", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 5}
    first, again = call(url + "/v1/rag", rag), call(url + "/v1/rag", rag)
    assert first[0] == again[0] == 200 and first[1]["answer"] == again[1]["answer"]
    assert call(url + "/v1/rag", {"question": "x", "temperature": 2.5})[0] == 422
    assert call(url + "/v1/completions", {"prompt": "x", "seed": -1, "temperature": 1})[0] == 422


def test_several_choices_draw_apart_stream_apart_and_count_their_places(tiny_server):
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY)
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me about Zorblax-42."}], "max_tokens": 12}

    def texts(**options):
        reply = client.chat.completions.create(**chat, **options)
        assert [choice.index for choice in reply.choices] == list(range(len(reply.choices)))
        return [choice.message.content for choice in reply.choices], reply.usage

    sampled, usage = texts(n=3, temperature=1.0, seed=7)
    assert len(set(sampled)) == 3 and texts(n=3, temperature=1.0, seed=7)[0] == sampled  # each its own draw, repeatable
    assert texts(temperature=1.0, seed=7)[0] == sampled[:1]  # choice 0 is the request for one choice
    assert usage.completion_tokens == 3 * 12 and usage.prompt_tokens == texts(temperature=1.0, seed=7)[1].prompt_tokens
    greedy, _ = texts(n=2)
    assert greedy == texts()[0] * 2
    streamed, finished = {}, {}
    for chunk in client.chat.completions.create(**chat, n=3, temperature=1.0, seed=7, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            finished[choice.index] = choice.finish_reason or finished.get(choice.index)
    assert [streamed[i] for i in range(3)] == sampled and finished == {0: "length", 1: "length", 2: "length"}
    completion = client.completions.create(model="tiny-llama", prompt="Zorblax-42 is", max_tokens=6, n=2, temperature=1.0, seed=1)
    assert len(completion.choices) == 2 and completion.choices[0].text != completion.choices[1].text
    status, body, _ = call(tiny_server.url + "/v1/chat/completions", {**chat, "n": 4, "temperature": 1.0})
    assert status == 400 and "--max-concurrency" in body["error"]["message"]  # more choices than the server has places
    assert call(tiny_server.url + "/v1/chat/completions", {**chat, "n": 9})[0] == 422


def test_requests_over_the_concurrency_limit_get_429(tiny_server):
    url = tiny_server.url
    # Three choices take the server's three places; a retrieval at every token keeps them busy
    # long after their first tokens.
    busy = {
        "messages": [{"role": "user", "content": "Zorblax-3?"}],
        "max_tokens": 64,
        "retrieval_interval": 1,
        "n": 3,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = events(url + "/v1/chat/completions", busy)
    assert json.loads(next(stream)[1])["choices"][0]["delta"]["role"] == "assistant"
    status, body, headers = call(url + "/v1/rag", {"question": "Zorblax-4?", "max_tokens": 4})
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
    rest = [data for _, data in stream]
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 3 * 64
    assert call(url + "/v1/rag", {"question": "Zorblax-4?", "max_tokens": 4})[0] == 200  # the place is free again
    metrics = call(url + "/metrics")[1]["text"]
    assert _sample(metrics, "chameleon_rejected_requests_total") >= 1


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    import schemathesis

    return schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")


schema = pytest.importorskip("schemathesis").pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_makes_a_server_error(case, tiny_server):
    response = case.call(base_url=tiny_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"


# -- SIGKILL: the tier goes with the server ----------------------------------------------------


def test_the_retrieval_engine_reaches_the_search_in_process_and_on_the_nodes(tmp_path, facts_corpus, facts_index, embedder, tiny_model):
    from chameleon.rag.corpus import build_rag_index
    from tests.helpers import chameleon

    serve = ("serve", "--model", tiny_model, "--port", 0, "--state-dir", tmp_path / "state")
    # numba-fastscan reads 4-bit codes: on the 8-bit index the server's own search refuses to start ...
    assert (
        "4-bit PQ codes"
        in chameleon(*serve, "--index", facts_index, "--shards", 0, "--retrieval-engine", "numba-fastscan", expect=2).stderr
    )
    # ... and the FPGA options reach the nodes, whose failure the server reports
    fpga = ("--retrieval-engine", "fpga", "--fpga-mode", "hw", "--xclbin", tmp_path / "x.xclbin")
    assert "no FPGA bitstream" in chameleon(*serve, "--index", facts_index, "--shards", 1, *fpga, expect=2).stderr

    four_bit = tmp_path / "facts-4bit"
    build_rag_index(facts_corpus, four_bit, embedder, nlist=4, m=48, nbits=4)
    (tmp_path / "server").mkdir()
    server = start_server(tmp_path / "server", "--index", four_bit, "--model", tiny_model, "--shards", 0, "--scan-engine", "numba-fastscan")
    try:
        status, body, _ = call(server.url + "/v1/search", {"query": "What colour are the oceans of Zorblax-42?", "k": 5}, key=None)
        # 4-bit codes blur these near-identical facts (top scores 0.7257 and 0.7251 here): the
        # right one is near the top, not necessarily first
        assert status == 200 and "fact-42" in [hit["doc_id"] for hit in body["results"]]
    finally:
        assert server.stop() == 0


def test_a_server_searches_a_tier_it_did_not_start_and_refuses_one_of_another_metric(tmp_path, facts_index, tiny_model, l2_index):
    from chameleon import cluster
    from retriever.index import save_index
    from tests.helpers import chameleon

    # the tier: a layout of the passage index's vectors, made on its own (as a deployment's index job does)
    chameleon("index", "reshard", "--index", facts_index, "--shards", 2, "--out", tmp_path / "layout")
    tier = cluster.up(tmp_path / "layout", 2, tmp_path / "tier")
    other = cluster.up(save_index(l2_index, tmp_path / "other"), 1, tmp_path / "other-tier")
    try:
        (tmp_path / "server").mkdir()
        coordinator = tier["coordinator"]["endpoint"]
        server = start_server(tmp_path / "server", "--index", facts_index, "--model", tiny_model, "--coordinator", coordinator)
        try:
            status, body, _ = call(server.url + "/v1/search", {"query": "What colour are the oceans of Zorblax-42?", "k": 3}, key=None)
            assert status == 200 and body["results"][0]["doc_id"] == "fact-42"
            status, ready, _ = call(server.url + "/readyz", None, key=None)
            assert status == 200 and ready["shards"] == 2 and ready["index"]["coordinator"] == coordinator
        finally:
            assert server.stop() == 0
        assert cluster.status(tmp_path / "tier")["view"]["ready"]  # the server left the tier running
        wrong = chameleon("serve", "--index", facts_index, "--model", tiny_model, "--port", 0, "--coordinator",
                          other["coordinator"]["endpoint"], expect=2).stderr  # fmt: skip
        assert "serves l2 indexes, not this passage index's (cos)" in wrong
    finally:
        cluster.down(tmp_path / "tier")
        cluster.down(tmp_path / "other-tier")


def test_a_new_index_version_rolls_out_through_a_tier_of_others_and_no_search_fails(tmp_path, facts_index, tiny_model, embedder):
    """Issue 24's index update on a cluster, with the processes a deployment runs. The server
    searches a tier it did not start, its --index a link to the current version (as the chart's
    index Job leaves it) and --watch-index on. The link moves to a new version (an added
    document) before any node serves it: the server goes on serving the old one. The new
    version's nodes join the same coordinator: the server switches by itself. The old version's
    nodes drain. One client searches throughout: every answer is whole, answers change version
    once, and never back."""
    import shutil

    from chameleon import cluster
    from chameleon.rag.corpus import RagIndex, add_to_rag_index
    from coordinator.client import RetrievalClient
    from retriever.index import save_layout
    from tests.test_tier import start_node

    versions = tmp_path / "versions"
    shutil.copytree(facts_index, versions / "v1" / "rag")
    shutil.copytree(facts_index, versions / "v2" / "rag")
    added = tmp_path / "added.jsonl"
    added.write_text(json.dumps({"id": "quuxar", "title": "Quuxar", "text": "The planet Quuxar has golden oceans and 99 moons."}) + "\n")
    add_to_rag_index(versions / "v2" / "rag", added, embedder)
    for version in ("v1", "v2"):
        save_layout(versions / version / "rag" / "index", 2, versions / version / "shards-2")
    new = RagIndex(versions / "v2" / "rag").fingerprint
    current = tmp_path / "current"
    current.symlink_to(versions / "v1")

    tier = cluster.up(versions / "v1" / "shards-2", 2, tmp_path / "tier")
    (tmp_path / "server").mkdir()
    server = start_server(tmp_path / "server", "--index", current / "rag", "--model", tiny_model,
                          "--coordinator", tier["coordinator"]["endpoint"], "--watch-index", 0.2)  # fmt: skip
    answers, stop = [], threading.Event()

    def search_without_pause():
        while not stop.is_set():
            status, body, _ = call(server.url + "/v1/search", {"query": "Which planet has golden oceans and 99 moons?", "k": 3}, key=None)
            answers.append((status, tuple(hit["doc_id"] for hit in body.get("results", [])), body.get("partial")))

    client = threading.Thread(target=search_without_pause)
    client.start()
    started = []
    try:
        wait_for(lambda: len(answers) > 5, 60, interval=0.05)
        moved = tmp_path / "current.new"
        moved.symlink_to(versions / "v2")
        moved.replace(current)  # what the index Job does once the new version is written
        time.sleep(2)  # ten looks at the disk: nothing serves the new version yet
        status, ready, _ = call(server.url + "/readyz", None, key=None)
        assert status == 200 and ready["index"]["fingerprint"] != new
        assert "not served yet: the retrieval tier has no node of index" in server.log.read_text()
        status, refused, _ = call(server.url + "/admin/reload", {}, key=None)  # asked, it says why not
        assert status == 503 and "is not served yet: the retrieval tier has no node of index" in refused["error"]["message"]

        started = [start_node(versions / "v2" / "shards-2", tmp_path / "tier" / cluster.NODES_DIR, shard=shard)[0] for shard in (0, 1)]
        wait_for(lambda: call(server.url + "/readyz", None, key=None)[1]["index"]["fingerprint"] == new, 60, interval=0.1)
        seen = len(answers)
        for node in tier["nodes"]:  # the old version's nodes drain
            os.kill(node["pid"], signal.SIGTERM)
        assert _wait_gone([node["pid"] for node in tier["nodes"]]) == []
        wait_for(lambda: len(answers) > seen + 10, 60, interval=0.05)
        with RetrievalClient(tier["coordinator"]["endpoint"]) as coordinator:  # the old version's nodes are forgotten
            wait_for(lambda: [(v["nshards"], v["ready"]) for v in coordinator.info()["versions"].values()] == [(2, True)], 30)
    finally:
        stop.set()
        client.join(timeout=60)
        assert server.stop() == 0
        for node in started:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=30)
        cluster.down(tmp_path / "tier")
    assert all(status == 200 and not partial for status, _, partial in answers), answers
    kinds = [ids for _, ids, _ in answers]
    old, fresh = kinds[0], kinds[-1]
    assert fresh[0] == "quuxar" and "quuxar" not in old
    switched = kinds.index(fresh)
    assert set(kinds[:switched]) == {old} and set(kinds[switched:]) == {fresh}
    assert switched > 5 and len(kinds) - switched > 10


def test_a_killed_server_takes_its_tier_with_it(tmp_path, facts_index, tiny_model):
    server = start_server(tmp_path, "--index", facts_index, "--model", tiny_model, "--shards", 1)
    pids = _tier_pids(server.state_dir)
    assert all(_alive(p) for p in pids)
    server.process.kill()
    server.process.wait()
    assert _wait_gone(pids) == []


def test_serve_restarts_the_tier_processes_that_die_and_gives_up_on_a_corrupt_shard(tmp_path, facts_index, tiny_model):
    """Issue 29 under a bounded search load: a killed node (replicas 1) means partial answers until
    its restart rejoins, a killed coordinator none at all (searches wait for it on the same
    endpoint), a node whose shard is corrupt is given up on with the cause in /readyz while the
    other shard answers, and SIGTERM while a node restarts leaves no process behind."""
    from tests.helpers import chameleon

    server = start_server(tmp_path, "--index", facts_index, "--model", tiny_model, "--shards", 2)
    state_dir = Path(server.state_dir)

    def entry(name: str) -> dict:
        state = json.loads((state_dir / "cluster.json").read_text())
        return state["coordinator"] if name == "coordinator" else next(n for n in state["nodes"] if n["name"] == name)

    question = {"query": "What colour are the oceans of Zorblax-42?", "k": 3}
    whole = call(server.url + "/v1/search", question)[1]["results"]
    answers, done = [], threading.Event()

    def load():
        while not done.is_set():
            sent = time.monotonic()
            status, body, _ = call(server.url + "/v1/search", question)
            answers.append((sent, status, body.get("partial"), body.get("results")))

    def whole_again_after(moment: float, limit: float) -> float:
        """Seconds from ``moment`` to the sending of the first search after it answered whole."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            later = [a for a in answers if a[0] > moment and a[1] == 200 and a[2] is False]
            if later:
                return later[0][0] - moment
            time.sleep(0.1)
        raise AssertionError(f"no whole answer within {limit} s")

    searching = threading.Thread(target=load)
    searching.start()
    try:
        # a retrieval node killed: the shard's answers are missing (partial) until it is back
        node = entry("node-0-0-of-2")
        killed = time.monotonic()
        os.kill(node["pid"], signal.SIGKILL)
        healed = whole_again_after(killed + 0.5, 60)
        print(f"a killed node: whole answers again {healed:.1f} s later")
        assert entry("node-0-0-of-2")["restarts"] == 1 and entry("node-0-0-of-2")["cause"] == "killed by SIGKILL"
        # the coordinator killed: restarted on the same endpoint, the searches it lost sent again
        coordinator = entry("coordinator")
        killed = time.monotonic()
        os.kill(coordinator["pid"], signal.SIGKILL)
        healed = whole_again_after(killed, 60)
        print(f"a killed coordinator: whole answers again {healed:.1f} s later")
        restarted = entry("coordinator")
        assert restarted["restarts"] == 1 and restarted["endpoint"] == coordinator["endpoint"] and restarted["pid"] != coordinator["pid"]
        time.sleep(1.0)
        loaded = list(answers)
        assert len(loaded) > 20 and all(status == 200 for _, status, _, _ in loaded), {a[1] for a in loaded}
        assert all(results == whole for _, _, partial, results in loaded if not partial)
        assert all(not partial for moment, _, partial, _ in loaded if moment > killed)  # none lost a shard to a coordinator's death
        metrics = call(server.url + "/metrics")[1]["text"]
        assert _sample(metrics, "chameleon_tier_restarts_total", tier="retrieval", shard="0") == 1
        assert _sample(metrics, "chameleon_tier_restarts_total", tier="coordinator", shard="") == 1
        # a corrupt shard: its node fails at every start and is given up on; the other shard answers
        codes = state_dir / "index-2-shards" / "shard-001" / "codes.npy"
        codes.write_bytes(codes.read_bytes()[: codes.stat().st_size // 2])
        os.kill(entry("node-1-0-of-2")["pid"], signal.SIGKILL)
        wait_for(lambda: entry("node-1-0-of-2").get("supervision") == "failed", 120, "node-1-0-of-2 given up on", interval=0.5)
        status, ready, _ = call(server.url + "/readyz", key=None)
        assert status == 503 and ready["reason"].startswith("no live node for shard(s) [1]; node-1-0-of-2 failed: exited with status")
        assert "codes.npy" in ready["reason"] and ready["failed"] == [ready["reason"].split("; ", 1)[1]]
        status, body, _ = call(server.url + "/v1/search", question)
        assert status == 200 and body["partial"] is True and body["results"]
        assert _sample(call(server.url + "/metrics")[1]["text"], "chameleon_tier_processes_failed", tier="retrieval", shard="1") == 1
        report = chameleon("cluster", "status", "--state-dir", state_dir).stdout
        assert "node shard 1 replica 0" in report and "FAILED" in report and "restarted 1 time(s)" in report
        # SIGTERM while a node is being restarted: everything stops, nothing is restarted, none left
        os.kill(entry("node-0-0-of-2")["pid"], signal.SIGKILL)
        wait_for(lambda: entry("node-0-0-of-2")["restarts"] >= 2, 10, "node-0-0-of-2 restarting", interval=0.01)
    finally:
        done.set()
        searching.join(120)
        assert server.stop() == 0  # SIGTERM; also when an assertion above failed: no server left behind
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if str(state_dir).encode() in _read(p / "cmdline")]
    assert leftovers == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_server_reloads_its_changed_index_and_tier_while_it_answers(tmp_path, facts_index, embedder, tiny_model):
    import shutil

    from tests.helpers import chameleon

    index = tmp_path / "facts"
    shutil.copytree(facts_index, index)
    (tmp_path / "server").mkdir()
    server = start_server(tmp_path / "server", "--index", index, "--model", tiny_model, "--shards", 2, "--api-key", KEY)
    try:
        first_tier = _tier_pids(server.state_dir)
        assert (Path(server.state_dir) / "index-2-shards").is_dir()  # the index has one shard: the tier serves a re-sharded copy
        question = {"query": "What are the moons of Quibblex-7 made of?", "k": 1}
        assert call(server.url + "/v1/search", question)[1]["results"][0]["doc_id"] != "quibblex"
        assert call(server.url + "/admin/reload", {}, key=None)[0] == 401
        status, body, _ = call(server.url + "/admin/reload", {})
        assert status == 200 and not body["reloaded"] and body["index"]["passages"] == 300

        (tmp_path / "new.jsonl").write_text(
            json.dumps({"id": "quibblex", "title": "Quibblex-7", "text": "The moons of Quibblex-7 are made of solid copper."}) + "\n"
        )
        chameleon("index", "add", "--index", index, "--corpus", tmp_path / "new.jsonl")
        chameleon("index", "remove", "--index", index, "--doc-id", "fact-7")  # the passages after it move up
        planet = {"query": "What colour are the oceans of Zorblax-42?", "k": 3}
        before = call(server.url + "/v1/search", planet)[1]["results"]  # the served version's passage ids: until the switch
        answered, done = [], threading.Event()

        def keep_searching():
            while not done.is_set():
                answered.append(call(server.url + "/v1/search", planet))

        searching = threading.Thread(target=keep_searching)
        searching.start()
        try:
            status, body, _ = call(server.url + "/admin/reload", {})
        finally:
            done.set()
            searching.join(60)
        assert status == 200 and body["reloaded"] and body["index"]["passages"] == 300 and body["stopped_processes"] == 3
        assert body["index"]["state_dir"] != str(server.state_dir) and body["index"]["fingerprint"] != body["previous"]["fingerprint"]
        # searches during the reload were answered by one version or the other, never failed or mixed them
        after = call(server.url + "/v1/search", planet)[1]["results"]
        assert after[0]["doc_id"] == "fact-42" and [h["passage_id"] for h in after] != [h["passage_id"] for h in before]
        assert answered and all(s == 200 and r["results"] in (before, after) for s, r, _ in answered)
        assert _wait_gone(first_tier) == [] and not (Path(server.state_dir) / "index-2-shards").exists()  # the retired copy is gone
        assert call(server.url + "/v1/search", question)[1]["results"][0]["doc_id"] == "quibblex"
        assert (
            call(server.url + "/v1/search", {"query": "What colour are the oceans of Zorblax-7?", "k": 3})[1]["results"][0]["doc_id"]
            != "fact-7"
        )
        status, ready, _ = call(server.url + "/readyz", key=None)
        assert status == 200 and ready["ready"] and ready["index"] == body["index"]
        second_tier = _tier_pids(body["index"]["state_dir"])
        assert all(_alive(p) for p in second_tier)
        (index / "rag.json").unlink()  # not an index any more: refused, and the reloaded version serves on
        status, refused, _ = call(server.url + "/admin/reload", {})
        assert status == 400 and "rag.json" in refused["error"]["message"]
        assert call(server.url + "/v1/search", question)[1]["results"][0]["doc_id"] == "quibblex"
        metrics = call(server.url + "/metrics")[1]["text"]
        assert [_sample(metrics, "chameleon_index_reloads_total", outcome=o) for o in ("unchanged", "reloaded", "refused")] == [1, 1, 1]
        assert _sample(metrics, "chameleon_index_passages") == 300
    finally:
        assert server.stop() == 0
    assert _wait_gone(second_tier) == []


def test_a_server_watching_its_index_serves_a_new_version_by_itself_and_a_damaged_one_never(tmp_path, facts_index, tiny_model):
    import shutil

    from tests.helpers import chameleon

    index = tmp_path / "facts"
    shutil.copytree(facts_index, index)
    (tmp_path / "server").mkdir()
    server = start_server(tmp_path / "server", "--index", index, "--model", tiny_model, "--shards", 0, "--watch-index", 0.2)
    try:
        question = {"query": "What are the moons of Quibblex-7 made of?", "k": 1}
        first = call(server.url + "/readyz", key=None)[1]["index"]["fingerprint"]
        (tmp_path / "new.jsonl").write_text(
            json.dumps({"id": "quibblex", "title": "Quibblex-7", "text": "The moons of Quibblex-7 are made of solid copper."}) + "\n"
        )
        chameleon("index", "add", "--index", index, "--corpus", tmp_path / "new.jsonl")
        wait_for(lambda: call(server.url + "/readyz", key=None)[1]["index"]["fingerprint"] != first, 60, interval=0.1)
        assert call(server.url + "/v1/search", question, key=None)[1]["results"][0]["doc_id"] == "quibblex"
        assert "now serving index" in server.log.read_text()
        # a version that does not open is refused once, logged once, and not tried again
        broken = tmp_path / "broken"
        shutil.copytree(index, broken)
        chameleon("index", "remove", "--index", broken, "--doc-id", "quibblex")
        (broken / "rag.json").unlink()
        index.rename(tmp_path / "served")
        broken.rename(index)
        wait_for(lambda: "not served yet" in server.log.read_text(), 30, interval=0.1)
        time.sleep(1)  # five more looks
        assert server.log.read_text().count("not served yet") == 1
        metrics = call(server.url + "/metrics", key=None)[1]["text"]
        assert [_sample(metrics, "chameleon_index_reloads_total", outcome=o) for o in ("reloaded", "refused")] == [1, 1]
        assert call(server.url + "/v1/search", question, key=None)[1]["results"][0]["doc_id"] == "quibblex"
    finally:
        assert server.stop() == 0


# -- the built-in model, two retrieval shards --------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, facts_index):
    server = start_server(tmp_path_factory.mktemp("real-server"), "--index", facts_index, "--shards", 2, "--speculative")
    yield server
    server.stop()


@pytest.mark.integration
def test_openai_client_chat_completion_and_stream(real_server):
    from openai import OpenAI

    client = OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What colour are the oceans of Zorblax-42?"}]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24)
    content = reply.choices[0].message.content
    assert "blue" in content.lower() and reply.usage.completion_tokens <= 24
    assert reply.model_extra["chameleon"]["sources"][0]["doc_id"] == "fact-42"
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    plain = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=8, extra_body={"rag": False})
    assert plain.model_extra["chameleon"]["sources"] == [] and plain.usage.prompt_tokens < reply.usage.prompt_tokens


@pytest.mark.integration
def test_ask_talks_to_a_running_server(real_server):
    command = [sys.executable, "-m", "chameleon", "ask", "What colour are the oceans of Zorblax-42?", "--json", "--max-tokens", "12"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "CHAMELEON_SERVER": real_server.url})
    answer = json.loads(out.stdout)
    assert answer["sources"][0]["doc_id"] == "fact-42" and answer["timings"]["retrievals"] == 1
    refused = subprocess.run([*command, "--server", real_server.url + "/nowhere"], capture_output=True, text=True)
    assert refused.returncode == 2 and "404" in refused.stderr


@pytest.mark.integration
def test_metrics_move_after_requests(real_server):
    url = real_server.url
    ready = call(url + "/readyz")[1]
    assert ready.pop("index")["passages"] == 300 and ready == {"ready": True, "retrieval": "tier", "shards": 2, "nodes": 2}
    before = call(url + "/metrics")[1]["text"]
    status, body, _ = call(url + "/v1/rag", {"question": "How many moons orbit Zorblax-5?", "max_tokens": 8})
    assert status == 200 and body["sources"][0]["doc_id"] == "fact-5"
    after = call(url + "/metrics")[1]["text"]
    assert (
        _sample(after, "chameleon_requests_total", route="/v1/rag", status="200")
        == _sample(before, "chameleon_requests_total", route="/v1/rag", status="200") + 1
    )
    assert _sample(after, "chameleon_ttft_seconds_count") == _sample(before, "chameleon_ttft_seconds_count") + 1
    assert _sample(after, "chameleon_generated_tokens_total") >= _sample(before, "chameleon_generated_tokens_total") + 1
    for shard in ("0", "1"):
        assert (
            _sample(after, "chameleon_shard_latency_seconds_count", shard=shard)
            == _sample(before, "chameleon_shard_latency_seconds_count", shard=shard) + 1
        )
        assert _sample(after, "chameleon_shard_node_alive", shard=shard) == 1
    computed = _sample(after, "chameleon_kv_cache_tokens_total", source="computed") - _sample(
        before, "chameleon_kv_cache_tokens_total", source="computed"
    )
    assert computed > 0
    again = call(url + "/v1/rag", {"question": "How many moons orbit Zorblax-5?", "max_tokens": 8})[1]
    # the same passages again: their KV comes from the document cache (exactness: tests/test_doc_cache.py)
    assert body["cache"]["cached_tokens"] < again["cache"]["cached_tokens"] < again["cache"]["prompt_tokens"]
    final = call(url + "/metrics")[1]["text"]
    assert _sample(final, "chameleon_kv_cache_tokens_total", source="device_hit") > 0
    assert 0 < _sample(final, "chameleon_kv_cache_hit_rate", tier="device") < 1
    # speculative prefill on the tier's early answer (after half of the lists): one per request, confirmed or not
    speculated = sum(
        _sample(final, "chameleon_speculative_prefills_total", outcome=o)
        - _sample(before, "chameleon_speculative_prefills_total", outcome=o)
        for o in ("confirmed", "restarted")
    )
    assert speculated == 2 and _sample(final, "chameleon_speculative_prefills_total", outcome="started") >= 2


@pytest.mark.integration
def test_sigterm_finishes_in_flight_requests_and_stops_every_process(real_server):
    pids = _tier_pids(real_server.state_dir)
    stream = events(real_server.url + "/v1/rag", {"question": "Describe Zorblax-9.", "max_tokens": 48, "stream": True}, key=None)
    assert next(stream)[0] == "token"
    real_server.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1][0] == "done" and json.loads(rest[-1][1])["sources"][0]["doc_id"] == "fact-9"
    assert real_server.process.wait(timeout=60) == 0
    assert _wait_gone(pids) == []
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(real_server.url + "/healthz", timeout=5)
