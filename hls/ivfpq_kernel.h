// IVF-PQ scan kernel for Vitis HLS (Chameleon's retrieval accelerator), also plain C++ for g++.
//
// One call searches a batch of queries over their probed inverted lists of one shard:
//   for each query, for each probed list (the next list's table is built while this one is scanned):
//     LUT construction  lut[j][c] = |(q - centroid)_j - y_jc|^2 (L2) or -<q_j, y_jc> (inner product)
//     ADC scan          PES processing elements, LANES per memory bank; every cycle each bank
//                       delivers one line of LANES codes (II=1), each PE sums M table lookups
//     level-1 queues    each PE keeps its best L1 candidates (a systolic sorted array, II=1)
//   level-2 queue       the PES*L1 level-1 entries merged into the top K, written out ascending.
// Keys are minimised: squared L2, or the negated inner product (the host negates back). Ties are
// broken by the smaller id, as in the Numba engine, so with L1 == K the result is exact and equals
// the Numba engine's residual-table path bit for bit (same float operations, same order).
// With L1 < K the queues are smaller (Chameleon's resource trade-off): a true neighbour is lost
// when more than L1 of the top K fall on one PE.
//
// Memory layout (what the host packs, see fpga/layout.py): each inverted list is striped across
// the BANKS banks, vector i of a list in bank i % BANKS, and padded so that every bank holds the
// same whole number of LANES-code lines per list. list_rows[l]..list_rows[l+1] are list l's rows
// in every bank; bank b's codes are codes<b>[row * M + j], its ids ids<b>[row], -1 for padding.
//
// Compile-time parameters (-D on the command line): CHAMELEON_D, CHAMELEON_M, CHAMELEON_K,
// CHAMELEON_PES, CHAMELEON_BANKS (1, 2 or 4), CHAMELEON_L1 (level-1 queue length, <= K).
// Runtime ones: nq (batch), nprobe, nlist.
#pragma once

#include <cstdint>

#include "hls_shim.h"

#ifndef CHAMELEON_D
#define CHAMELEON_D 128
#endif
#ifndef CHAMELEON_M
#define CHAMELEON_M 16
#endif
#ifndef CHAMELEON_K
#define CHAMELEON_K 100
#endif
#ifndef CHAMELEON_BANKS
#define CHAMELEON_BANKS 4
#endif
#ifndef CHAMELEON_PES
#define CHAMELEON_PES 16
#endif
#ifndef CHAMELEON_L1
#define CHAMELEON_L1 CHAMELEON_K
#endif
// Lookup-table entries computed per cycle (each DSUB multiply-adds); fpga/model.py counts on it.
#define CHAMELEON_LUT_PARALLEL 16
// Floats per 512-bit burst beat, for loading the codebooks.
#define CHAMELEON_BURST_FLOATS 16

namespace chameleon {

constexpr int D = CHAMELEON_D;
constexpr int M = CHAMELEON_M;
constexpr int DSUB = D / M;
constexpr int KSUB = 256;  // 8-bit PQ codes
constexpr int K = CHAMELEON_K;
constexpr int BANKS = CHAMELEON_BANKS;
constexpr int PES = CHAMELEON_PES;
constexpr int LANES = PES / BANKS;  // codes each bank delivers per cycle
constexpr int L1 = CHAMELEON_L1;

static_assert(D % M == 0, "M must divide D");
static_assert(BANKS == 1 || BANKS == 2 || BANKS == 4, "BANKS must be 1, 2 or 4");
static_assert(PES % BANKS == 0 && PES >= BANKS, "PES must be a positive multiple of BANKS");
static_assert(L1 >= 1 && L1 <= K, "the level-1 queue length must be between 1 and K");

struct Candidate {
    float key;
    int64_t id;
};

}  // namespace chameleon

// One (codes, ids) port pair per memory bank.
#if CHAMELEON_BANKS == 1
#define CHAMELEON_FOR_EACH_BANK(X) X(0)
#elif CHAMELEON_BANKS == 2
#define CHAMELEON_FOR_EACH_BANK(X) X(0) X(1)
#else
#define CHAMELEON_FOR_EACH_BANK(X) X(0) X(1) X(2) X(3)
#endif
#define CHAMELEON_BANK_PORTS(b) const uint8_t *codes##b, const int64_t *ids##b,

extern "C" void ivfpq_search(
    const float *queries,      // nq x D
    const int32_t *list_ids,   // nq x nprobe, -1 = skip
    const float *centroids,    // nlist x D
    const float *codebooks,    // M x KSUB x DSUB
    const int64_t *list_rows,  // nlist + 1: each list's rows, the same in every bank
    CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_PORTS)
    int32_t nq, int32_t nprobe, int32_t nlist, int32_t inner_product,
    float *out_keys,           // nq x K, ascending; +inf where fewer than K candidates
    int64_t *out_ids);         // nq x K; -1 where fewer than K candidates
