"""What the kernels share: the per-query top-k heap, the query's lookup table and coarse key,
cache prefetching, and the scheduling of parallel loops.

The heap keeps the k best (smallest key, ties by smaller id) with the worst on top, so a candidate
costs one comparison unless it gets in. :data:`EMPTY_ID` marks a slot no candidate has filled.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

EMPTY_ID = np.iinfo(np.int64).max


@njit(cache=True, inline="always")
def _worse(d1, i1, d2, i2):
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(cache=True)
def _replace_top(heap_d, heap_i, d, i):
    """Max-heap (worst on top) of fixed size: put (d, i) in place of the top and sift down."""
    _sift_down(heap_d, heap_i, heap_d.shape[0], d, i)


@njit(cache=True)
def _sift_down(heap_d, heap_i, k, d, i):
    """:func:`_replace_top` on the heap's first ``k`` slots (a slice would cost a refcount round trip)."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and _worse(heap_d[child + 1], heap_i[child + 1], heap_d[child], heap_i[child]):
            child += 1
        if not _worse(heap_d[child], heap_i[child], d, i):
            break
        heap_d[pos] = heap_d[child]
        heap_i[pos] = heap_i[child]
        pos = child
    heap_d[pos] = d
    heap_i[pos] = i


@njit(cache=True)
def drain_sorted(heap_d, heap_i, out_d, out_i):
    """Empty the heap into ``out`` best first; empty slots become id -1."""
    for last in range(heap_d.shape[0] - 1, -1, -1):
        out_d[last] = heap_d[0]
        out_i[last] = -1 if heap_i[0] == EMPTY_ID else heap_i[0]
        d, i = heap_d[last], heap_i[last]
        _sift_down(heap_d, heap_i, last, d, i)


@njit(cache=True)
def query_lut(q, codebooks_t, alpha, lut):
    """lut[j, c] = alpha * <q_j, y_jc>; the loop over codes is innermost and contiguous, so it vectorises."""
    m, dsub, ksub = codebooks_t.shape
    lut[:] = 0.0
    for j in range(m):
        for t in range(dsub):
            qv = q[j * dsub + t]
            for c in range(ksub):
                lut[j, c] += qv * codebooks_t[j, t, c]
        for c in range(ksub):
            lut[j, c] *= alpha


@njit(cache=True, inline="always")
def offer(heap_d, heap_i, d, i):
    if d < heap_d[0] or (d == heap_d[0] and i < heap_i[0]):
        _replace_top(heap_d, heap_i, d, i)


@njit(cache=True, inline="always")
def coarse_key(q, centroid, inner_product):
    s = np.float32(0.0)
    if inner_product:
        for t in range(q.shape[0]):
            s -= q[t] * centroid[t]
    else:
        for t in range(q.shape[0]):
            diff = q[t] - centroid[t]
            s += diff * diff
    return s


@intrinsic
def prefetch(typingctx, array, index):
    """Ask for the cache line holding ``array.flat[index]`` ahead of its use (a hint: no fault,
    no wait)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        hint = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        # read, keep in every cache level, data cache
        builder.call(
            cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8"),
            [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)],
        )
        return context.get_dummy_value()

    return types.none(array, index), codegen


@contextmanager
def dynamic_schedule():
    """Parallel loops started inside hand their iterations to threads one at a time, as threads
    free up: queries differ in cost (their lists' sizes), and an even split of a batch would
    leave one thread idle while another finishes its harder half."""
    previous = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous)
