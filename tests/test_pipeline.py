"""Iterative retrieval pipelined with decoding (coordinator.pipeline), on kNN-LM: the float32 tiny
model, a datastore of its own hidden states, searched in process and through a real cluster."""

import numpy as np
import pytest

from chameleon import cluster
from chameleon.rag.corpus import Document
from retriever.errors import InvalidInput

TEXT = " ".join(f"Record {n}: the valve on deck {n % 7} opens at pressure {n * 13 % 50} bar." for n in range(80))
PROMPTS = ["Record 12: the valve", "deck 3", "Record 40: the valve on deck 5 opens at", "pressure", "Record", "the valve on deck 2"]


@pytest.fixture(scope="module")
def datastore(tmp_path_factory, tiny32):
    from chameleon.rag.knnlm import build_datastore

    out = tmp_path_factory.mktemp("pipeline") / "store"
    with pytest.warns(UserWarning, match="training PQ on"):
        build_datastore([Document("d", "valves", TEXT, "test")], tiny32, out, nlist=8, m=4)
    return out


@pytest.fixture(scope="module")
def prompts(tiny32):
    return [tiny32.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def knnlm(tiny32, datastore):
    from chameleon.rag.knnlm import KnnLm

    return KnnLm.open(datastore, tiny32, k=8, lam=0.7, temperature=10.0, nprobe=4)


@pytest.fixture(scope="module")
def tier(tmp_path_factory, datastore):
    state_dir = tmp_path_factory.mktemp("pipeline-cluster")
    cluster.up(datastore / "index", 2, state_dir)
    yield state_dir
    cluster.down(state_dir)


@pytest.mark.parametrize("every", [1, 3])
def test_pipelined_tokens_equal_sequential_and_single_sequence_ones(tiny32, knnlm, prompts, every):
    from chameleon.rag.knnlm import generate, generate_batch

    sequential = generate_batch(tiny32, knnlm, prompts, 10, every, "sequential")
    pipelined = generate_batch(tiny32, knnlm, prompts, 10, every, "pipelined")
    assert pipelined == sequential
    assert sequential == [generate(tiny32, knnlm, prompt, 10, every=every) for prompt in prompts]
    assert sequential == [_reference(tiny32, knnlm, prompt, 10, every) for prompt in prompts]
    lm_alone = generate_batch(tiny32, knnlm, prompts, 10, None, "pipelined")
    assert lm_alone == [tiny32.generate(prompt, 10).tokens for prompt in prompts]
    assert lm_alone != pipelined  # the retrieval decides tokens: equality above is not vacuous


def test_sampled_sequences_draw_on_their_own_from_the_mixture(tiny32, knnlm, prompts):
    from dataclasses import replace

    from chameleon.engines.sampling import Sampling
    from chameleon.rag.knnlm import generate, generate_batch

    def samplers():  # every other sequence sampled, each from its own seed
        return [Sampling(0.7, seed=n).sampler() if n % 2 == 0 else None for n in range(len(prompts))]

    sequential = generate_batch(tiny32, knnlm, prompts, 10, 1, "sequential", sampling=samplers())
    assert generate_batch(tiny32, knnlm, prompts, 10, 1, "pipelined", sampling=samplers()) == sequential
    assert sequential[0] == generate(tiny32, knnlm, prompts[0], 10, sampling=Sampling(0.7, seed=0).sampler())
    greedy = generate_batch(tiny32, knnlm, prompts, 10, 1, "sequential")
    assert sequential[1::2] == greedy[1::2] and sequential[::2] != greedy[::2]
    # lambda 1: the distribution is the neighbours' alone, so every drawn token is a datastore value
    values = set(knnlm.values.tolist())
    drawn = generate_batch(tiny32, replace(knnlm, lam=1.0), prompts, 10, 1, "sequential", sampling=samplers())
    assert all(t in values for tokens in drawn[::2] for t in tokens)
    lm_alone = generate_batch(tiny32, replace(knnlm, lam=0.0), prompts, 10, 1, "sequential", sampling=samplers())
    assert not all(t in values for tokens in lm_alone[::2] for t in tokens)  # the test above is not vacuous
    with pytest.raises(InvalidInput, match="samplers"):
        generate_batch(tiny32, knnlm, prompts, 4, sampling=[None])


def test_through_the_tier_equals_in_process(tiny32, knnlm, datastore, prompts, tier):
    from chameleon.rag.knnlm import KnnLm, generate_batch

    remote = KnnLm.open(datastore, tiny32, cluster=tier, k=8, lam=0.7, temperature=10.0, nprobe=4)
    try:
        expected = generate_batch(tiny32, knnlm, prompts, 8, 1, "sequential")
        assert generate_batch(tiny32, remote, prompts, 8, 1, "pipelined") == expected
        assert generate_batch(tiny32, remote, prompts, 8, 1, "sequential") == expected
    finally:
        remote.searcher.close()


def _reference(engine, knnlm, prompt, max_new_tokens, every):
    """kNN-LM greedy decoding the plain way: the whole sequence through the model at every step."""
    from chameleon.rag.knnlm import hidden_states

    tokens = list(prompt)
    for step in range(max_new_tokens):
        states, log_probs = hidden_states(engine, tokens)
        if step % every == 0:
            log_probs = knnlm.log_probs(states[-1:], log_probs[-1:])
        tokens.append(int(log_probs[-1].argmax()))
        if tokens[-1] in engine.eos_ids:
            break
    return tokens[len(prompt) :]


class _Recorded:
    """Real micro-batches and retrieval, with each call written to a shared log."""

    def __init__(self, knnlm, log):
        self.knnlm, self.log = knnlm, log

    def batch(self, engine, lane, prompts):
        from chameleon.rag.knnlm import HiddenStateBatch

        inner, log = HiddenStateBatch(engine, prompts), self.log

        class Batch:
            def prefill(self):
                log.append(("forward", lane))
                return inner.prefill()

            def step(self, tokens):
                log.append(("forward", lane))
                return inner.step(tokens)

            def keep(self, rows):
                inner.keep(rows)

        return Batch()

    def submit(self, queries):
        lane = len(queries)  # the lanes below differ in size
        self.log.append(("send", lane))
        pending = self.knnlm.submit(queries)

        def wait():
            self.log.append(("wait", lane))
            return pending()

        return wait

    def next_tokens(self, scores, neighbours, sampling=None):
        return self.knnlm.next_tokens(scores, neighbours, sampling)


def test_each_search_is_sent_at_once_and_awaited_after_the_other_micro_batch_ran(tiny32, knnlm, prompts):
    from coordinator import pipeline

    log = []
    recorded = _Recorded(knnlm, log)

    def open_batch(group):  # a lane is known by its size: 3 and 2 rows
        return recorded.batch(tiny32, len(group), group)

    tokens = pipeline.generate(prompts[:5], open_batch, recorded, 6, set(), interval=1, micro_batches=2)
    assert [len(t) for t in tokens] == [6] * 5
    assert log[:4] == [("forward", 3), ("send", 3), ("forward", 2), ("send", 2)]
    waits = [n for n, event in enumerate(log) if event[0] == "wait"]
    assert len(waits) == 12
    for n, event in enumerate(log):
        if event[0] == "forward":
            assert log[n + 1] == ("send", event[1])  # the query leaves as soon as it is known
    for n in waits[:-1]:  # since this lane's search left, the other lane ran a forward pass
        lane = log[n][1]  # (but for the very last wait: the other lane has finished)
        sent = max(i for i in range(n) if log[i] == ("send", lane))
        assert ("forward", 5 - lane) in log[sent:n]

    log.clear()
    pipeline.generate(prompts[:5], open_batch, recorded, 4, set(), interval=1, micro_batches=1)
    assert log[:4] == [("forward", 5), ("send", 5), ("wait", 5), ("forward", 5)]


def test_sequences_end_on_their_own(tiny32, knnlm, prompts):
    from chameleon.rag.knnlm import generate_batch

    full = generate_batch(tiny32, knnlm, prompts, 8, 1, "pipelined")
    seen = []

    def stop_third_after_two(sequence, token):
        seen.append((sequence, token))
        return sequence == 2 and sum(1 for s, _ in seen if s == 2) == 2

    stopped = generate_batch(tiny32, knnlm, prompts, 8, 1, "pipelined", stop_third_after_two)
    assert stopped[2] == full[2][:2]
    assert [t for n, t in enumerate(stopped) if n != 2] == [t for n, t in enumerate(full) if n != 2]
    assert sorted(seen) == sorted((n, t) for n, tokens in enumerate(stopped) for t in tokens)
    # an end token ends its sequence only: make the first sequence's third token an end token
    from chameleon.rag.knnlm import HiddenStateBatch
    from coordinator import pipeline

    ended = pipeline.generate(prompts, lambda g: HiddenStateBatch(tiny32, g), knnlm, 8, {full[0][2]}, 1, 2)
    assert ended[0] == full[0][: full[0].index(full[0][2]) + 1]
    assert all(len(t) == 8 or full[0][2] in t for t in ended)


def test_bad_input(tiny32, knnlm, prompts):
    from chameleon.rag.knnlm import generate_batch

    with pytest.raises(InvalidInput, match="at least one token"):
        generate_batch(tiny32, knnlm, [prompts[0], []], 4)
    with pytest.raises(InvalidInput, match="at least one token"):
        generate_batch(tiny32, knnlm, [], 4)
    with pytest.raises(InvalidInput, match="interval must be at least 1"):
        generate_batch(tiny32, knnlm, prompts, 4, 0)
    with pytest.raises(InvalidInput, match="schedule must be one of"):
        generate_batch(tiny32, knnlm, prompts, 4, 1, "tik-tok")
    with pytest.raises(InvalidInput, match="context window"):
        generate_batch(tiny32, knnlm, prompts, tiny32.context_window)


def test_client_answers_out_of_order_requests(tier, datastore):
    from coordinator.client import RetrievalClient
    from retriever.index import load_index
    from retriever.search import Searcher

    searcher = cluster.ClusterSearcher.open(tier)
    local = Searcher(load_index(datastore / "index"), device="cpu")
    rng = np.random.default_rng(0)
    queries = [rng.standard_normal((n, local.params.dim)).astype(np.float32) for n in (3, 5, 2)]
    try:
        waits = [searcher.submit(q, 4, 4) for q in queries]
        for n in (2, 0, 1):  # answers are matched to their requests whatever the order of waiting
            got, expected = waits[n](), local.search(queries[n], 4, 4)
            np.testing.assert_array_equal(got.ids, expected.ids)
            np.testing.assert_allclose(got.distances, expected.distances, rtol=1e-5)
        with pytest.raises(InvalidInput, match="no request"):
            waits[0]()  # each answer is handed out once
        client = searcher.client
        assert isinstance(client, RetrievalClient) and not client._outstanding and not client._replies
    finally:
        searcher.close()


def test_bench_pipeline_command_line(tmp_path, tiny32):
    import json
    import os
    import subprocess
    import sys

    corpus = tmp_path / "valves.jsonl"
    corpus.write_text("".join(json.dumps({"id": n, "text": TEXT[n * 40 :]}) + "\n" for n in range(10)))
    out = tmp_path / "pipeline.json"
    command = [
        sys.executable,
        "-m",
        "chameleon",
        "bench",
        "pipeline",
        "--model",
        tiny32.model.config._name_or_path,
        "--corpus",
        corpus,
        "--datastore-tokens",
        3000,
        "--batch",
        4,
        "--prompt-tokens",
        8,
        "--tokens",
        6,
        "--intervals",
        "1,3",
        "--nprobe",
        4,
        "--repeats",
        1,
        "--json",
        out,
    ]
    env = {**os.environ, "CHAMELEON_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [(r["interval"], r["schedule"]) for r in report["rows"]] == [
        (None, "none"),
        (1, "sequential"),
        (1, "pipelined"),
        (3, "sequential"),
        (3, "pipelined"),
    ]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 4 * 6 for r in report["rows"])
    assert all(r["same_tokens"] for r in report["rows"] if r["schedule"] == "pipelined")
    assert set(report["speedup"]) == {"1", "3"}
    assert report["setting"]["batch"] == 4 and report["setting"]["datastore_keys"] > 1000
    assert "pipelined / sequential" in result.stdout
    assert list((tmp_path / "cache" / "knnlm").iterdir())  # the datastore is kept for the next run
    bad = subprocess.run([str(c) for c in command[:7]] + ["--json", str(out), "--intervals", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--intervals >= 1" in bad.stderr and "Traceback" not in bad.stderr
