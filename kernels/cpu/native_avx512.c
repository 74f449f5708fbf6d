/* Native GGUF products, AVX-512 VNNI: the kernels are in native_x86.h (read
 * its comment); this file supplies the VNNI integer dot steps.
 *
 * vpdpbusd multiplies unsigned by signed bytes and adds each four products
 * into an int32 lane, exactly, in one instruction; vpdpwssd multiplies int16
 * pairs (the K-quants' vpmaddubsw sums times their sub-block scales) and adds
 * them into int32 lanes. Used at 256 bits (AVX512VL), as native_x86.h
 * explains; the rest is the AVX2 code, which every AVX-512 processor runs.
 */
#include <immintrin.h>

#ifndef NX_ISA   /* native_amx.c includes this file with its own name */
#define NX_ISA avx512
#endif

static inline __attribute__((always_inline)) __m256i nx_dot(__m256i acc, __m256i u, __m256i s)
{
    return _mm256_dpbusd_epi32(acc, u, s);
}

static inline __attribute__((always_inline)) __m256i nx_dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i sc)
{
    return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, s), sc);
}

#define NX_WIDE_PREFILL   /* 512-bit prefill of the legacy types (native_x86.h) */
#include "kernels/cpu/native_x86.h"
