/* BitStack's sign products, AVX2; the same sums as bitstack_scalar.c
 * (integers: exact).
 *
 * A row's sum against a vector is its total less twice the sum over the
 * inputs whose sign bit is set: isum = T_v - 2 S. Per 32 inputs a row's
 * four sign bytes become 0/1 bytes (each byte replicated to its eight lanes
 * by a shuffle, one bit selected per lane, clamped to 1), and vpmaddubsw
 * multiplies them with a vector's codes, adding neighbouring pairs into
 * int16 lanes. Those grow by at most 254 a step, so they are widened to
 * int32 every 128 steps (4096 inputs) and at the end. Tiles of 2 rows x up
 * to 4 vectors (as many as are left: decoding one token, a level's rank),
 * written out by hand so every int16 accumulator and the codes of a step
 * stay in registers: each row's bytes serve the tile's vectors and each
 * vector's codes both rows. A missing second row at the edge repeats the
 * first and is not stored.
 */
#include "kernels/cpu/ops.h"
#include "kernels/cpu/simd_x86.h"

#include <immintrin.h>

#define STEPS_PER_WIDEN 128
#define BX_ROWS 2
#include "kernels/cpu/bitstack_x86.h"

static inline __m256i bits01(const uint8_t *s) {
    int32_t b;
    __builtin_memcpy(&b, s, 4);
    const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(b),
                                            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_min_epu8(_mm256_and_si256(rep, sel), _mm256_set1_epi8(1));
}

static int32_t bx_total(const int8_t *x, int n) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < n; i += 32) {
        const __m256i p = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(x + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones16));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);
}

/* The four accumulators of one row, summed: lane c = the sum of a[c]. */
static inline __m128i fold4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* One tile: rows s0, s1 against the first nv (1 to 4, a constant where it
 * is inlined) of vectors x0..x3, written out so the int16 accumulators stay
 * in registers. */
#define STEP(r, c) a##r##c = _mm256_add_epi16(a##r##c, _mm256_maddubs_epi16(b##r, v##c))
#define WIDEN(r, c) do { \
        w##r##c = _mm256_add_epi32(w##r##c, _mm256_madd_epi16(a##r##c, ones16)); \
        a##r##c = z; \
    } while (0)
static inline __attribute__((always_inline)) void bx_tile(const int nv, int32_t *isum, int n_vec,
                                                          const uint8_t *const *s, const int8_t *x0,
                                                          const int8_t *x1, const int8_t *x2, const int8_t *x3,
                                                          const int32_t *tot, int n, int n_rows_left, int nv_left) {
    const uint8_t *s0 = s[0], *s1 = s[1];
    const __m256i z = _mm256_setzero_si256(), ones16 = _mm256_set1_epi16(1);
    __m256i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
    __m256i w00 = z, w01 = z, w02 = z, w03 = z, w10 = z, w11 = z, w12 = z, w13 = z;
    int steps = 0;
    for (int i = 0; i < n; i += 32) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(x0 + i));
        const __m256i v1 = nv > 1 ? _mm256_loadu_si256((const __m256i *)(x1 + i)) : z;
        const __m256i v2 = nv > 2 ? _mm256_loadu_si256((const __m256i *)(x2 + i)) : z;
        const __m256i v3 = nv > 3 ? _mm256_loadu_si256((const __m256i *)(x3 + i)) : z;
        const __m256i b0 = bits01(s0 + i / 8), b1 = bits01(s1 + i / 8);
        STEP(0, 0);
        STEP(1, 0);
        if (nv > 1) { STEP(0, 1); STEP(1, 1); }
        if (nv > 2) { STEP(0, 2); STEP(1, 2); }
        if (nv > 3) { STEP(0, 3); STEP(1, 3); }
        if (++steps == STEPS_PER_WIDEN || i + 32 >= n) {
            WIDEN(0, 0); WIDEN(0, 1); WIDEN(0, 2); WIDEN(0, 3);
            WIDEN(1, 0); WIDEN(1, 1); WIDEN(1, 2); WIDEN(1, 3);
            steps = 0;
        }
    }
    bx_store_row(isum, tot, fold4(w00, w01, w02, w03), nv_left);
    if (n_rows_left > 1) bx_store_row(isum + n_vec, tot, fold4(w10, w11, w12, w13), nv_left);
}

void ebb_cpu_bitstack_isums_avx2(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec,
                                 int n) {
    bx_isums(isum, signs, n_rows, t, n_vec, n);
}

/* BitStack's activation codes (backend.h): the products once for the
 * absolute maximum and again for the codes, each kept from fusing into the
 * multiply that follows, so every lane repeats the scalar path's steps. */
void ebb_cpu_bitstack_codes_avx2(const float *x, const float *v, int n, int8_t *q, float *scale) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        const __m256 y = opaque(_mm256_mul_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(x + i)));
        m = _mm256_max_ps(m, _mm256_and_ps(y, abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const __m256 vinv = _mm256_set1_ps(act_inverse(_mm_cvtss_f32(m4), 127.0f, scale));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < n; i += 32) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            const __m256 y = opaque(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k)));
            c[k] = _mm256_cvttps_epi32(round_half_away(opaque(_mm256_mul_ps(y, vinv))));
        }
        /* Packing interleaves 128-bit lanes; the permute restores the order. */
        const __m256i b8 = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), order);
        _mm256_storeu_si256((__m256i *)(q + i), b8);
    }
}

void ebb_cpu_bitstack_scale_add_avx2(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok,
                                   int rank, const float *u, const float *ts) {
    bitstack_scale_add_body(out, out_stride, isum, n_rows, n_tok, rank, u, ts);
}
