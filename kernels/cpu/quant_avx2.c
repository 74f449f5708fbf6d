/* Quantized ops, AVX2: the kernels are in quant_x86.h (read its comment);
 * this file supplies AVX2's integer dot steps.
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

static inline __attribute__((always_inline)) __m256i qx_dot_q8(__m256i aw, __m256i sa)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1));
}

#include "kernels/cpu/quant_x86.h"
