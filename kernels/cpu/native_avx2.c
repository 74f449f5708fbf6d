/* Native GGUF products, AVX2: the kernels are in native_x86.h (read its
 * comment); this file supplies AVX2's integer dot steps.
 *
 * vpmaddubsw multiplies unsigned by signed bytes and adds adjacent pairs into
 * int16 (saturating, but no pair here reaches it: see native_x86.h); vpmaddwd
 * then widens pairs of those to int32, times ones or times the K-quants'
 * sub-block scales.
 */
#include <immintrin.h>

#define NX_ISA avx2

static inline __attribute__((always_inline)) __m256i nx_dot(__m256i acc, __m256i u, __m256i s)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) __m256i nx_dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i sc)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc));
}

#include "kernels/cpu/native_x86.h"
