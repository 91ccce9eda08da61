"""The document KV cache changes how much is prefilled, never what is generated."""

import threading

import pytest

from coordinator.kv_cache import POLICIES
from coordinator.prefill_profile import PrefillProfile

PROFILE = PrefillProfile(cached=[0, 512], new=[16, 512], table=[[0.01, 0.2], [0.012, 0.25]])
# Documents that come back in different combinations and orders, as hot documents do.
QUESTIONS = [f"What colour are the oceans of Zorblax-{n}?" for n in (42, 7, 42, 150, 7, 42, 299, 150, 42, 7)]


@pytest.fixture(scope="module")
def rag_index(facts_index, embedder):
    from chameleon.corpus import RagIndex

    return RagIndex(facts_index, embedder.fingerprint)


@pytest.fixture(scope="module")
def uncached(rag_index, embedder, tiny32):
    from chameleon.rag import RagPipeline

    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4)
    return [pipeline.ask(q, 10).answer for q in QUESTIONS]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("device_tokens", [100_000, 140])  # room for everything; for the template and ~3 documents
def test_cached_answers_equal_uncached_ones_token_for_token(policy, device_tokens, rag_index, embedder, tiny32, uncached):
    from chameleon.doc_cache import DocumentKVCache
    from chameleon.rag import RagPipeline

    cache = DocumentKVCache(tiny32, policy, device_tokens * _bytes(tiny32), 600 * _bytes(tiny32), PROFILE)
    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4, doc_cache=cache)
    answers = [pipeline.ask(q, 10) for q in QUESTIONS]
    assert [a.answer for a in answers] == uncached
    assert cache.stats["device_hit_tokens"] + cache.stats["host_hit_tokens"] > 0
    assert sum(a.timings["reused_kv_tokens"] for a in answers[1:]) >= (len(QUESTIONS) - 1) * len(cache.template)
    if device_tokens == 140:
        assert any(n.tier == "host" for n in cache.tree.nodes())  # evictions went through the host tier


def test_other_templates_bypass_and_concurrent_requests_stay_exact(rag_index, embedder, tiny32, uncached):
    from chameleon.batching import BatchingEngine
    from chameleon.doc_cache import DocumentKVCache
    from chameleon.rag import RagPipeline

    batching = BatchingEngine(tiny32, max_batch=4)
    cache = DocumentKVCache(batching, "pgdsf", 100_000 * _bytes(tiny32), 0, PROFILE)
    assert cache.lookup([tiny32.chat_tokens([{"role": "user", "content": "no passages"}])], []) == (None, None)
    assert cache.tree is None  # a prompt without passages does not become the template
    pipeline = RagPipeline(rag_index, embedder, batching, k=3, nprobe=4, doc_cache=cache)
    answers = [None] * len(QUESTIONS)

    def ask(n):
        answers[n] = pipeline.ask(QUESTIONS[n], 10).answer

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == uncached
    pipeline.ask(QUESTIONS[0], 4, system="You answer in French.")
    assert cache.stats["bypassed"] == 2
    batching.close()


def _bytes(engine) -> int:
    from chameleon.doc_cache import kv_bytes_per_token

    return kv_bytes_per_token(engine)


def test_documents_admitted_but_never_filled_are_filled_by_the_next_request(rag_index, tiny32):
    from chameleon.doc_cache import DocumentKVCache
    from chameleon.rag import prompt_segments

    passages = rag_index.passages[:3]
    segments = prompt_segments(tiny32, "Which planet?", passages)
    ids = [str(p.id) for p in passages]
    cache = DocumentKVCache(tiny32, "lru", 100_000 * _bytes(tiny32), 0)
    prefix, first = cache.lookup(segments, ids)  # admitted, but its request never stores the KV (say it failed)
    assert prefix is None and len(first.inserted) == 3
    prefix, second = cache.lookup(segments, ids)  # resident in the tree, no KV: computed again, and kept
    assert prefix is None and [n.path[-1] for n in second.inserted] == ids
    tokens = [t for s in segments for t in s]
    cache.keep(second, segments, tiny32.generate(tokens, 1).state)
    prefix, third = cache.lookup(segments, ids)
    assert prefix.tokens == [t for s in segments[:-1] for t in s] and third.inserted == []
    assert tiny32.generate(tokens, 6, prefix=prefix).tokens == tiny32.generate(tokens, 6).tokens
