/* BitStack's sign product, AVX-512 (BW, VNNI); the same bits as
 * bitstack_scalar.c. The row's sign bits are a mask register as they are:
 * eight bytes negate 64 activation codes in one masked subtract, and VNNI's
 * vpdpbusd against ones adds them four at a time into int32 lanes, which
 * cannot overflow (at most 4 * 127 a step). A 32-input tail runs at 256 bits.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <math.h>

void ebb_cpu_bitstack_signs_avx512(float *out, const uint8_t *signs, const uint16_t *u, int rank, const int8_t *t,
                                   const float *ts, int n, int n_rows) {
    const size_t row_bytes = (size_t)n / 8;
    const __m512i ones = _mm512_set1_epi8(1);
    const __m256i ones256 = _mm256_set1_epi8(1);
    for (int o = 0; o < n_rows; o++) {
        const uint8_t *s = signs + (size_t)o * row_bytes;
        float acc = 0;
        for (int j = 0; j < rank; j++) {
            const int8_t *tj = t + (size_t)j * n;
            __m512i sum = _mm512_setzero_si512();
            int i = 0;
            for (; i + 64 <= n; i += 64) {
                __mmask64 neg;
                __builtin_memcpy(&neg, s + i / 8, 8);
                const __m512i x = _mm512_loadu_si512((const void *)(tj + i));
                sum = _mm512_dpbusd_epi32(sum, ones, _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
            }
            int32_t isum = _mm512_reduce_add_epi32(sum);
            if (i < n) {   /* n % 64 == 32 */
                __mmask32 neg;
                __builtin_memcpy(&neg, s + i / 8, 4);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(tj + i));
                const __m256i tail = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones256,
                                                         _mm256_mask_sub_epi8(x, neg, _mm256_setzero_si256(), x));
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(tail), _mm256_extracti128_si256(tail, 1));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
                isum += _mm_cvtsi128_si32(h);
            }
            acc = fmaf((float)isum, ebb_f16_to_f32(u[(size_t)o * rank + j]) * ts[j], acc);
        }
        out[o] += acc;
    }
}
