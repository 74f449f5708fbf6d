/* Random test data shared by the kernel tests (test_native, test_cuda_math,
 * the GPU suite): weight rows of every type with finite f16 fields, and
 * activations with the edge cases that catch rounding and scale bugs.
 * Deterministic: one xorshift stream per test binary, so a failure repeats.
 */
#ifndef EBB_TEST_TESTDATA_H
#define EBB_TEST_TESTDATA_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/formats.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static double uniform(void) { return next_u32() / 4294967296.0; }
static float gauss(void) {
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

/* n values of a type whose bytes are fill's (random where fill < 0), with
 * every f16 field (scales and minimums) set to a finite half of moderate
 * size so products stay finite. */
static void filled_row(uint32_t type, uint8_t *w, int n, int fill) {
    const struct ebb_type_info *ti = ebb_type_info(type);
    const size_t bytes = ebb_row_bytes(type, (uint64_t)n);
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)(fill < 0 ? (int)next_u32() : fill);
    /* offsets of the f16 fields inside one block */
    int f16_at[2] = {-1, -1};
    switch (type) {
    case EBB_TYPE_Q4_0: case EBB_TYPE_Q5_0: case EBB_TYPE_Q8_0: case EBB_TYPE_W4G64: f16_at[0] = 0; break;
    case EBB_TYPE_Q4_1: case EBB_TYPE_Q5_1: case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K: case EBB_TYPE_W2G64:
        f16_at[0] = 0; f16_at[1] = 2; break;
    case EBB_TYPE_Q2_K: f16_at[0] = 80; f16_at[1] = 82; break;
    case EBB_TYPE_Q3_K: f16_at[0] = 108; break;
    case EBB_TYPE_Q6_K: f16_at[0] = 208; break;
    default: break;
    }
    for (size_t b = 0; b < bytes / ti->block_bytes; b++)
        for (int k = 0; k < 2; k++) {
            if (f16_at[k] < 0) continue;
            const float v = (float)(0.01 * gauss());
            const uint16_t h = ebb_f32_to_f16(v);
            w[b * ti->block_bytes + (size_t)f16_at[k]] = (uint8_t)(h & 0xff);
            w[b * ti->block_bytes + (size_t)f16_at[k] + 1] = (uint8_t)(h >> 8);
        }
}

static void random_row(uint32_t type, uint8_t *w, int n) { filled_row(type, w, n, -1); }

/* n_tok tokens of n inputs: gaussian with outlier channels and, with edges,
 * some all-zero blocks of 32 (and so of 256 now and then), tokens of tiny
 * values and tokens made of exact halves (ties for the rounding). */
static void random_acts(float *x, int n_tok, int n, int edges) {
    for (int t = 0; t < n_tok; t++) {
        float *xt = x + (size_t)t * n;
        const int kind = edges ? (int)(next_u32() % 8) : 0;
        for (int i = 0; i < n; i++) {
            xt[i] = gauss() * (i % 41 == 7 ? 50.0f : 1.0f);
            if (kind == 1) xt[i] *= 1e-39f;                                /* inverse capped */
            if (kind == 2) xt[i] = (float)((int)(next_u32() % 255) - 127) * 0.25f; /* quarters: ties */
        }
        if (kind == 2) xt[0] = 63.5f;                                      /* inv = 2: x * inv halves */
        for (int blk = 0; blk < n / 32; blk++)
            if ((edges && next_u32() % 5 == 0) || (kind == 3 && blk < 8)) memset(xt + 32 * blk, 0, 32 * sizeof(float));
    }
}

#endif
