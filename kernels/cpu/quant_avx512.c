/* Quantized matmuls, AVX-512 VNNI: the kernels are in quant_x86.h (read its
 * comment); this file supplies the VNNI integer dot steps. (The AVX-512
 * path's quantize_act and hadamard64 are AVX2's, quant_avx2.c.)
 *
 * vpdpbusd multiplies unsigned by signed bytes and adds each four products
 * into an int32 lane, exactly (no saturation), in one instruction. It is used
 * at 256 bits (AVX512VL): the kernels are bound by the per-block horizontal
 * sums the definition requires, not by the multiplies, and 512-bit vectors
 * would double the work of each of those sums. Everything else is the AVX2
 * code, which every AVX-512 processor runs.
 */
#include <immintrin.h>

#define QX_ISA avx512
#define QX_W4_LANES_INT32     /* qx_dot_w4 gives int32 lanes: the template's reduce8 sums them */

static inline __attribute__((always_inline)) __m256i qx_dot_w4(__m256i lo, __m256i hi, __m256i a_lo,
                                                               __m256i a_hi)
{
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a_lo), hi, a_hi);
}

/* The product is native_avx512.c's: 16-row tiles there, the rows left over
 * in this rectangle. */
#define QX_RECTANGLE_ONLY
#include "kernels/cpu/quant_x86.h"
