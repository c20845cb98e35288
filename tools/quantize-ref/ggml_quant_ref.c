// The reference for ember's ggml quantizers (runtime/src/quant/ggml_quantize.rs): encodes a
// deterministic test matrix with ggml's own ggml_quantize_chunk (no importance matrix, as
// llama-quantize without --imatrix) and prints, per type, the FNV-1a 64 hash of the bytes.
// The generator is the one in ggml_quantize.rs's tests (same operations, same order), so the
// hashes there must equal these. With an output directory, also writes TYPE.bin per type.
//
// Build against a llama.cpp build (libggml-base):
//   cc -O2 -I$LLAMA/ggml/include tools/quantize-ref/ggml_quant_ref.c \
//      -L$BUILD/bin -lggml-base -Wl,-rpath,$BUILD/bin -o ggml_quant_ref
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "ggml.h"

#define NROWS 64
#define NCOLS 512

static uint64_t state;
static uint64_t splitmix(void) {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// Uniform in [-1, 1): exact in f32.
static float unif(void) { return (float)(splitmix() >> 40) * (1.0f / 8388608.0f) - 1.0f; }

static float value(int mode, int i) {
    switch (mode) {
        case 0: return 0.0f;
        case 1: return unif();
        case 2: return unif() * 0.001f;
        case 3: return fabsf(unif());
        case 4: return -fabsf(unif());
        case 5: return 0.5f;
        case 6: { float u = unif(); return (i % 32 == 7) ? 3.0f * u : u * 0.01f; }
        case 7: { float a = unif(); float b = unif(); float c = unif(); float d = unif(); return (((a + b) + c) + d) * 0.5f; }
        case 8: return unif() * 1e-30f;
        case 9: { float u = unif(); return i < 256 ? 0.0f : u; }
        case 10: { float u = unif(); return (i / 16) % 2 == 0 ? 0.0f : u; }
        case 11: return unif() * 10000.0f;
        case 12: { float u = unif(); return u * u * u * 8.0f; }
        case 13: { float u = unif(); return (i % 2) ? u : 0.25f * u; }
        case 14: { float u = unif(); return (float)(int32_t)(u * 8.0f) * 0.125f; }
        default: return unif() + 0.3f;
    }
}

static uint64_t fnv1a(const uint8_t * p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; ++i) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

int main(int argc, char ** argv) {
    static float x[NROWS * NCOLS];
    state = 42;
    for (int r = 0; r < NROWS; ++r)
        for (int i = 0; i < NCOLS; ++i)
            x[r * NCOLS + i] = value(r % 16, i);
    static const struct { enum ggml_type t; const char * name; } types[] = {
        {GGML_TYPE_F16, "F16"}, {GGML_TYPE_BF16, "BF16"}, {GGML_TYPE_Q4_0, "Q4_0"},
        {GGML_TYPE_Q4_1, "Q4_1"}, {GGML_TYPE_Q5_0, "Q5_0"}, {GGML_TYPE_Q5_1, "Q5_1"},
        {GGML_TYPE_Q8_0, "Q8_0"}, {GGML_TYPE_Q2_K, "Q2_K"}, {GGML_TYPE_Q3_K, "Q3_K"},
        {GGML_TYPE_Q4_K, "Q4_K"}, {GGML_TYPE_Q5_K, "Q5_K"}, {GGML_TYPE_Q6_K, "Q6_K"},
        {GGML_TYPE_IQ4_NL, "IQ4_NL"}, {GGML_TYPE_IQ4_XS, "IQ4_XS"},
    };
    printf("input %016llx\n", (unsigned long long) fnv1a((const uint8_t *) x, sizeof x));
    for (size_t k = 0; k < sizeof types / sizeof types[0]; ++k) {
        size_t n = ggml_row_size(types[k].t, NCOLS) * NROWS;
        uint8_t * y = calloc(1, n);
        size_t got = ggml_quantize_chunk(types[k].t, x, y, 0, NROWS, NCOLS, NULL);
        if (got != n) { fprintf(stderr, "%s: size %zu != %zu\n", types[k].name, got, n); return 1; }
        printf("%s %016llx\n", types[k].name, (unsigned long long) fnv1a(y, n));
        if (argc > 1) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s.bin", argv[1], types[k].name);
            FILE * f = fopen(path, "wb");
            if (!f || fwrite(y, 1, n, f) != n) { perror(path); return 1; }
            fclose(f);
        }
        free(y);
    }
    return 0;
}
