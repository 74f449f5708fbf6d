/* AVX-512 kernels (16 floats per vector, 32 vector registers, mask registers).
 *
 * Same design as ops_avx2.c, read that file's comment first. What changes:
 * - the f32 matmul (matmul_x86.h) gets a 4-token tile from the larger
 *   register file (4 x 4: 16 accumulators, 4 x-vectors, 1 w-vector: 21
 *   registers, 8 loads per 16 FMAs); decode still uses 1 x 8;
 * - row tails use mask registers (zero-masked loads never touch the masked
 *   lanes' memory), so no scalar or padded-copy tails are needed;
 * - lanes are reduced by first folding each 512-bit accumulator to 256 bits,
 *   then using the same four-at-once horizontal add as AVX2.
 * This file is built with AVX-512 F/BW/VL/DQ flags; backend_cpu.c only hands
 * it out when cpuid and the OS say the processor can run it.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <math.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __mmask16 tail_mask16(int n) { return (__mmask16)((1u << n) - 1u); }

ALWAYS_INLINE __m256 fold256(__m512 a)
{
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

/* [sum a0, sum a1, sum a2, sum a3] */
ALWAYS_INLINE __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3)
{
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(fold256(a0), fold256(a1)),
                              _mm256_hadd_ps(fold256(a2), fold256(a3)));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

ALWAYS_INLINE float hsum(__m512 a) { return _mm512_reduce_add_ps(a); }

/* ------------------------------------------------------------------ matmul */

#define FX_ISA avx512
#define FX_VL 16
#define FX_MR 4
typedef __m512 fx_vec;
typedef __mmask16 fx_mask;
#define fx_zero() _mm512_setzero_ps()
#define fx_set1(f) _mm512_set1_ps(f)
#define fx_add(a, b) _mm512_add_ps(a, b)
#define fx_load(p) _mm512_loadu_ps(p)
#define fx_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define fx_fnma(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define fx_tail_mask(n) tail_mask16(n)
#define fx_load_tail(p, m) _mm512_maskz_loadu_ps(m, p)
#define fx_hsum(v) hsum(v)
#define fx_hsum4(a, b, c, d) hsum4(a, b, c, d)
#include "kernels/cpu/matmul_x86.h"

/* --------------------------------------------------------------- vector ops */

void ebb_cpu_add_avx512(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

void ebb_cpu_rmsnorm_avx512(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = fx_dot(x, x, n);
    __m512 vs = _mm512_set1_ps(1.0f / sqrtf(ss / (float)n + eps));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 r = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs),
                                 _mm512_maskz_loadu_ps(m, g + i));
        _mm512_mask_storeu_ps(out + i, m, r);
    }
}

/* e^x as in ops_avx2.c: below about -87.3 gives 0, above 88.3 saturates. */
ALWAYS_INLINE __m512 exp_avx512(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-87.33f), hi = _mm512_set1_ps(88.3f);
    __mmask16 ok = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);   /* false below lo (and for nan) */
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = fx_exp_reduced(x, n);
    /* p * 2^n: scalef does the exponent arithmetic for us. */
    return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n));
}

void ebb_cpu_softmax_avx512(float *x, int n)
{
    if (n <= 0) return;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, x + i));
    }
    __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(x + i, m, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / hsum(vsum));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    }
}

void ebb_cpu_swiglu_avx512(float *gate, const float *up, int n)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(gate + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
    }
}
