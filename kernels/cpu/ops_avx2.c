/* AVX2 + FMA kernels (8 floats per vector, 16 vector registers).
 *
 * matmul: the f32 product is matmul_x86.h (read its comment), written once
 * for AVX2 and AVX-512; this file supplies AVX2's vector steps. Row tails
 * are masked loads (vmaskmovps never touches the masked lanes' memory).
 *
 * The other ops are straightforward 8-wide loops; exp is a polynomial
 * (range reduction by ln 2, degree-6 Taylor on [-ln2/2, ln2/2], within about
 * 2 ulp of expf), used by softmax and SwiGLU.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <math.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Lane i set for i < n (n in 0..8), for masked loads of a row's tail. */
ALWAYS_INLINE __m256i tail_mask(int n)
{
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

/* [sum a0, sum a1, sum a2, sum a3] */
ALWAYS_INLINE __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3)
{
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

ALWAYS_INLINE float hsum(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------ matmul */

#define FX_ISA avx2
#define FX_VL 8
#define FX_MR 3
typedef __m256 fx_vec;
typedef __m256i fx_mask;
#define fx_zero() _mm256_setzero_ps()
#define fx_set1(f) _mm256_set1_ps(f)
#define fx_add(a, b) _mm256_add_ps(a, b)
#define fx_load(p) _mm256_loadu_ps(p)
#define fx_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define fx_fnma(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define fx_tail_mask(n) tail_mask(n)
#define fx_load_tail(p, m) _mm256_maskload_ps(p, m)
#define fx_hsum(v) hsum(v)
#define fx_hsum4(a, b, c, d) hsum4(a, b, c, d)
#include "kernels/cpu/matmul_x86.h"

/* --------------------------------------------------------------- vector ops */

void ebb_cpu_add_avx2(float *y, const float *x, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

void ebb_cpu_rmsnorm_avx2(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = fx_dot(x, x, n);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    __m256 vs = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs),
                                                _mm256_loadu_ps(g + i)));
    for (; i < n; i++) out[i] = x[i] * scale * g[i];
}

/* e^x for x in the float range (the polynomial is matmul_x86.h's); inputs
 * below about -87.3 give 0, above about 88.3 give e^88.3 (callers only need
 * the lower end exact: softmax feeds x - max <= 0, SwiGLU divides by
 * 1 + e^-x). */
ALWAYS_INLINE __m256 exp_avx2(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.3f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 p = fx_exp_reduced(x, n);      /* e^(x - n ln2) */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

void ebb_cpu_softmax_avx2(float *x, int n)
{
    if (n <= 0) return;
    int i = 0;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float max = _mm_cvtss_f32(m4);
    for (; i < n; i++) if (x[i] > max) max = x[i];

    __m256 vm = _mm256_set1_ps(max), vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (i < n) {                        /* tail through a padded copy */
        float buf[8];
        int r = n - i;
        for (int j = 0; j < 8; j++) buf[j] = j < r ? x[i + j] - max : -INFINITY;
        __m256 e = exp_avx2(_mm256_loadu_ps(buf));
        _mm256_storeu_ps(buf, e);
        vsum = _mm256_add_ps(vsum, e);
        for (int j = 0; j < r; j++) x[i + j] = buf[j];
    }
    __m256 inv = _mm256_set1_ps(1.0f / hsum(vsum));
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    float s = _mm256_cvtss_f32(inv);
    for (; i < n; i++) x[i] *= s;
}

ALWAYS_INLINE __m256 swiglu8(__m256 g, __m256 u)
{
    __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
    __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_mul_ps(silu, u);
}

void ebb_cpu_swiglu_avx2(float *gate, const float *up, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(gate + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i < n) {
        float g[8] = { 0 }, u[8] = { 0 };
        int r = n - i;
        for (int j = 0; j < r; j++) { g[j] = gate[i + j]; u[j] = up[i + j]; }
        _mm256_storeu_ps(g, swiglu8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
        for (int j = 0; j < r; j++) gate[i + j] = g[j];
    }
}
