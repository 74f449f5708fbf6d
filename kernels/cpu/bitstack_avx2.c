/* BitStack's sign product, AVX2; the same bits as bitstack_scalar.c (the
 * integer sums are exact, the float steps are backend.h's).
 *
 * Per 32 inputs: the row's four sign bytes become a vector of -1 / +1 bytes
 * (each byte replicated to its eight lanes by a shuffle, one bit selected
 * per lane, compared), shared by every rank; vpsignb applies it to the
 * activation codes (in [-127, 127], so negation never overflows) and
 * vpmaddubsw against ones adds neighbouring pairs into int16 lanes. Those
 * lanes grow by at most 254 a step, so they are widened to int32 every 128
 * steps (4096 inputs) and at the end.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <math.h>

#define MAX_RANK 64
#define STEPS_PER_WIDEN 128

static inline __m256i sign_bytes(const uint8_t *s) {
    int32_t bits;
    __builtin_memcpy(&bits, s, 4);
    const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(bits),
                                            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(rep, sel), sel);   /* 0xFF: negative */
    return _mm256_or_si256(set, _mm256_set1_epi8(1));                          /* -1 or +1 */
}

static inline int32_t hsum32(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
    return _mm_cvtsi128_si32(x);
}

void ebb_cpu_bitstack_signs_avx2(float *out, const uint8_t *signs, const uint16_t *u, int rank, const int8_t *t,
                                 const float *ts, int n, int n_rows) {
    if (rank > MAX_RANK) {
        ebb_cpu_bitstack_signs_scalar(out, signs, u, rank, t, ts, n, n_rows);
        return;
    }
    const size_t row_bytes = (size_t)n / 8;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int o = 0; o < n_rows; o++) {
        const uint8_t *s = signs + (size_t)o * row_bytes;
        __m256i acc32[MAX_RANK], acc16[MAX_RANK];
        for (int j = 0; j < rank; j++) acc32[j] = acc16[j] = _mm256_setzero_si256();
        int steps = 0;
        for (int i = 0; i < n; i += 32) {
            const __m256i sg = sign_bytes(s + i / 8);
            for (int j = 0; j < rank; j++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(t + (size_t)j * n + i));
                acc16[j] = _mm256_add_epi16(acc16[j], _mm256_maddubs_epi16(ones8, _mm256_sign_epi8(x, sg)));
            }
            if (++steps == STEPS_PER_WIDEN || i + 32 >= n) {
                for (int j = 0; j < rank; j++) {
                    acc32[j] = _mm256_add_epi32(acc32[j], _mm256_madd_epi16(acc16[j], ones16));
                    acc16[j] = _mm256_setzero_si256();
                }
                steps = 0;
            }
        }
        float acc = 0;
        for (int j = 0; j < rank; j++)
            acc = fmaf((float)hsum32(acc32[j]), ebb_f16_to_f32(u[(size_t)o * rank + j]) * ts[j], acc);
        out[o] += acc;
    }
}
