"""Speculative prefill on the retrieval tier's early top-k: the policy, and answers that never change."""

import threading
from types import SimpleNamespace

import pytest

from coordinator.speculation import SpeculativePrefill
from retriever.errors import InvalidInput

QUESTIONS = [f"What colour are the oceans of Zorblax-{n}?" for n in (42, 7, 42, 150, 7, 299)] + ["Which planet has two moons?"]


def test_places_are_bounded_and_a_busy_engine_is_not_given_speculation():
    busy = threading.Event()
    policy = SpeculativePrefill(limit=2, busy=busy.is_set)
    assert policy.begin() and policy.begin()
    assert not policy.begin()  # both places taken
    assert policy.end([1, 2, 3], [1, 2, 3]) is True  # the final prompt is the speculated one
    busy.set()
    assert not policy.begin()  # requests wait for the engine: a wasted prefill would delay them
    busy.clear()
    assert policy.begin()
    assert policy.end([1, 2, 3], [1, 2, 4]) is False and policy.end([1, 2], [1, 2, 3]) is False  # restart on any change
    assert policy.stats == {"started": 3, "declined": 2, "confirmed": 1, "restarted": 2}


def test_the_early_answer_comes_after_a_share_of_the_lists():
    policy = SpeculativePrefill(early_fraction=0.25)
    assert [policy.early_lists(n) for n in (1, 2, 4, 5, 16, 100)] == [None, 1, 1, 2, 4, 25]
    assert SpeculativePrefill(early_fraction=0.99).early_lists(4) == 3  # always a list left for the second stage
    for bad in ({"limit": 0}, {"early_fraction": 0}, {"early_fraction": 1.0}):
        with pytest.raises(InvalidInput):
            SpeculativePrefill(**bad)


@pytest.fixture(scope="module")
def plain_answers(rag_index, embedder, tiny32):
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4)
    return [pipeline.ask(q, 8) for q in QUESTIONS]


class _Deferred:
    """A task that runs when its result is asked for: the speculative prefill starts only once the
    final top-k is known, so that a restarted one is always cancelled before its first chunk."""

    def __init__(self, task, args):
        self.task, self.args = task, args

    def result(self):
        return self.task(*self.args)

    def exception(self):
        try:
            self.result()
        except Exception as e:  # noqa: BLE001
            return e


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("early_fraction, expected", [(0.25, "restarted"), (0.5, "confirmed")])  # early after 1 or 2 of 4 lists
def test_speculative_answers_equal_plain_ones_confirmed_or_restarted(
    cached, early_fraction, expected, rag_index, embedder, tiny32, plain_answers
):
    from chameleon.rag.doc_cache import DocumentKVCache, kv_bytes_per_token
    from chameleon.rag.pipeline import RagPipeline

    doc_cache = DocumentKVCache(tiny32, "lru", 100_000 * kv_bytes_per_token(tiny32), 0) if cached else None
    speculation = SpeculativePrefill(early_fraction=early_fraction)
    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4, doc_cache=doc_cache, speculation=speculation)
    pipeline._speculator = SimpleNamespace(submit=lambda task, *args: _Deferred(task, args))
    calls = []  # (prompt length, cached prefix length, finish reason) of every generate call, in order

    def generate(tokens, max_new_tokens, prefix=None, on_token=None, cancelled=None, sampling=None):
        generation = tiny32.generate(tokens, max_new_tokens, prefix, on_token, cancelled, sampling)
        calls.append((len(tokens), len(prefix.tokens) if prefix is not None else 0, generation.finish_reason))
        return generation

    pipeline.engine = SimpleNamespace(
        generate=generate, tokenizer=tiny32.tokenizer, context_window=tiny32.context_window, eos_ids=tiny32.eos_ids
    )
    answers = []
    for question in QUESTIONS:
        calls.clear()
        answers.append(pipeline.ask(question, 8))
        (speculated, speculative_prefix, ended), (prompt, resumed, _) = calls  # the speculative prefill, then the answer
        if answers[-1].timings.speculation == "confirmed":
            assert resumed == prompt == speculated and ended != "cancelled"  # the answer starts from the speculative prefill's KV
        else:
            assert ended == "cancelled"  # cut short: its prompt was known to be wrong before it began
            assert resumed < prompt and resumed <= max(speculative_prefix, answers[-1].timings.reused_kv_tokens)
    assert [a.answer for a in answers] == [a.answer for a in plain_answers]
    assert [a.sources for a in answers] == [a.sources for a in plain_answers]
    verdicts = [a.timings.speculation for a in answers]
    assert expected in verdicts, verdicts  # with one list the early top-k is mostly wrong; with two, mostly right
    assert speculation.stats["started"] == len(QUESTIONS) and speculation.stats["restarted"] == verdicts.count("restarted")
    if not cached:
        assert all(a.timings.reused_kv_tokens == 0 for a in answers)  # reuse within the request is not cache reuse


def test_a_restart_resumes_from_what_the_cut_speculation_computed(rag_index, embedder, tiny32, plain_answers, monkeypatch):
    """Cut short after its first chunk (16 tokens, inside the template), the speculative prefill's
    KV is where the answer's prefill starts."""
    from chameleon.rag.pipeline import RagPipeline

    monkeypatch.setattr("chameleon.engines.torch_engine.PREFILL_CHUNK", 16)

    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4, speculation=SpeculativePrefill(early_fraction=0.25))
    pipeline._speculator = SimpleNamespace(submit=lambda task, *args: _Deferred(task, args))
    calls = []

    def generate(tokens, max_new_tokens, prefix=None, on_token=None, cancelled=None, sampling=None):
        asked = []
        after_a_chunk = (lambda: asked.append(1) or (len(asked) > 1 and cancelled())) if cancelled is not None else None
        generation = tiny32.generate(tokens, max_new_tokens, prefix, on_token, after_a_chunk, sampling)
        calls.append((len(prefix.tokens) if prefix is not None else 0, generation))
        return generation

    pipeline.engine = SimpleNamespace(
        generate=generate, tokenizer=tiny32.tokenizer, context_window=tiny32.context_window, eos_ids=tiny32.eos_ids
    )
    restarted = 0
    for question, plain in zip(QUESTIONS, plain_answers):
        calls.clear()
        answer = pipeline.ask(question, 8)
        assert answer.answer == plain.answer
        if answer.timings.speculation == "restarted":
            (_, speculative), (resumed, _) = calls
            assert speculative.finish_reason == "cancelled" and len(speculative.state.tokens) == 16 == resumed
            restarted += 1
    assert restarted


def test_a_failed_retrieval_gives_the_speculation_place_back(rag_index, embedder, tiny32):
    from chameleon.rag.pipeline import RagPipeline

    speculation = SpeculativePrefill()
    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4, speculation=speculation)
    final = pipeline.retrieval.scan_staged

    def failing_final(*args):
        staged = final(*args)
        staged.final = lambda: (_ for _ in ()).throw(InvalidInput("the tier went away"))
        return staged

    pipeline.retrieval.scan_staged = failing_final
    with pytest.raises(InvalidInput, match="went away"):
        pipeline.ask(QUESTIONS[0], 4)
    pipeline.retrieval.scan_staged = final
    assert speculation.stats["restarted"] == 1
    assert pipeline.ask(QUESTIONS[0], 4).timings.speculation in ("confirmed", "restarted")  # the place is free again
