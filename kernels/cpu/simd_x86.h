/* Private to kernels/cpu: the small AVX2 building blocks that the W4G64
 * kernels (quant_x86.h) and the native GGUF kernels (native_x86.h) share.
 * Included by files built with AVX2 flags (or more) only. */
#ifndef EBB_KERNELS_CPU_SIMD_X86_H
#define EBB_KERNELS_CPU_SIMD_X86_H
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* v, opaque to the optimizer: stops a product from being fused into the
 * arithmetic that follows it (gnu11 builds with -ffp-contract=fast). */
ALWAYS_INLINE __m256 opaque(__m256 v)
{
    __asm__("" : "+x"(v));
    return v;
}

/* round(v), halves away from zero (C's roundf), for any float v: trunc,
 * plus one step away from zero when the dropped part is at least a half. */
ALWAYS_INLINE __m256 round_half_away(__m256 v)
{
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t));          /* exact */
    __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, sign_bit));
    __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_add_ps(t, _mm256_and_ps(up, step));
}

/* The 8 sums of 8 int32 vectors, as one vector: [sum p0, ..., sum p7]. */
ALWAYS_INLINE __m256i reduce8(const __m256i p[8])
{
    __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i lo4 = _mm256_hadd_epi32(h01, h23), hi4 = _mm256_hadd_epi32(h45, h67);
    /* lo4 = [p0..p3 over lanes 0-3 | p0..p3 over lanes 4-7], hi4 likewise */
    return _mm256_add_epi32(_mm256_permute2x128_si256(lo4, hi4, 0x20),
                            _mm256_permute2x128_si256(lo4, hi4, 0x31));
}
#endif
