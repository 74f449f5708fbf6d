/* Quantized ops, AVX2: the matmul kernels are in quant_x86.h (read its
 * comment); this file supplies AVX2's integer dot steps, and holds the
 * activation quantizer and the Hadamard, which the AVX-512 path uses too
 * (256-bit work: wider vectors would not make them faster).
 *
 * Exactness of those two (every path gives the scalar path's bits):
 * - quantize_act: absmax is a max (exact); scale and inverse come from the
 *   same act_inverse() as the scalar path; codes are round-half-away-from-
 *   zero of one rounded product, done as trunc plus a correction when the
 *   dropped fraction is >= 0.5 (exact for every float; the rounding
 *   instructions only know ties-to-even). The product is passed through an
 *   empty asm (opaque()) first: built as gnu11 (-ffp-contract=fast), GCC may
 *   fuse a product and the subtraction that uses it into an FMA, skipping
 *   the product's rounding (it happens not to here today; the barrier makes
 *   that a guarantee rather than luck).
 * - hadamard64: the same butterflies in the same stage order as the scalar
 *   path (a + b and a - b, the latter computed as a + (-b), which IEEE defines
 *   as the same thing), then * 0.125.
 *
 * vpmaddubsw multiplies unsigned by signed bytes and adds adjacent pairs into
 * int16 (saturating, but no pair here can reach it: 2 * 15 * 128 for W4G64
 * nibbles, 2 * 128 * 127 for Q8_0's |w| against sign-adjusted codes); vpmaddwd
 * with ones widens pairs of those to int32. W4G64's small sums stay in int16
 * through part of the horizontal reduction.
 */
#include <immintrin.h>

#define QX_ISA avx2

/* int16 lanes, each the sum of 4 products: at most 4 * 15 * 128 = 7680. */
static inline __attribute__((always_inline)) __m256i qx_dot_w4(__m256i lo, __m256i hi, __m256i a_lo,
                                                               __m256i a_hi)
{
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
}

/* Two rounds of pairwise int16 adds (lanes reach 4 * 7680 = 30720, still
 * below 2^15), then one widening madd, then the two 128-bit halves: 11
 * instructions for 8 sums, against 17 when every vector is widened first. */
static inline __attribute__((always_inline)) __m256i qx_reduce8_w4(const __m256i p[8])
{
    __m256i a = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
    __m256i b = _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7]));
    a = _mm256_madd_epi16(a, _mm256_set1_epi16(1));     /* [p0..p3 lanes 0-7 | p0..p3 lanes 8-15] */
    b = _mm256_madd_epi16(b, _mm256_set1_epi16(1));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

#include "kernels/cpu/quant_x86.h"

/* ------------------------------------------------------- activation quant */

ALWAYS_INLINE void quantize_group(const float *x, float qmax, int8_t *q, float *s)
{
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[8];
    __m256 m = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float inv = act_inverse(_mm_cvtss_f32(m4), qmax, s);

    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    __m256i c[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        __m256 r = round_half_away(opaque(_mm256_mul_ps(v[i], vinv)));
        c[i] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    /* Packing interleaves 128-bit lanes; the permute restores the order. */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        __m256i w16a = _mm256_packs_epi32(c[4 * h], c[4 * h + 1]);
        __m256i w16b = _mm256_packs_epi32(c[4 * h + 2], c[4 * h + 3]);
        __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b), order);
        _mm256_storeu_si256((__m256i *)(q + 32 * h), b8);
    }
}

void ebb_cpu_quantize_act_avx2(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{
    act_each_group(x, n_tok, n, n_hi, q, s, quantize_group);
}

/* -------------------------------------------------------------- hadamard64 */

/* Stage h < 8 inside one vector: lane i pairs with lane i ^ h (y); the lane
 * with bit h clear gets x_i + x_{i^h}, the other x_{i^h} + (-x_i). */
ALWAYS_INLINE __m256 butterfly_in(__m256 x, __m256 y, __m256 neg_upper)
{
    return _mm256_add_ps(y, _mm256_xor_ps(x, neg_upper));
}

void ebb_cpu_hadamard64_avx2(float *x, int n)
{
    const __m256 neg1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN));
    const __m256 neg2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN));
    const __m256 neg4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN));
    const __m256 eighth = _mm256_set1_ps(0.125f);
    for (int b = 0; b + 64 <= n; b += 64, x += 64) {
        __m256 v[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m256 u = _mm256_loadu_ps(x + 8 * i);
            u = butterfly_in(u, _mm256_permute_ps(u, 0xb1), neg1);            /* h = 1 */
            u = butterfly_in(u, _mm256_permute_ps(u, 0x4e), neg2);            /* h = 2 */
            v[i] = butterfly_in(u, _mm256_permute2f128_ps(u, u, 0x01), neg4); /* h = 4 */
        }
#pragma GCC unroll 3
        for (int h = 1; h < 8; h <<= 1)                                     /* h = 8, 16, 32 */
#pragma GCC unroll 4
            for (int i = 0; i < 8; i += 2 * h)
#pragma GCC unroll 4
                for (int j = i; j < i + h; j++) {
                    __m256 u = v[j], w = v[j + h];
                    v[j] = _mm256_add_ps(u, w);
                    v[j + h] = _mm256_sub_ps(u, w);
                }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(x + 8 * i, _mm256_mul_ps(v[i], eighth));
    }
}
