"""Fast scan of 4-bit PQ codes: lookup tables held in SIMD registers, looked up with byte shuffles.

With 16 codes per sub-quantizer a query's lookup table for one sub-quantizer is 16 entries: quantized
to bytes it fits in a 128-bit lane, and one ``vpshufb`` looks up 32 (AVX2) or 64 (AVX-512BW) codes
at once. The scan of a probed list then runs in three steps:

1. **Quantized distances.** The float table ``T[j, c]`` (the same one the Numba 8-bit kernel of
   :mod:`retriever.kernels.adc` builds) becomes ``Tq[j, c] = round((T[j, c] - min_c T[j, c]) * scale)`` in
   ``0..255``, one scale per table (per query for inner product, per probed list for L2). Codes are
   repacked at load into blocks of 32 vectors in which each 32-byte row holds two sub-quantizers of
   all 32 vectors (low and high nibble), so a block is one contiguous run of ``npairs * 32`` bytes.
   Shuffles give 8-bit partial sums that are accumulated in 16-bit lanes (one accumulator takes the
   byte pairs as they are, a second the odd bytes alone, and their difference gives the even ones).
2. **Threshold.** Candidates (vectors whose quantized key passes) are collected with a lower and an
   upper bound on their float key; every 2k new ones, those whose lower bound exceeds the k-th
   smallest upper bound are dropped. That bound, as a 16-bit threshold per list, is what a block's
   32 distances are compared with at once: most blocks yield nothing, and a list whose coarse key
   alone exceeds it is not read at all.
3. **Float re-rank.** The survivors get their exact float ADC keys, summed in the order
   :mod:`retriever.kernels.adc` sums them, and the k best are returned with those keys.

By default the bounds are the quantized key itself, as faiss's FastScan ranks: the k best by
quantized key, re-ranked by float key. With ``exact`` they are widened by the quantization error
(``0.5 * m / scale`` plus float rounding), so no vector that could be in the float top k is
dropped, and results (keys and ids, ties by smaller id) are exactly
:class:`retriever.engines.NumbaEngine`'s on the same codes, for a few times more float re-ranks.

The SIMD instructions come from LLVM intrinsics emitted through ``numba.extending.intrinsic``;
which ones is decided at run time from the CPU features Numba compiles for (AVX-512BW, else AVX2,
else a scalar path that computes the same quantized distances bit for bit).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from retriever.errors import InvalidInput, Unsupported
from retriever.kernels.common import EMPTY_ID, coarse_key, drain_sorted, offer, query_lut

BLOCK = 32  # vectors per block: the 32 bytes of one AVX2 register, one nibble per vector
KSUB = 16
GROUP_LUT_BYTES = 128  # tables of four sub-quantizers as the shuffles read them
CHUNK_QUERIES = 16  # queries sharing one set of scratch buffers
# Candidates kept per query before their exact re-rank: room for this many per result, at least this many.
CANDIDATES_PER_K = 8
CANDIDATES_MIN = 256
# The candidates are cut back to the ones that can still be in the top k after every max(2k, this) new ones.
SHRINK_EVERY_MIN = 32
BISECTIONS = 12  # steps towards the k-th smallest upper bound: 1/4096 of the candidates' spread
SORT_IN_PLACE_MAX = 96  # final candidates sorted by insertion up to this many, through a heap beyond
SIMD_BYTES = {"avx512": 64, "avx2": 32, "scalar": 0}
# Guard on the bound |float - quantized distance|: float32 rounding of the ADC sum (m + 1 additions),
# counted twice over.
FLOAT32_ROUNDING = 2.0**-23
# Beyond the 0.5 of rounding to a byte, each quantized table value may be off by float32 rounding
# of (T - min) * scale, at most 255 * 3 * 2**-24 units: this bounds it.
QUANTIZE_ROUNDING = 1e-4
THRESHOLD_GUARD = 1e-6  # quantized units: far above float64 rounding at 16-bit magnitudes


# ---------------------------------------------------------------------------------------------
# SIMD plumbing: a Numba type for byte vectors in registers, a marker type for the SIMD level,
# and the handful of instructions the kernel uses.


class SimdLevel:
    """Which instruction set the kernel runs: ``avx512``, ``avx2`` or ``scalar``."""

    def __init__(self, name: str):
        self.name = name
        self.nbytes = SIMD_BYTES[name]

    def __repr__(self) -> str:
        return f"SimdLevel({self.name!r})"


class SimdLevelType(types.Type):
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        super().__init__(name=f"SimdLevel({nbytes})")


class ByteVectorType(types.Type):
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        super().__init__(name=f"ByteVector({nbytes})")


@typeof_impl.register(SimdLevel)
def _typeof_simd_level(value, context):
    return SimdLevelType(value.nbytes)


register_model(SimdLevelType)(models.OpaqueModel)


@unbox(SimdLevelType)
def _unbox_simd_level(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())  # the level lives in the type alone


@register_model(ByteVectorType)
class _ByteVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(8), fe_type.nbytes))


def _llvm_bytes(nbytes: int) -> ir.VectorType:
    return ir.VectorType(ir.IntType(8), nbytes)


def _llvm_words(nbytes: int) -> ir.VectorType:
    return ir.VectorType(ir.IntType(16), nbytes // 2)


def _splat(builder, value, vector_type):
    lanes = vector_type.count
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        single, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    )


@intrinsic
def _vector_bytes(typingctx, level):
    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, level.nbytes)

    return types.intp(level), codegen


@intrinsic
def _vsplat(typingctx, level, byte):
    def codegen(context, builder, signature, args):
        return _splat(builder, builder.trunc(args[1], ir.IntType(8)), _llvm_bytes(level.nbytes))

    return ByteVectorType(level.nbytes)(level, byte), codegen


@intrinsic
def _vload(typingctx, level, array, start):
    """``level.nbytes`` bytes of a uint8 array from ``start`` (no alignment needed)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[1])(context, builder, args[1]).data
        address = builder.bitcast(builder.gep(data, [args[2]]), _llvm_bytes(level.nbytes).as_pointer())
        return builder.load(address, align=1)

    return ByteVectorType(level.nbytes)(level, array, start), codegen


@intrinsic
def _vshuffle(typingctx, table, index):
    """``vpshufb``: byte i becomes ``table[index[i]]`` within each 128-bit lane."""
    name = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}[table.nbytes]

    def codegen(context, builder, signature, args):
        vector = _llvm_bytes(table.nbytes)
        shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector, vector]), name)
        return builder.call(shuffle, args)

    return table(table, index), codegen


@intrinsic
def _vand(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.and_(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def _vshift_right16(typingctx, a, bits):
    def codegen(context, builder, signature, args):
        words = _llvm_words(a.nbytes)
        shifted = builder.lshr(builder.bitcast(args[0], words), _splat(builder, builder.trunc(args[1], ir.IntType(16)), words))
        return builder.bitcast(shifted, _llvm_bytes(a.nbytes))

    return a(a, bits), codegen


@intrinsic
def _vadd16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        words = _llvm_words(a.nbytes)
        total = builder.add(builder.bitcast(args[0], words), builder.bitcast(args[1], words))
        return builder.bitcast(total, _llvm_bytes(a.nbytes))

    return a(a, b), codegen


@intrinsic
def _vblock_sums(typingctx, words, odd):
    """The 32 distances of a block as 16-bit lanes, slot order, from the two accumulators.

    ``words`` summed every byte pair as a 16-bit number, ``odd`` the odd bytes alone; the even
    bytes' sum is ``words - (odd << 8)``. A 64-byte accumulator holds two 32-byte rows side by side,
    which are added first.
    """

    def codegen(context, builder, signature, args):
        lanes = ir.VectorType(ir.IntType(16), 16)
        halves = []
        for value in args:
            value = builder.bitcast(value, _llvm_words(words.nbytes))
            if words.nbytes == 64:
                low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(16))))
                high = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(16, 32))))
                value = builder.add(low, high)
            halves.append(value)
        total, odd_sums = halves
        even_sums = builder.sub(total, builder.shl(odd_sums, _splat(builder, ir.Constant(ir.IntType(16), 8), lanes)))
        slots = builder.shuffle_vector(even_sums, odd_sums, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        return builder.bitcast(slots, _llvm_bytes(64))

    return ByteVectorType(64)(words, odd), codegen


@intrinsic
def _vmask_at_most(typingctx, sums, threshold):
    """Bit i set where the i-th 16-bit distance is <= threshold (unsigned)."""

    def codegen(context, builder, signature, args):
        lanes = ir.VectorType(ir.IntType(16), 32)
        limit = _splat(builder, builder.trunc(args[1], ir.IntType(16)), lanes)
        below = builder.icmp_unsigned("<=", builder.bitcast(args[0], lanes), limit)
        return builder.zext(builder.bitcast(below, ir.IntType(32)), ir.IntType(64))

    return types.int64(sums, threshold), codegen


@intrinsic
def _vstore_words(typingctx, array, sums):
    """Store the 32 16-bit distances at the start of a uint16 array."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        builder.store(
            builder.bitcast(args[1], ir.VectorType(ir.IntType(16), 32)),
            builder.bitcast(data, ir.VectorType(ir.IntType(16), 32).as_pointer()),
            align=2,
        )
        return context.get_dummy_value()

    return types.none(array, sums), codegen


@intrinsic
def _lowest_set_bit(typingctx, mask):
    def codegen(context, builder, signature, args):
        cttz = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)]), "llvm.cttz.i64"
        )
        return builder.call(cttz, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.int64(mask), codegen


def _compile_target_features() -> set[str]:
    """CPU features Numba compiles for: the host's, unless NUMBA_CPU_NAME/FEATURES say otherwise."""
    if numba.config.CPU_FEATURES:
        spec = numba.config.CPU_FEATURES
    elif numba.config.CPU_NAME not in (None, "host"):
        return set()  # a named target CPU: its features are not listed, so assume none
    else:
        spec = llvm_binding.get_host_cpu_features().flatten()
    return {feature[1:] for feature in spec.split(",") if feature.startswith("+")}


def detect_simd() -> str:
    """The best level this machine (as Numba targets it) runs: ``avx512``, ``avx2`` or ``scalar``."""
    features = _compile_target_features()
    if {"avx512f", "avx512bw"} <= features:
        return "avx512"
    return "avx2" if "avx2" in features else "scalar"


def simd_level(name: str = "auto") -> SimdLevel:
    """The SIMD level called ``name`` (``auto``: :func:`detect_simd`), checked against the CPU."""
    if name == "auto":
        return SimdLevel(detect_simd())
    if name not in SIMD_BYTES:
        raise InvalidInput(f"simd must be one of auto, {', '.join(SIMD_BYTES)}, got {name!r}")
    order = list(SIMD_BYTES)
    if order.index(name) < order.index(detect_simd()):
        raise Unsupported(f"this CPU (as Numba targets it) cannot run {name}; the best it runs is {detect_simd()}")
    return SimdLevel(name)


# ---------------------------------------------------------------------------------------------
# Layout: codes in blocks of 32 vectors, tables quantized to bytes.


def pairs_padded(m: int) -> int:
    """Rows of 32 bytes per block: two sub-quantizers per row, rows in even numbers so that one
    64-byte load always holds whole rows."""
    pairs = (m + 1) // 2
    return pairs + pairs % 2


@njit(cache=True, inline="always")
def _slot_byte(slot):
    # 16-bit lane t of a row holds slots t (low byte) and 16 + t (high byte), so the two
    # accumulators' lanes come out in slot order.
    return 2 * slot if slot < 16 else 2 * (slot - 16) + 1


@njit(cache=True)
def _pack_blocks(codes, offsets, block_offsets, npairs):
    m = codes.shape[1]
    block_bytes = npairs * 32
    packed = np.zeros(block_offsets[-1] * block_bytes, np.uint8)
    for lst in range(offsets.shape[0] - 1):
        for row in range(offsets[lst], offsets[lst + 1]):
            local = row - offsets[lst]
            start = (block_offsets[lst] + local // BLOCK) * block_bytes + _slot_byte(local % BLOCK)
            for j in range(m):
                packed[start + (j // 2) * 32] |= codes[row, j] << (4 * (j % 2))
    return packed


def pack_blocks(codes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed, block_offsets): unpacked 4-bit ``codes`` (n, m) of CSR lists into 32-vector blocks.

    List l owns blocks ``block_offsets[l]:block_offsets[l+1]``, its last block padded with code 0.
    Block b is ``packed[b * npairs * 32:][:npairs * 32]``: row p holds sub-quantizers 2p (low
    nibble) and 2p + 1 (high nibble) of the block's 32 vectors, in the byte order of
    :func:`_slot_byte`.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if codes.ndim != 2 or codes.size and codes.max() >= KSUB:
        raise InvalidInput("pack_blocks takes (n, m) codes below 16, one per byte")
    block_offsets = np.zeros_like(offsets)
    np.cumsum((np.diff(offsets) + BLOCK - 1) // BLOCK, out=block_offsets[1:])
    return _pack_blocks(codes, offsets, block_offsets, pairs_padded(codes.shape[1])), block_offsets


@njit(cache=True, fastmath={"nnan", "ninf", "reassoc", "nsz"})  # lets the conversion loop vectorise
def _quantize_table(table, table_q, lut_q, shifted):
    """Quantize the (m, 16) float table into ``table_q`` (rows past m stay 0) and its shuffle
    layout ``lut_q``; returns (scale, bias, sum of max |T| per row). ``shifted`` is (m * 16,)
    scratch.

    ``lut_q`` holds, per four sub-quantizers 4g..4g+3, the low-nibble tables (4g, 4g, 4g+2, 4g+2)
    and then the high-nibble ones (4g+1, 4g+1, 4g+3, 4g+3), 16 bytes each: a 64-byte load gives
    both rows of a 64-byte code load their tables, a 32-byte load the first or second half.
    """
    m = table.shape[0]
    qmax = min(255, 65535 // table_q.shape[0])  # the sum over every sub-quantizer fits 16 bits
    span = 0.0
    bias = 0.0
    magnitude = 0.0
    for j in range(m):
        low = high = table[j, 0]
        largest = abs(low)
        for c in range(1, KSUB):
            low = min(low, table[j, c])
            high = max(high, table[j, c])
            largest = max(largest, abs(table[j, c]))
        span = max(span, np.float64(high) - np.float64(low))
        bias += low
        magnitude += largest
        for c in range(KSUB):
            shifted[j * KSUB + c] = table[j, c] - low
    scale = qmax / span if span > 0 else 1.0
    scale32 = np.float32(scale)
    flat_q = table_q.reshape(table_q.size)
    for i in range(m * KSUB):  # one flat loop, so that it vectorises; values >= 0: truncation rounds
        flat_q[i] = np.uint8(np.int32(shifted[i] * scale32 + np.float32(0.5)))
    for j in range(table_q.shape[0]):
        start = (j // 4) * GROUP_LUT_BYTES + (j % 2) * 64 + ((j % 4) // 2) * 32
        for c in range(KSUB):
            lut_q[start + c] = table_q[j, c]
            lut_q[start + KSUB + c] = table_q[j, c]
    return scale, bias, magnitude


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(table_q (m_padded, 16) uint8, shuffle layout, scale, bias) of a float (m, 16) table:
    ``sum_j T[j, c_j]`` is ``bias + sum_j table_q[j, c_j] / scale`` within ``(0.5 + 1e-4) * m / scale``."""
    table = np.ascontiguousarray(table, dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != KSUB or table.shape[0] < 1:
        raise InvalidInput(f"a 4-bit lookup table has shape (m, {KSUB}), got {table.shape}")
    npairs = pairs_padded(table.shape[0])
    table_q = np.zeros((2 * npairs, KSUB), np.uint8)
    lut_q = np.zeros(npairs // 2 * GROUP_LUT_BYTES, np.uint8)
    scale, bias, _ = _quantize_table(table, table_q, lut_q, np.empty(table.size, np.float32))
    return table_q, lut_q, float(scale), float(bias)


# ---------------------------------------------------------------------------------------------
# One block: its 32 quantized distances and which of them pass a threshold.


def _block_mask(level, packed, start, lut_q, table_q, threshold, sums):
    """Bit mask of the block's slots whose quantized distance is <= ``threshold``; the block's 32
    distances go to ``sums``."""


@overload(_block_mask)
def _block_mask_overload(level, packed, start, lut_q, table_q, threshold, sums):
    if level.nbytes == 0:
        return _block_mask_scalar
    return _block_mask_simd


def _block_mask_scalar(level, packed, start, lut_q, table_q, threshold, sums):
    mask = 0
    for slot in range(BLOCK):
        at = start + _slot_byte(slot)
        total = 0
        for pair in range(table_q.shape[0] // 2):
            byte = packed[at + pair * 32]
            total += np.int64(table_q[2 * pair, byte & 15]) + np.int64(table_q[2 * pair + 1, byte >> 4])
        sums[slot] = total
        if total <= threshold:
            mask |= 1 << slot
    return mask


def _block_mask_simd(level, packed, start, lut_q, table_q, threshold, sums):
    width = _vector_bytes(level)
    low_nibble = _vsplat(level, 0x0F)
    total = _vsplat(level, 0)
    odd = _vsplat(level, 0)
    for step in range(table_q.shape[0] * 16 // width):
        codes = _vload(level, packed, start + step * width)
        table_at = (step * width // 64) * GROUP_LUT_BYTES + (step * width) % 64
        low = _vshuffle(_vload(level, lut_q, table_at), _vand(codes, low_nibble))
        high = _vshuffle(_vload(level, lut_q, table_at + 64), _vand(_vshift_right16(codes, 4), low_nibble))
        total = _vadd16(_vadd16(total, low), high)
        odd = _vadd16(_vadd16(odd, _vshift_right16(low, 8)), _vshift_right16(high, 8))
    block_sums = _vblock_sums(total, odd)
    _vstore_words(sums, block_sums)  # unconditionally: a store under a branch costs Numba a refcount round trip
    return _vmask_at_most(block_sums, threshold)


@njit(cache=True)
def _all_block_distances(level, packed, nblocks, lut_q, table_q):
    out = np.empty(nblocks * BLOCK, np.uint16)
    sums = np.empty(BLOCK, np.uint16)
    block_bytes = table_q.shape[0] * 16
    for block in range(nblocks):
        _block_mask(level, packed, block * block_bytes, lut_q, table_q, 65535, sums)
        out[block * BLOCK : (block + 1) * BLOCK] = sums
    return out


def block_distances(packed: np.ndarray, table: np.ndarray, simd: str = "auto") -> np.ndarray:
    """Quantized distances of every slot of every block in ``packed`` (as :func:`pack_blocks`
    lays it out) under the float (m, 16) ``table``, computed at the SIMD level ``simd``."""
    table_q, lut_q, _, _ = quantize_table(table)
    block_bytes = table_q.shape[0] * 16
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 1 or packed.size % block_bytes:
        raise InvalidInput(f"packed codes must be whole blocks of {block_bytes} bytes, got shape {packed.shape}")
    return _all_block_distances(simd_level(simd), packed, packed.size // block_bytes, lut_q, table_q)


# ---------------------------------------------------------------------------------------------
# The scan: quantized distances, candidates under a threshold, float re-rank.


@njit(cache=True, inline="always")
def _threshold(bound, slack, base, scale):
    """Largest quantized distance whose lower bound can still be <= ``bound`` (-1: none can).

    The guard keeps float64 rounding from cutting a distance at the limit; one a hair above it
    costs only a place among the candidates until the next shrink.
    """
    if bound == np.inf:
        return 65535
    limit = np.floor((bound + slack - base) * scale + THRESHOLD_GUARD)
    if limit < 0:
        return -1
    return 65535 if limit > 65535 else np.int64(limit)


@njit(cache=True)
def _exact_keys(packed, entries, count, probes, coarse_of, lut, list_terms, inner_product, keys):
    """Float ADC keys of the first ``count`` candidates, summed as retriever.kernels.adc sums them (its
    tables hold ``list_terms + lut`` for L2), so they match it bit for bit."""
    m = lut.shape[0]
    for e in range(count):
        at, p = entries[e, 0], entries[e, 1]
        acc = np.float32(0.0)
        if inner_product:  # tested outside the loops, which then compile to straight-line code
            for pair in range(m // 2):
                byte = packed[at + pair * 32]
                acc += lut[2 * pair, byte & 15]
                acc += lut[2 * pair + 1, byte >> 4]
            if m % 2:
                acc += lut[m - 1, packed[at + (m // 2) * 32] & 15]
        else:
            terms = list_terms[probes[p]]
            for pair in range(m // 2):
                byte = packed[at + pair * 32]
                acc += terms[2 * pair, byte & 15] + lut[2 * pair, byte & 15]
                acc += terms[2 * pair + 1, byte >> 4] + lut[2 * pair + 1, byte >> 4]
            if m % 2:
                code = packed[at + (m // 2) * 32] & 15
                acc += terms[m - 1, code] + lut[m - 1, code]
        keys[e] = coarse_of[p] + acc


@njit(cache=True)
def _exact_candidates(packed, entries, count, ids, probes, coarse_of, lut, list_terms, inner_product, keys, found):
    """Exact keys and ids of the first ``count`` candidates."""
    for e in range(count):  # first, in a loop of independent loads: they miss the cache together
        found[e] = ids[entries[e, 2]]
    _exact_keys(packed, entries, count, probes, coarse_of, lut, list_terms, inner_product, keys)


@njit(cache=True)
def _heap_of(keys, found, count, heap_d, heap_i):
    """The k best (key, id) pairs of the first ``count`` in a heap (worst on top; ties by smaller id)."""
    heap_d[:] = np.inf
    heap_i[:] = EMPTY_ID
    for e in range(count):
        offer(heap_d, heap_i, keys[e], found[e])


@njit(cache=True)
def _write_best(keys, found, count, heap_d, heap_i, out_d, out_i):
    """The k best (key, id) pairs of the first ``count`` into ``out``, best first; id -1 past them.

    A few dozen pairs are sorted in place (cheaper than a heap's unpredictable branches); more go
    through the heap.
    """
    k = out_d.shape[0]
    if count > SORT_IN_PLACE_MAX:
        _heap_of(keys, found, count, heap_d, heap_i)
        drain_sorted(heap_d, heap_i, out_d, out_i)
        return
    for e in range(1, count):
        key, id_ = keys[e], found[e]
        at = e
        while at > 0 and (keys[at - 1] > key or (keys[at - 1] == key and found[at - 1] > id_)):
            keys[at], found[at] = keys[at - 1], found[at - 1]
            at -= 1
        keys[at], found[at] = key, id_
    for j in range(k):
        out_d[j] = keys[j] if j < count else np.inf
        out_i[j] = found[j] if j < count else -1


@njit(cache=True, fastmath={"nnan", "ninf"})  # finite values: min and max vectorise
def _at_least_k_below(values, count, k):
    """A value with at least k of values[:count] at or below it, within 1/2**BISECTIONS of their
    spread of the kth smallest: a bound needs no more, and bisection needs no branch on the data.

    (A quickselect's comparisons, on a fresh set of candidates at every call, mispredicted about
    half the time and cost several times these vectorised counts.)
    """
    low = high = values[0]
    for j in range(1, count):
        low = min(low, values[j])
        high = max(high, values[j])
    for _ in range(BISECTIONS):
        middle = low + (high - low) * 0.5
        at_or_below = 0
        for j in range(count):
            at_or_below += values[j] <= middle
        enough = at_or_below >= k
        high = middle if enough else high
        low = low if enough else middle
    return high


@njit(cache=True, inline="always")
def _move(lower, upper, entries, to, source):
    # Element by element: a row slice would cost Numba a refcount round trip.
    lower[to], upper[to] = lower[source], upper[source]
    entries[to, 0], entries[to, 1], entries[to, 2] = entries[source, 0], entries[source, 1], entries[source, 2]


@njit(cache=True, inline="always")
def _shrink(lower, upper, entries, count, k):
    """Keep the candidates that can still be in the top k; returns (count, bound), bound being
    at least the k-th smallest upper bound (so some k have keys below it) and every lower bound
    kept being at most it."""
    if count < k:
        return count, np.inf
    bound = _at_least_k_below(upper, count, k)
    kept = 0
    for e in range(count):  # without a branch: whether a candidate stays is a coin toss
        stays = lower[e] <= bound
        _move(lower, upper, entries, kept, e)
        kept += stays
    return kept, bound


@njit(cache=True)
def _settle(lower, upper, entries, count, packed, ids, probes, coarse_of, lut, list_terms, inner_product, keys, found, heap_d, heap_i):
    """Replace the candidates by their exact top k, with the exact keys as both bounds; returns
    (count, bound). For a crowd within the quantization error of the bound, so that the
    candidate list never has to grow."""
    _exact_candidates(packed, entries, count, ids, probes, coarse_of, lut, list_terms, inner_product, keys, found)
    _heap_of(keys, found, count, heap_d, heap_i)
    worst_d, worst_i = heap_d[0], heap_i[0]
    kept = 0
    for e in range(count):
        if keys[e] < worst_d or (keys[e] == worst_d and found[e] <= worst_i):
            _move(lower, upper, entries, kept, e)
            lower[kept] = upper[kept] = keys[e]
            kept += 1
    return kept, np.float64(worst_d)


@njit(cache=True)
def _probe_coarse_keys(q, centroids, probes, inner_product, out):
    """out[p] = retriever.kernels.adc's coarse key of list probes[p], four lists at a time: four
    independent add chains, each in the order retriever.kernels.adc adds, so keys match it bit for bit."""
    p = 0
    while p + 4 <= probes.shape[0]:
        c0, c1 = centroids[max(probes[p], 0)], centroids[max(probes[p + 1], 0)]
        c2, c3 = centroids[max(probes[p + 2], 0)], centroids[max(probes[p + 3], 0)]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        if inner_product:  # tested outside the loops, which then compile to straight-line code
            for t in range(q.shape[0]):
                s0 -= q[t] * c0[t]
                s1 -= q[t] * c1[t]
                s2 -= q[t] * c2[t]
                s3 -= q[t] * c3[t]
        else:
            for t in range(q.shape[0]):
                d0, d1, d2, d3 = q[t] - c0[t], q[t] - c1[t], q[t] - c2[t], q[t] - c3[t]
                s0 += d0 * d0
                s1 += d1 * d1
                s2 += d2 * d2
                s3 += d3 * d3
        out[p], out[p + 1], out[p + 2], out[p + 3] = s0, s1, s2, s3
        p += 4
    for rest in range(p, probes.shape[0]):
        out[rest] = coarse_key(q, centroids[max(probes[rest], 0)], inner_product)


@njit(cache=True)
def _search_query(
    level,
    q,
    probes,
    centroids,
    codebooks_t,
    list_terms,
    offsets,
    block_offsets,
    packed,
    ids,
    inner_product,
    exact,
    lut,
    table,
    table_q,
    lut_q,
    shifted,
    sums,
    coarse_of,
    lower,
    upper,
    entries,
    keys,
    found,
    heap_d,
    heap_i,
    out_d,
    out_i,
):
    m = lut.shape[0]
    k = out_d.shape[0]
    block_bytes = table_q.shape[0] * 16
    query_lut(q, codebooks_t, np.float32(-1.0) if inner_product else np.float32(-2.0), lut)
    scale, bias, magnitude = 1.0, 0.0, 0.0
    if inner_product:  # one table for every list: the coarse key is the list's whole offset
        scale, bias, magnitude = _quantize_table(lut, table_q, lut_q, shifted)
    capacity = lower.shape[0]
    shrink_every = max(2 * k, SHRINK_EVERY_MIN)
    shrink_at = min(capacity, max(k, SHRINK_EVERY_MIN))  # the first bound as soon as there are k candidates
    bound = np.inf
    count = 0
    _probe_coarse_keys(q, centroids, probes, inner_product, coarse_of)
    for p in range(probes.shape[0]):
        lst = probes[p]
        if lst < 0 or offsets[lst] == offsets[lst + 1]:
            continue
        coarse = coarse_of[p]
        if not inner_product:
            for j in range(m):
                for c in range(KSUB):
                    table[j, c] = list_terms[lst, j, c] + lut[j, c]
            scale, bias, magnitude = _quantize_table(table, table_q, lut_q, shifted)
        slack = 0.0
        if exact:  # bounds every quantized key's distance from its float key
            slack = (0.5 + QUANTIZE_ROUNDING) * m / scale + (m + 2) * FLOAT32_ROUNDING * (abs(coarse) + magnitude)
        base = np.float64(coarse) + bias
        step = 1.0 / scale
        threshold = _threshold(bound, slack, base, scale)
        if threshold < 0:
            continue  # even a distance of 0 within the list could not enter the top k
        first_row = offsets[lst]
        first_block = block_offsets[lst]
        last_block = block_offsets[lst + 1] - 1
        for block in range(first_block, last_block + 1):
            mask = _block_mask(level, packed, block * block_bytes, lut_q, table_q, threshold, sums)
            if block == last_block:
                mask &= (1 << (offsets[lst + 1] - first_row - (block - first_block) * BLOCK)) - 1
            while mask != 0:
                slot = _lowest_set_bit(mask)
                mask &= mask - 1
                estimate = base + sums[slot] * step
                lower[count] = estimate - slack
                upper[count] = estimate + slack
                entries[count, 0] = block * block_bytes + _slot_byte(slot)
                entries[count, 1] = p
                entries[count, 2] = first_row + (block - first_block) * BLOCK + slot  # its id is read only if it lasts
                count += 1
                if count == shrink_at:
                    count, bound = _shrink(lower, upper, entries, count, k)
                    if count > capacity // 2:
                        count, bound = _settle(
                            lower,
                            upper,
                            entries,
                            count,
                            packed,
                            ids,
                            probes,
                            coarse_of,
                            lut,
                            list_terms,
                            inner_product,
                            keys,
                            found,
                            heap_d,
                            heap_i,
                        )
                    shrink_at = min(capacity, count + shrink_every)
                    threshold = _threshold(bound, slack, base, scale)
    count, bound = _shrink(lower, upper, entries, count, k)
    _exact_candidates(packed, entries, count, ids, probes, coarse_of, lut, list_terms, inner_product, keys, found)
    _write_best(keys, found, count, heap_d, heap_i, out_d, out_i)


@njit(cache=True)
def _search_chunk(
    level,
    queries,
    list_ids,
    first,
    last,
    centroids,
    codebooks_t,
    list_terms,
    offsets,
    block_offsets,
    packed,
    ids,
    inner_product,
    exact,
    out_d,
    out_i,
):
    m, _, ksub = codebooks_t.shape
    k = out_d.shape[1]
    npairs = (m + 1) // 2
    npairs += npairs % 2
    capacity = max(CANDIDATES_PER_K * k, CANDIDATES_MIN)
    lut = np.empty((m, ksub), np.float32)
    table = np.empty((m, ksub), np.float32)
    table_q = np.zeros((2 * npairs, ksub), np.uint8)
    lut_q = np.zeros(npairs // 2 * GROUP_LUT_BYTES, np.uint8)
    shifted = np.empty(m * ksub, np.float32)
    sums = np.empty(BLOCK, np.uint16)
    coarse_of = np.empty(list_ids.shape[1], np.float32)
    lower, upper = np.empty(capacity, np.float64), np.empty(capacity, np.float64)
    entries = np.empty((capacity, 3), np.int64)  # code byte start, probe number, row
    keys = np.empty(capacity, np.float32)
    found = np.empty(capacity, np.int64)
    heap_d, heap_i = np.empty(k, np.float32), np.empty(k, np.int64)
    for qi in range(first, last):
        _search_query(
            level,
            queries[qi],
            list_ids[qi],
            centroids,
            codebooks_t,
            list_terms,
            offsets,
            block_offsets,
            packed,
            ids,
            inner_product,
            exact,
            lut,
            table,
            table_q,
            lut_q,
            shifted,
            sums,
            coarse_of,
            lower,
            upper,
            entries,
            keys,
            found,
            heap_d,
            heap_i,
            out_d[qi],
            out_i[qi],
        )


@njit(parallel=True, cache=True, nogil=True)
def scan_fastscan(
    level, queries, list_ids, centroids, codebooks_t, list_terms, offsets, block_offsets, packed, ids, k, inner_product, exact
):
    """Top-k keys and ids of every query over its probed lists, chunks of queries in parallel.

    The arguments are :func:`retriever.kernels.adc.scan_ivfpq`'s with the codes as :func:`pack_blocks`
    lays them out (``block_offsets``, ``packed``), ``level`` a :class:`SimdLevel` and ``exact``
    the ranking (see the module's notes); so are the results, bit for bit ``scan_ivfpq``'s when
    ``exact``.
    """
    nq = queries.shape[0]
    out_d = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    for chunk in prange((nq + CHUNK_QUERIES - 1) // CHUNK_QUERIES):
        first = chunk * CHUNK_QUERIES
        _search_chunk(
            level,
            queries,
            list_ids,
            first,
            min(nq, first + CHUNK_QUERIES),
            centroids,
            codebooks_t,
            list_terms,
            offsets,
            block_offsets,
            packed,
            ids,
            inner_product,
            exact,
            out_d,
            out_i,
        )
    return out_d, out_i


@njit(cache=True, nogil=True)
def scan_fastscan_serial(
    level, queries, list_ids, centroids, codebooks_t, list_terms, offsets, block_offsets, packed, ids, k, inner_product, exact
):
    """:func:`scan_fastscan` on the calling thread."""
    out_d = np.empty((queries.shape[0], k), np.float32)
    out_i = np.empty((queries.shape[0], k), np.int64)
    _search_chunk(
        level,
        queries,
        list_ids,
        0,
        queries.shape[0],
        centroids,
        codebooks_t,
        list_terms,
        offsets,
        block_offsets,
        packed,
        ids,
        inner_product,
        exact,
        out_d,
        out_i,
    )
    return out_d, out_i
