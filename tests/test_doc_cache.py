"""The document KV cache changes how much is prefilled, never what is generated."""

import threading

import pytest

from coordinator.kv_cache import POLICIES
from coordinator.prefill_profile import PrefillProfile

PROFILE = PrefillProfile(cached=[0, 512], new=[16, 512], table=[[0.01, 0.2], [0.012, 0.25]])
# Documents that come back in different combinations and orders, as hot documents do.
QUESTIONS = [f"What colour are the oceans of Zorblax-{n}?" for n in (42, 7, 42, 150, 7, 42, 299, 150, 42, 7)]


@pytest.fixture(scope="module")
def uncached(rag_index, embedder, tiny32):
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4)
    return [pipeline.ask(q, 10).answer for q in QUESTIONS]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("device_tokens", [100_000, 140])  # room for everything; for the template and ~3 documents
def test_cached_answers_equal_uncached_ones_token_for_token(policy, device_tokens, rag_index, embedder, tiny32, uncached):
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import RagPipeline

    cache = DocumentKVCache(tiny32, policy, device_tokens * _bytes(tiny32), 600 * _bytes(tiny32), PROFILE)
    pipeline = RagPipeline(rag_index, embedder, tiny32, k=3, nprobe=4, doc_cache=cache)
    answers = [pipeline.ask(q, 10) for q in QUESTIONS]
    assert [a.answer for a in answers] == uncached
    assert cache.stats["device_hit_tokens"] + cache.stats["host_hit_tokens"] > 0
    assert sum(a.timings.reused_kv_tokens for a in answers[1:]) >= (len(QUESTIONS) - 1) * len(cache.template)
    if device_tokens == 140:
        assert any(n.tier == "host" for n in cache.tree.nodes())  # evictions went through the host tier


def test_other_templates_bypass_and_concurrent_requests_stay_exact(rag_index, embedder, tiny32, uncached):
    from chameleon.engines.batching import BatchingEngine
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import RagPipeline

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
    from chameleon.rag.doc_cache import kv_bytes_per_token

    return kv_bytes_per_token(engine)


def test_documents_admitted_but_never_filled_are_filled_by_the_next_request(rag_index, tiny32):
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import prompt_segments

    passages = rag_index.passages[:3]
    segments = prompt_segments(tiny32, "Which planet?", passages)
    ids = [str(p.id) for p in passages]
    cache = DocumentKVCache(tiny32, "lru", 100_000 * _bytes(tiny32), 0)
    prefix, first = cache.lookup(segments, ids)  # admitted, but its request never stores the KV (say it failed)
    assert prefix is None and len(first.inserted) == 3
    prefix, second = cache.lookup(segments, ids)  # resident in the tree, no KV: computed again, and kept
    assert prefix is None and [n.path[-1] for n in second.inserted] == ids
    tokens = [t for s in segments for t in s]
    cache.keep(second, segments, tiny32.generate(tokens, 1))
    prefix, third = cache.lookup(segments, ids)
    assert prefix.tokens == [t for s in segments[:-1] for t in s] and third.inserted == []
    assert tiny32.generate(tokens, 6, prefix=prefix).tokens == tiny32.generate(tokens, 6).tokens


def test_a_cancelled_prefill_fills_only_the_documents_it_reached(rag_index, tiny32):
    from itertools import accumulate

    from chameleon.engines.base import cancelled_generation
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import prompt_segments

    passages = rag_index.passages[:3]
    segments = prompt_segments(tiny32, "Which planet?", passages)
    ids, tokens, ends = [str(p.id) for p in passages], [t for s in segments for t in s], list(accumulate(map(len, segments)))
    cache = DocumentKVCache(tiny32, "lru", 100_000 * _bytes(tiny32), 0)
    _, first = cache.lookup(segments, ids)
    reached, _ = tiny32.prefill(tokens[: ends[1] + 1])  # cancelled one token into the second document
    cache.keep(first, segments, cancelled_generation(tokens, None, reached, 0.1))
    prefix, second = cache.lookup(segments, ids)
    assert prefix.tokens == tokens[: ends[1]] and [n.path[-1] for n in second.inserted] == ids[1:]
    cache.keep(second, segments, tiny32.generate(tokens, 1, prefix=prefix))
    prefix, third = cache.lookup(segments, ids)
    assert prefix.tokens == tokens[: ends[-2]] and third.inserted == []
    assert tiny32.generate(tokens, 6, prefix=prefix).tokens == tiny32.generate(tokens, 6).tokens


def test_a_cached_head_too_short_to_pay_is_not_used(tiny32):
    from chameleon.rag.doc_cache import DocumentKVCache

    template, question = list(range(100, 140)), list(range(500, 510))
    docs = {doc: list(range(start, start + 300)) for doc, start in (("a", 1000), ("b", 2000))}
    cache = DocumentKVCache(tiny32, "lru", 100_000 * _bytes(tiny32), 0)

    def ask(doc):
        segments = [template, docs[doc], question]
        prefix, access = cache.lookup(segments, [doc])
        tokens = [t for segment in segments for t in segment]
        cache.keep(access, segments, tiny32.generate(tokens, 1, prefix=prefix))
        return prefix

    assert ask("a") is None  # nothing held yet
    assert ask("b") is None  # only the template (40 of 350 tokens): computing it costs less than continuing from it
    assert cache.stats["computed_tokens"] == 2 * 310 and cache.stats["device_hit_tokens"] == 0
    assert ask("a").tokens == template + docs["a"]  # the template and a document: worth it
    assert cache.stats["device_hit_tokens"] == 300


# -- the tree over vLLM's prefix cache: a vLLM reply is a Generation with vLLM's cached_tokens --------

BLOCK = 16
TEMPLATE = list(range(1000, 1020))  # 20 tokens: one whole block and 4 more
DOCS = {doc: [n] * 16 for n, doc in enumerate("abcde")}  # 16 tokens each


def vllm_segments(docs: str, question: int = 5) -> list[list[int]]:
    return [TEMPLATE, *(DOCS[doc] for doc in docs), [7] * question]


def vllm_reply(segments: list[list[int]], cached: int, answered: int = 0):
    """What ``VllmEngine`` returns for this prompt (plus ``answered`` tokens of an earlier step) when vLLM reused ``cached`` tokens."""
    from chameleon.engines.base import Generation

    prompt = sum(map(len, segments)) + answered
    return Generation(
        tokens=[3],
        text="",
        prompt_tokens=prompt,
        cached_tokens=cached,
        ttft_s=0.01,
        decode_tokens_per_s=1.0,
        finish_reason="length",
        state=None,
    )


def vllm_request(cache, docs: str, cached: int) -> None:
    segments = vllm_segments(docs)
    prefix, access = cache.lookup(segments, list(docs))
    assert prefix is None
    cache.keep(access, segments, vllm_reply(segments, cached))


def paths(cache) -> set:
    return {n.path for n in cache.tree.nodes()}


def test_the_vllm_tree_counts_what_vllm_reused_and_orders_documents_by_it():
    from chameleon.rag.doc_cache import VllmDocumentCache

    cache = VllmDocumentCache(BLOCK, device_bytes=1000 * 8, bytes_per_token=8)
    assert cache.order(["b", "a"]) == [0, 1]  # no tree yet: retrieval order
    vllm_request(cache, "ab", cached=0)
    assert cache.order(["c", "b", "a"]) == [2, 1, 0] and cache.order(["c", "b"]) == [0, 1]
    vllm_request(cache, "ac", cached=32)  # held: template and a (36 tokens), so two whole blocks
    vllm_request(cache, "ab", cached=48)
    assert paths(cache) == {(), ("a",), ("a", "b"), ("a", "c")}
    assert cache.stats == {"lookups": 3, "bypassed": 0, "device_hit_tokens": 80, "host_hit_tokens": 0, "computed_tokens": 3 * 57 - 80}
    segments = vllm_segments("ab")
    _, access = cache.lookup(segments, ["a", "b"])
    cache.keep(access, segments, vllm_reply(segments, 0, answered=8))  # a later step of the answer: another prompt
    assert cache.stats["device_hit_tokens"] == 80 and paths(cache) == {(), ("a",), ("a", "b"), ("a", "c")}
    assert cache.lookup([TEMPLATE, [7] * 5], []) == (None, None)  # no passages
    assert cache.lookup([[1, 2], DOCS["a"], [7]], ["a"]) == (None, None)  # another template
    assert cache.stats["lookups"] == 4 and cache.stats["bypassed"] == 2


@pytest.mark.parametrize(
    "cached, left",
    [
        (48, {"ab", "ac", "e"}),  # all the whole blocks the tree held: nothing evicted
        (64, {"ab", "ac", "e"}),  # more than the tree held (it had evicted what vLLM kept): nothing to forget
        (32, {"ab", "e"}),  # the block of a's end: a's other subtrees went before it (vLLM evicts children first)
        (16, {"ab"}),  # the template's second block: everything else went before it
        (0, {"ab"}),
    ],
)
def test_what_vllm_evicted_on_its_own_leaves_the_tree(cached, left):
    from chameleon.rag.doc_cache import VllmDocumentCache

    cache = VllmDocumentCache(BLOCK, device_bytes=1000 * 8, bytes_per_token=8)
    for docs, reused in (("ab", 0), ("ac", 32), ("e", 16)):  # all vLLM could reuse of what the tree held
        vllm_request(cache, docs, reused)
    vllm_request(cache, "ab", cached=cached)  # the tree held template, a and b: 52 tokens, 48 in whole blocks
    expected = {()} | {tuple(path[:n]) for path in left for n in range(1, len(path) + 1)}
    assert paths(cache) == expected  # the request's own path stays: vLLM computed it again
    assert cache.tree.used["device"] == 8 * (20 + 16 * (len(expected) - 1))
    assert cache.order(["e", "b", "a"]) == ([0, 1, 2] if "e" in left else [2, 1, 0])  # e, or the path a → b


def test_the_torch_cache_orders_documents_only_when_asked(rag_index, tiny32):
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import prompt_segments

    passages = rag_index.passages[:2]
    ids = [str(p.id) for p in passages]
    for canonical, expected in ((False, [0, 1]), (True, [1, 0])):
        cache = DocumentKVCache(tiny32, "lru", 100_000 * _bytes(tiny32), 0, canonical_order=canonical)
        cache.lookup(prompt_segments(tiny32, "Which planet?", passages[1:]), ids[1:])
        assert cache.order(ids) == expected


def test_cached_documents_follow_their_text_across_a_reload_that_renumbers_passages(facts_index, embedder, tiny32, tmp_path):
    import shutil

    from chameleon.rag.corpus import RagIndex, remove_from_rag_index
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.pipeline import RagPipeline
    from retriever.search import Searcher

    index = tmp_path / "facts"
    shutil.copytree(facts_index, index)
    cache = DocumentKVCache(tiny32, "pgdsf", 100_000 * _bytes(tiny32), 0, PROFILE)
    pipeline = RagPipeline(RagIndex(index, embedder.fingerprint), embedder, tiny32, k=3, nprobe=4, doc_cache=cache)
    for question in QUESTIONS:
        pipeline.ask(question, 10)
    remove_from_rag_index(index, ["fact-0", "fact-1"])  # every later passage id moves down by 2
    renumbered = RagIndex(index, embedder.fingerprint)
    pipeline.swap_index(renumbered, Searcher(renumbered.index))
    uncached = RagPipeline(renumbered, embedder, tiny32, k=3, nprobe=4)
    # the planets now at the ids the cached ones had: their documents must not get the old KV
    questions = QUESTIONS + [f"What colour are the oceans of Zorblax-{n}?" for n in (44, 9, 152)]
    answers = [pipeline.ask(q, 10) for q in questions]
    assert [a.answer for a in answers] == [uncached.ask(q, 10).answer for q in questions]
    # what the cache held before the reload still serves: every earlier question's documents are cached
    assert all(a.timings.reused_kv_tokens > len(cache.template) for a in answers[: len(QUESTIONS)])
