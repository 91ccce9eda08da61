"""Continuous batching gives every request the tokens it would get alone (tiny model, float32)."""

import threading
import time

import pytest

from retriever.errors import InvalidInput, Unavailable


def _prompts(engine, n: int) -> list[list[int]]:
    return [engine.chat_tokens([{"role": "user", "content": "tell me " + "more " * (3 * i)}]) for i in range(n)]


def test_batched_greedy_tokens_equal_sequential(tiny32):
    from chameleon.engines.batching import BatchingEngine

    prompts = _prompts(tiny32, 7)
    budgets = [20, 3, 12, 1, 17, 8, 25]  # sequences leave at different steps, waiting ones join mid-run
    alone = [tiny32.generate(p, b) for p, b in zip(prompts, budgets)]
    batching = BatchingEngine(tiny32, max_batch=4)
    try:
        together = [f.result() for f in [batching.submit(p, b) for p, b in zip(prompts, budgets)]]
        assert [g.tokens for g in together] == [g.tokens for g in alone]
        assert batching.largest_batch == 4
        assert [g.finish_reason for g in together] == [g.finish_reason for g in alone]
        # the KV handed back is each sequence's own: continuing from it equals a fresh prefill
        for prompt, generation in zip(prompts, together):
            assert generation.state.tokens == prompt + generation.tokens[:-1]
            follow = prompt + generation.tokens
            assert batching.generate(follow, 4, prefix=generation.state).tokens == tiny32.generate(follow, 4).tokens
        # a cached prefix joins a running batch like any other sequence
        prefix = together[0].state.truncated(len(prompts[0]))
        futures = [batching.submit(prompts[1], 10), batching.submit(prompts[0], 10, prefix=prefix)]
        assert [f.result().tokens for f in futures] == [tiny32.generate(prompts[1], 10).tokens, tiny32.generate(prompts[0], 10).tokens]
        assert futures[1].result().cached_tokens == len(prompts[0])
    finally:
        batching.close()


@pytest.mark.parametrize("share", [True, False])
def test_sequences_start_from_the_prompt_kv_of_running_ones(tiny32, share):
    from chameleon.engines.batching import BatchingEngine
    from chameleon.engines.sampling import Sampling

    prompt = _prompts(tiny32, 4)[3]
    longer = prompt + tiny32.tokenizer(" and then some", add_special_tokens=False)["input_ids"]
    batching = BatchingEngine(tiny32, max_batch=4, share_running_prompts=share)
    try:
        started = threading.Event()
        first = batching.submit(prompt, 30, on_token=lambda token: started.set())
        assert started.wait(60)  # it runs: what comes next may start from its KV
        choices = [batching.submit(prompt, 12, sampling=Sampling(1.0, 1.0, seed).sampler()) for seed in (1, 2)]
        extended = batching.submit(longer, 12)
        got = [f.result(timeout=60) for f in [first, *choices, extended]]
        assert got[0].tokens == tiny32.generate(prompt, 30).tokens
        assert [g.tokens for g in got[1:3]] == [
            tiny32.generate(prompt, 12, sampling=Sampling(1.0, 1.0, seed).sampler()).tokens for seed in (1, 2)
        ]
        assert got[3].tokens == tiny32.generate(longer, 12).tokens
        assert [g.cached_tokens for g in got[1:]] == ([len(prompt)] * 3 if share else [0] * 3)
    finally:
        batching.close()


def test_stop_callback_bad_requests_and_close(tiny32):
    from chameleon.engines.batching import BatchingEngine

    batching = BatchingEngine(tiny32, max_batch=2)
    prompt = _prompts(tiny32, 1)[0]
    seen = []
    generation = batching.generate(prompt, 20, on_token=lambda token: seen.append(token) or len(seen) == 3)
    assert generation.tokens == seen and len(seen) == 3 and generation.finish_reason == "stop"
    with pytest.raises(InvalidInput, match="context window"):
        batching.submit(prompt, tiny32.context_window)
    with pytest.raises(InvalidInput, match="empty"):
        batching.submit([], 4)
    with pytest.raises(InvalidInput, match="cached prefix"):
        batching.submit(prompt[1:], 4, prefix=generation.state)

    def failing(token):
        raise RuntimeError("the client went away")

    alongside = batching.submit(prompt, 30)
    for after in (1, 3):  # a callback that fails at the first token (in admission) or later (in a step)
        calls = []
        doomed = batching.submit(
            prompt, 20, on_token=lambda token, calls=calls, after=after: calls.append(token) or (len(calls) >= after and failing(token))
        )
        with pytest.raises(RuntimeError, match="went away"):
            doomed.result(timeout=60)
    assert alongside.result(timeout=60).tokens == tiny32.generate(prompt, 30).tokens  # its neighbours are untouched
    assert batching.generate(prompt, 5).tokens == tiny32.generate(prompt, 5).tokens  # the engine goes on
    batching.close()
    with pytest.raises(Unavailable, match="closed"):
        batching.submit(prompt, 4)
    with pytest.raises(InvalidInput, match="max_batch"):
        BatchingEngine(tiny32, max_batch=0)


def test_concurrent_rag_answers_equal_sequential_ones(tiny32, facts_index, embedder):
    from chameleon.engines.batching import BatchingEngine
    from chameleon.rag.corpus import RagIndex
    from chameleon.rag.pipeline import RagPipeline

    rag_index = RagIndex(facts_index, embedder.fingerprint)
    questions = [f"What colour are the oceans of Zorblax-{n}?" for n in (3, 42, 77, 150, 299)]
    intervals = [None, 4, None, 2, 7]
    sequential = RagPipeline(rag_index, embedder, tiny32, k=2, nprobe=4)
    expected = [sequential.ask(q, 12, i).answer for q, i in zip(questions, intervals)]
    batching = BatchingEngine(tiny32, max_batch=8)
    pipeline = RagPipeline(rag_index, embedder, batching, k=2, nprobe=4)
    answers = [None] * len(questions)

    def ask(n):
        answers[n] = pipeline.ask(questions[n], 12, intervals[n]).answer

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batching.close()
    assert answers == expected and batching.largest_batch >= 2


def test_cache_aware_admission_order_without_starvation(tiny32):
    from chameleon.engines.batching import BatchingEngine

    prompts = _prompts(tiny32, 4)
    long_prefix = tiny32.generate(prompts[3], 1).state  # the KV of a long prompt: its followers reuse most of it
    short_prefix = long_prefix.truncated(len(prompts[3]) // 3)
    follow = prompts[3] + prompts[0][1:]
    for window, expected in ((4, ["most", "some", "none"]), (1, ["most", "none", "some"])):
        batching = BatchingEngine(tiny32, max_batch=1, reorder_window=window)
        started = []

        def first_token(name):
            return lambda token: started.append(name) if name not in started else None

        busy = batching.submit(prompts[2], 300, on_token=first_token("busy"))  # holds the only place meanwhile
        while not started:
            time.sleep(0.001)
        futures = [
            batching.submit(prompts[1], 2, on_token=first_token("none")),
            batching.submit(follow, 2, prefix=short_prefix, on_token=first_token("some")),
            batching.submit(follow, 2, prefix=long_prefix, on_token=first_token("most")),
        ]
        for future in [busy, *futures]:
            future.result()
        batching.close()
        assert busy.result().finish_reason == "length" and started == ["busy", *expected]
