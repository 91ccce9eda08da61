// IVF-PQ scan kernel: LUT construction, ADC processing elements, hierarchical priority queues.
// See ivfpq_kernel.h for what it computes and the memory layout it reads.
#include "ivfpq_kernel.h"

#include <limits>

using namespace chameleon;

namespace {

constexpr float EMPTY_KEY = std::numeric_limits<float>::infinity();
constexpr int64_t EMPTY_ID = std::numeric_limits<int64_t>::max();

// A probed list to scan: its first row in every bank, its lines (0: nothing to scan), its coarse term.
struct ListJob {
    int64_t first_row;
    int64_t lines;
    float coarse;
};

// What one bank delivers in one cycle: LANES codes of M bytes and their ids.
struct CodeLine {
    uint8_t codes[LANES][M];
    int64_t ids[LANES];
};

inline bool better(const Candidate &a, const Candidate &b) {
#pragma HLS inline
    return a.key < b.key || (a.key == b.key && a.id < b.id);
}

template <int LENGTH>
void queue_clear(Candidate queue[LENGTH]) {
    for (int i = 0; i < LENGTH; ++i) {
#pragma HLS unroll
        queue[i] = {EMPTY_KEY, EMPTY_ID};
    }
}

// A sorted array, best first. Every slot decides from the old values of itself and its left
// neighbour alone, so in hardware all slots update in the same cycle: a systolic insert, II=1.
template <int LENGTH>
void queue_insert(Candidate queue[LENGTH], const Candidate &c) {
#pragma HLS inline
    if (!better(c, queue[LENGTH - 1])) return;  // most candidates lose to the worst entry
    for (int i = LENGTH - 1; i > 0; --i) {
#pragma HLS unroll
        if (better(c, queue[i - 1])) {
            queue[i] = queue[i - 1];
        } else if (better(c, queue[i])) {
            queue[i] = c;
        }
    }
    if (better(c, queue[0])) queue[0] = c;
}

// lut[j][c] = |(q - centroid)_j - y_jc|^2: one table per (query, list), built while the
// previous list is scanned in hardware.
void build_residual_lut(const float query[D], const float *centroid, const float codebooks[M][KSUB][DSUB], float lut[M][KSUB]) {
    float residual[D];
    for (int t = 0; t < D; ++t) {
#pragma HLS pipeline II=1
        residual[t] = query[t] - centroid[t];
    }
    for (int j = 0; j < M; ++j) {
        for (int c = 0; c < KSUB; ++c) {
#pragma HLS pipeline II=1
#pragma HLS unroll factor=CHAMELEON_LUT_PARALLEL
            float acc = 0.0f;
            for (int t = 0; t < DSUB; ++t) {
                float diff = residual[j * DSUB + t] - codebooks[j][c][t];
                acc += diff * diff;
            }
            lut[j][c] = acc;
        }
    }
}

// lut[j][c] = -<q_j, y_jc>: for inner product the table does not depend on the list.
void build_inner_product_lut(const float query[D], const float codebooks[M][KSUB][DSUB], float lut[M][KSUB]) {
    for (int j = 0; j < M; ++j) {
        for (int c = 0; c < KSUB; ++c) {
#pragma HLS pipeline II=1
#pragma HLS unroll factor=CHAMELEON_LUT_PARALLEL
            float acc = 0.0f;
            for (int t = 0; t < DSUB; ++t) acc += query[j * DSUB + t] * codebooks[j][c][t];
            lut[j][c] = acc * -1.0f;
        }
    }
}

float negated_inner_product(const float query[D], const float *centroid) {
    float key = 0.0f;
    for (int t = 0; t < D; ++t) key -= query[t] * centroid[t];
    return key;
}

void read_bank(const uint8_t *codes, const int64_t *ids, int64_t first_row, int64_t lines, hls::stream<CodeLine> &out) {
    for (int64_t line = 0; line < lines; ++line) {
#pragma HLS pipeline II=1
        CodeLine chunk;
        for (int lane = 0; lane < LANES; ++lane) {
            int64_t row = first_row + line * LANES + lane;
            for (int j = 0; j < M; ++j) chunk.codes[lane][j] = codes[row * M + j];
            chunk.ids[lane] = ids[row];
        }
        out.write(chunk);
    }
}

// LANES processing elements: each sums M lookups per cycle and offers the result to its own
// level-1 queue. Padding rows (id -1) are skipped.
void adc_lanes(hls::stream<CodeLine> &in, int64_t lines, const float lut[M][KSUB], float coarse, Candidate queues[LANES][L1]) {
    for (int64_t line = 0; line < lines; ++line) {
#pragma HLS pipeline II=1
        CodeLine chunk = in.read();
        for (int lane = 0; lane < LANES; ++lane) {
#pragma HLS unroll
            if (chunk.ids[lane] < 0) continue;
            float acc = 0.0f;
            for (int j = 0; j < M; ++j) {
#pragma HLS unroll
                acc += lut[j][chunk.codes[lane][j]];
            }
            queue_insert<L1>(queues[lane], {coarse + acc, chunk.ids[lane]});
        }
    }
}

// Every bank streams its slice of the list into its own PEs; the banks run side by side.
void scan_list(const float lut[M][KSUB], float coarse, int64_t first_row, int64_t lines,
               CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_PORTS) Candidate queues[BANKS][LANES][L1]) {
#pragma HLS dataflow
#define CHAMELEON_SCAN_BANK(b)                                   \
    hls::stream<CodeLine> bank##b;                               \
    read_bank(codes##b, ids##b, first_row, lines, bank##b);      \
    adc_lanes(bank##b, lines, lut, coarse, queues[b]);
    CHAMELEON_FOR_EACH_BANK(CHAMELEON_SCAN_BANK)
#undef CHAMELEON_SCAN_BANK
}

// Where a probed list lies and its coarse term; for L2 also its table, built into ``lut``.
// Skipped, out-of-range and empty lists come back with no lines.
ListJob prepare_list(const float query[D], int32_t list, int32_t nlist, const float *centroids, const int64_t *list_rows,
                     const float codebooks[M][KSUB][DSUB], int32_t inner_product, float lut[M][KSUB]) {
    if (list < 0 || list >= nlist) return {0, 0, 0.0f};
    int64_t first_row = list_rows[list];
    int64_t lines = (list_rows[list + 1] - first_row) / LANES;
    if (lines <= 0) return {0, 0, 0.0f};
    const float *centroid = centroids + int64_t(list) * D;
    if (inner_product) return {first_row, lines, negated_inner_product(query, centroid)};
    build_residual_lut(query, centroid, codebooks, lut);
    return {first_row, lines, 0.0f};
}

// Level 2: the PES level-1 queues merged into the top K, one entry per cycle.
void merge_and_write(Candidate queues[BANKS][LANES][L1], float *out_keys, int64_t *out_ids) {
    Candidate top[K];
#pragma HLS array_partition variable=top complete
    queue_clear<K>(top);
    for (int b = 0; b < BANKS; ++b) {
        for (int lane = 0; lane < LANES; ++lane) {
            for (int i = 0; i < L1; ++i) {
#pragma HLS pipeline II=1
                if (queues[b][lane][i].id != EMPTY_ID) queue_insert<K>(top, queues[b][lane][i]);
            }
        }
    }
    for (int i = 0; i < K; ++i) {
#pragma HLS pipeline II=1
        out_keys[i] = top[i].key;
        out_ids[i] = top[i].id == EMPTY_ID ? -1 : top[i].id;
    }
}

}  // namespace

#define CHAMELEON_PRAGMA(text) _Pragma(#text)
#define CHAMELEON_BANK_INTERFACE(b)                                                  \
    CHAMELEON_PRAGMA(HLS interface m_axi port = codes##b offset = slave bundle = bank##b) \
    CHAMELEON_PRAGMA(HLS interface m_axi port = ids##b offset = slave bundle = bank##b)

extern "C" void ivfpq_search(const float *queries, const int32_t *list_ids, const float *centroids, const float *codebooks,
                             const int64_t *list_rows, CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_PORTS) int32_t nq,
                             int32_t nprobe, int32_t nlist, int32_t inner_product, float *out_keys, int64_t *out_ids) {
#pragma HLS interface m_axi port = queries offset = slave bundle = gmem0
#pragma HLS interface m_axi port = list_ids offset = slave bundle = gmem0
#pragma HLS interface m_axi port = centroids offset = slave bundle = gmem0
#pragma HLS interface m_axi port = codebooks offset = slave bundle = gmem0
#pragma HLS interface m_axi port = list_rows offset = slave bundle = gmem0
#pragma HLS interface m_axi port = out_keys offset = slave bundle = gmem1
#pragma HLS interface m_axi port = out_ids offset = slave bundle = gmem1
    CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_INTERFACE)

    // The codebooks stay on chip for the whole batch; they arrive in 512-bit bursts (16 floats a cycle).
    float local_codebooks[M][KSUB][DSUB];
#pragma HLS array_partition variable=local_codebooks dim=3 complete
    for (int i = 0; i < M * KSUB * DSUB; ++i) {
#pragma HLS pipeline II=1
#pragma HLS unroll factor=CHAMELEON_BURST_FLOATS
        local_codebooks[i / (KSUB * DSUB)][(i / DSUB) % KSUB][i % DSUB] = codebooks[i];
    }

    for (int32_t q = 0; q < nq; ++q) {
        float query[D];
        for (int t = 0; t < D; ++t) {
#pragma HLS pipeline II=1
            query[t] = queries[int64_t(q) * D + t];
        }
        Candidate queues[BANKS][LANES][L1];
#pragma HLS array_partition variable=queues complete
        for (int b = 0; b < BANKS; ++b) {
            for (int lane = 0; lane < LANES; ++lane) queue_clear<L1>(queues[b][lane]);
        }
        // Two tables, ping-pong: list p+1's is built while list p is scanned. Each PE reads M
        // entries per cycle: in hardware every lane gets its own copy, partitioned by sub-quantizer.
        float tables[2][M][KSUB];
#pragma HLS array_partition variable=tables dim=1 complete
#pragma HLS array_partition variable=tables dim=2 complete
#pragma HLS array_partition variable=tables dim=3 cyclic factor=CHAMELEON_LUT_PARALLEL
        if (inner_product) build_inner_product_lut(query, local_codebooks, tables[0]);
        const int32_t *probes = list_ids + int64_t(q) * nprobe;
        ListJob current = {0, 0, 0.0f};
        if (nprobe > 0) current = prepare_list(query, probes[0], nlist, centroids, list_rows, local_codebooks, inner_product, tables[0]);
        for (int32_t p = 0; p < nprobe; ++p) {
            // Independent calls on different tables: the scheduler runs them side by side.
            ListJob next = {0, 0, 0.0f};
            if (p + 1 < nprobe) {
                next = prepare_list(query, probes[p + 1], nlist, centroids, list_rows, local_codebooks, inner_product,
                                    tables[(p + 1) & 1]);
            }
            if (current.lines > 0) {
#define CHAMELEON_BANK_ARGUMENTS(b) codes##b, ids##b,
                scan_list(tables[inner_product ? 0 : p & 1], current.coarse, current.first_row, current.lines,
                          CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_ARGUMENTS) queues);
#undef CHAMELEON_BANK_ARGUMENTS
            }
            current = next;
        }
        merge_and_write(queues, out_keys + int64_t(q) * K, out_ids + int64_t(q) * K);
    }
}
