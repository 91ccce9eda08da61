import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retriever.coarse import CoarseQuantizer
from retriever.engines import NumbaEngine
from retriever.index import InvertedLists, merge_shards, split_shards
from retriever.search import Searcher, merge_topk
from retriever.vectors import prepare_vectors


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    nshards=st.integers(1, 6),
)
def test_split_is_balanced_and_merge_inverts_it(sizes, nshards):
    nlist = len(sizes)
    assignment = np.repeat(np.arange(nlist), sizes)
    np.random.default_rng(0).shuffle(assignment)
    n = len(assignment)
    lists = InvertedLists.from_assignment(
        assignment, np.arange(n, dtype=np.int64) * 7, np.arange(n * 3, dtype=np.uint8).reshape(n, 3), nlist
    )
    shards = split_shards(lists, nshards)
    per_list = np.stack([s.list_sizes() for s in shards])
    assert (per_list.sum(axis=0) == sizes).all()
    assert (per_list.max(axis=0) - per_list.min(axis=0) <= 1).all()  # every list split evenly
    merged = merge_shards(shards)
    np.testing.assert_array_equal(merged.offsets, lists.offsets)
    np.testing.assert_array_equal(merged.ids, lists.ids)
    np.testing.assert_array_equal(merged.codes, lists.codes)


@pytest.mark.parametrize("nshards", [2, 3, 4])
@pytest.mark.parametrize("k", [10, 500])
def test_merging_shard_results_equals_searching_the_whole_index(small_index, small_data, nshards, k):
    metric = small_index.params.metric
    queries = prepare_vectors(small_data.queries, metric)
    list_ids, _ = CoarseQuantizer(small_index.centroids, metric, device="cpu").search(queries, 8)
    whole_d, whole_i = NumbaEngine(small_index).search(queries, list_ids, k)
    sharded = small_index.resharded(nshards)
    parts = [NumbaEngine(sharded.shard(s)).search(queries, list_ids, k) for s in range(nshards)]
    merged_d, merged_i = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, metric)
    np.testing.assert_array_equal(merged_i, whole_i)
    np.testing.assert_array_equal(merged_d, whole_d)


def test_merge_topk_tie_break_and_padding():
    d = [np.array([[1.0, 2.0, np.inf]], dtype=np.float32), np.array([[1.0, 3.0]], dtype=np.float32)]
    i = [np.array([[9, 4, -1]]), np.array([[2, 5]])]
    md, mi = merge_topk(d, i, 3, "l2")
    np.testing.assert_array_equal(mi, [[2, 9, 4]])
    md, mi = merge_topk(d, i, 6, "l2")
    np.testing.assert_array_equal(mi, [[2, 9, 4, 5, -1, -1]])
    assert np.isinf(md[0, -1])
    md, mi = merge_topk([np.array([[5.0, 1.0]], dtype=np.float32)], [np.array([[3, 8]])], 2, "ip")
    np.testing.assert_array_equal(mi, [[3, 8]])


def test_searcher_on_sharded_index_equals_single_shard(l2_index, small_data):
    expected = Searcher(l2_index).search(small_data.queries, 10, 4)
    got = Searcher(l2_index.resharded(3)).search(small_data.queries, 10, 4)
    np.testing.assert_array_equal(got.ids, expected.ids)


# -- adding vectors to a built index -----------------------------------------------------------


@pytest.mark.parametrize("metric, nbits", [("l2", 8), ("cos", 8), ("l2", 4)])
def test_added_vectors_make_the_index_a_build_with_the_same_quantizers_would(metric, nbits, small_data):
    """Build on the first 12,000 vectors (3 shards), add the other 8,000: every array equals an
    index whose lists hold all 20,000 encoded with the same centroids and codebooks."""
    from retriever.build import add_vectors, build_index, encode_vectors
    from retriever.index import IVFPQParams

    params = IVFPQParams(metric, small_data.dim, nlist=64, m=8, nbits=nbits)
    built = build_index(small_data.base[:12_000], params, train_size=10_000, nshards=3, seed=7)
    added = add_vectors(built, small_data.base[12_000:])
    assignment, codes = encode_vectors(small_data.base, params, built.centroids, built.codebooks)
    expected = split_shards(InvertedLists.from_assignment(assignment, np.arange(20_000), codes, params.nlist), 3)
    assert added.nshards == 3 and added.ntotal == 20_000 and added.build_info["added"] == 8_000
    for ours, theirs in zip(added.shards, expected):
        np.testing.assert_array_equal(ours.offsets, theirs.offsets)
        np.testing.assert_array_equal(ours.ids, theirs.ids)
        np.testing.assert_array_equal(ours.codes, theirs.codes)
    # added vectors are found: searched for, nearly each is among its own 20 nearest codes
    found = Searcher(added, device="cpu").search(small_data.base[15_000:15_020], 20, 8).ids
    assert sum(15_000 + row in found[row] for row in range(20)) >= 18
    assert built.ntotal == 12_000  # the index added to is left as it was


def test_adding_bad_vectors_or_ids_is_a_clear_error(small_data):
    from retriever.build import add_vectors, build_index
    from retriever.errors import InvalidInput
    from retriever.index import IVFPQParams

    built = build_index(small_data.base[:5_000], IVFPQParams("l2", small_data.dim, nlist=16, m=4), seed=1)
    extra = small_data.base[5_000:5_010]
    cases = [
        ((extra[:, :5],), "shape"),
        ((np.where(np.arange(10)[:, None] == 3, np.nan, extra),), "NaN"),
        ((extra, np.arange(4_995, 5_005)), "in the index already"),
        ((extra, np.full(10, 9_000)), "repeat"),
        ((extra, np.arange(5)), "ids must be 10 integers"),
        ((extra, np.linspace(0, 1, 10)), "ids must be 10 integers"),
    ]
    for args, match in cases:
        with pytest.raises(InvalidInput, match=match):
            add_vectors(built, *args)
    assert add_vectors(built, extra, np.arange(100_000, 100_010)).ntotal == 5_010


def test_removed_ids_are_gone_and_adding_then_removing_gives_the_index_back(small_data):
    from retriever.build import add_vectors, build_index, remove_ids
    from retriever.errors import InvalidInput
    from retriever.index import IVFPQParams

    built = build_index(small_data.base[:6_000], IVFPQParams("l2", small_data.dim, nlist=16, m=4), nshards=2, seed=1)
    gone = np.arange(0, 6_000, 3)
    smaller = remove_ids(built, gone)
    before, after = built.whole(), smaller.whole()
    keep = ~np.isin(before.ids, gone)
    assert smaller.ntotal == 4_000 and smaller.nshards == 2 and smaller.build_info["removed"] == 2_000
    np.testing.assert_array_equal(after.ids, before.ids[keep])  # the rest keeps its lists, order and codes
    np.testing.assert_array_equal(after.codes, before.codes[keep])
    found = Searcher(smaller, device="cpu").search(small_data.queries, 10, 16).ids
    assert not np.isin(found, gone).any() and (found >= 0).all()
    renumbered = remove_ids(built, gone, renumber=True).whole().ids
    np.testing.assert_array_equal(np.sort(renumbered), np.arange(4_000))
    np.testing.assert_array_equal(np.argsort(renumbered, kind="stable"), np.argsort(after.ids, kind="stable"))  # the same order
    back = remove_ids(add_vectors(built, small_data.base[6_000:7_000]), np.arange(6_000, 7_000))
    for ours, theirs in zip(back.shards, built.shards):
        np.testing.assert_array_equal(ours.offsets, theirs.offsets)
        np.testing.assert_array_equal(ours.ids, theirs.ids)
        np.testing.assert_array_equal(ours.codes, theirs.codes)
    for ids, match in [
        (np.array([5, 6_000]), "not in the index"),
        (np.arange(6_000), "every vector"),
        (np.array([1.0]), "integers"),
        (np.zeros((2, 2), np.int64), "integers"),
    ]:
        with pytest.raises(InvalidInput, match=match):
            remove_ids(built, ids)
