// C simulation testbench: runs the kernel on golden inputs and checks its output against the
// golden top-K computed by our Numba engine (python -m fpga.golden writes them).
//
//   csim CASE_DIR...   each CASE_DIR holds shape.txt ("nq nprobe nlist rows inner_product") and
//                      the raw little-endian arrays named after the kernel's ports.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "ivfpq_kernel.h"

using namespace chameleon;

template <typename T>
std::vector<T> read_array(const std::string &dir, const std::string &name, size_t count) {
    std::ifstream file(dir + "/" + name + ".bin", std::ios::binary);
    if (!file) throw std::runtime_error(dir + "/" + name + ".bin is missing");
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (bytes.size() != count * sizeof(T)) {
        throw std::runtime_error(dir + "/" + name + ".bin holds " + std::to_string(bytes.size()) + " bytes, expected " +
                                 std::to_string(count * sizeof(T)) + " (golden data built for other kernel parameters?)");
    }
    std::vector<T> values(count);
    std::memcpy(values.data(), bytes.data(), bytes.size());
    return values;
}

// Returns the number of (query, rank) results that differ from the golden ones.
long run_case(const std::string &dir) {
    std::ifstream shape_file(dir + "/shape.txt");
    long nq, nprobe, nlist, rows, inner_product;
    if (!(shape_file >> nq >> nprobe >> nlist >> rows >> inner_product)) throw std::runtime_error(dir + "/shape.txt is missing or malformed");

    auto queries = read_array<float>(dir, "queries", nq * D);
    auto list_ids = read_array<int32_t>(dir, "list_ids", nq * nprobe);
    auto centroids = read_array<float>(dir, "centroids", nlist * D);
    auto codebooks = read_array<float>(dir, "codebooks", M * KSUB * DSUB);
    auto list_rows = read_array<int64_t>(dir, "list_rows", nlist + 1);
    std::vector<std::vector<uint8_t>> codes;
    std::vector<std::vector<int64_t>> ids;
    for (int b = 0; b < BANKS; ++b) {
        codes.push_back(read_array<uint8_t>(dir, "codes" + std::to_string(b), rows * M));
        ids.push_back(read_array<int64_t>(dir, "ids" + std::to_string(b), rows));
    }
    auto expected_keys = read_array<float>(dir, "expected_keys", nq * K);
    auto expected_ids = read_array<int64_t>(dir, "expected_ids", nq * K);

    std::vector<float> out_keys(nq * K);
    std::vector<int64_t> out_ids(nq * K);
#define CHAMELEON_BANK_ARGUMENTS(b) codes[b].data(), ids[b].data(),
    ivfpq_search(queries.data(), list_ids.data(), centroids.data(), codebooks.data(), list_rows.data(),
                 CHAMELEON_FOR_EACH_BANK(CHAMELEON_BANK_ARGUMENTS) int32_t(nq), int32_t(nprobe), int32_t(nlist),
                 int32_t(inner_product), out_keys.data(), out_ids.data());
#undef CHAMELEON_BANK_ARGUMENTS

    long mismatches = 0;
    for (long i = 0; i < nq * K; ++i) {
        bool same_key = out_keys[i] == expected_keys[i] || (std::isinf(out_keys[i]) && std::isinf(expected_keys[i]));
        if (out_ids[i] != expected_ids[i] || !same_key) {
            if (mismatches < 5) {
                std::printf("  query %ld rank %ld: kernel (%lld, %.9g), golden (%lld, %.9g)\n", i / K, i % K,
                            (long long)out_ids[i], out_keys[i], (long long)expected_ids[i], expected_keys[i]);
            }
            ++mismatches;
        }
    }
    std::printf("%s: %ld queries, nprobe %ld, %s, D=%d M=%d K=%d PES=%d BANKS=%d L1=%d: %ld of %ld results differ\n",
                dir.c_str(), nq, nprobe, inner_product ? "inner product" : "L2", D, M, K, PES, BANKS, L1, mismatches, nq * K);
    return mismatches;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s CASE_DIR...\n", argv[0]);
        return 2;
    }
    long failures = 0;
    try {
        for (int i = 1; i < argc; ++i) failures += run_case(argv[i]);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "csim: %s\n", e.what());
        return 2;
    }
    std::printf(failures ? "csim FAILED\n" : "csim passed\n");
    return failures ? 1 : 0;
}
