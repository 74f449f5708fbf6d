/* AVX-512 kernels (16 floats per vector, 32 vector registers, mask registers).
 *
 * Same design as ops_avx2.c, read that file's comment first. What changes:
 * - the register file is twice as large, so the matmul tile is 4 tokens x 4
 *   rows (16 accumulators, 4 x-vectors, 1 w-vector: 21 registers, 8 loads per
 *   16 FMAs) and decode uses 1 x 8;
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

#define KC 800      /* longest input-dimension chunk (floats); longer rows are cut evenly */
#define TB 48       /* tokens per block (multiple of 4) */

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

/* One M x N register tile over kn inputs; M <= 4, N in {1, 4, 8}. */
ALWAYS_INLINE void tile(const int M, const int N, const float *x, int ldx, const float *w, int ldw,
                        int kn, float *out, int ldo, int acc)
{
    __m512 c[4][8];
#pragma GCC unroll 4
    for (int m = 0; m < M; m++)
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) c[m][n] = _mm512_setzero_ps();

    int k = 0;
    for (; k + 16 <= kn; k += 16) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_ps(x + (size_t)m * ldx + k);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            __m512 wv = _mm512_loadu_ps(w + (size_t)n * ldw + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) c[m][n] = _mm512_fmadd_ps(xv[m], wv, c[m][n]);
        }
    }
    if (k < kn) {
        __mmask16 mask = tail_mask16(kn - k);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xv[m] = _mm512_maskz_loadu_ps(mask, x + (size_t)m * ldx + k);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            __m512 wv = _mm512_maskz_loadu_ps(mask, w + (size_t)n * ldw + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) c[m][n] = _mm512_fmadd_ps(xv[m], wv, c[m][n]);
        }
    }

#pragma GCC unroll 4
    for (int m = 0; m < M; m++) {
        float *o = out + (size_t)m * ldo;
        if (N == 1) {
            float s = hsum(c[m][0]);
            o[0] = acc ? o[0] + s : s;
            continue;
        }
#pragma GCC unroll 2
        for (int n = 0; n < N; n += 4) {
            __m128 s = hsum4(c[m][n], c[m][n + 1], c[m][n + 2], c[m][n + 3]);
            if (acc) s = _mm_add_ps(s, _mm_loadu_ps(o + n));
            _mm_storeu_ps(o + n, s);
        }
    }
}

#define TILE_FN(M, N) \
    static void tile_##M##x##N(const float *x, int ldx, const float *w, int ldw, int kn, \
                               float *out, int ldo, int acc) \
    { tile(M, N, x, ldx, w, ldw, kn, out, ldo, acc); }
TILE_FN(4, 4) TILE_FN(3, 4) TILE_FN(2, 4) TILE_FN(1, 8) TILE_FN(1, 4)
TILE_FN(4, 1) TILE_FN(3, 1) TILE_FN(2, 1) TILE_FN(1, 1)

typedef void (*tile_fn)(const float *, int, const float *, int, int, float *, int, int);

/* Rows [o0, o1) for m (1..4) tokens starting at x/out, one input chunk. */
static void tile_row_range(int m, const float *x, const float *w, int ld, int kn,
                           float *out, int ldo, int o0, int o1, int acc)
{
    static const tile_fn wide[5] = { NULL, tile_1x4, tile_2x4, tile_3x4, tile_4x4 };
    static const tile_fn single[5] = { NULL, tile_1x1, tile_2x1, tile_3x1, tile_4x1 };
    int o = o0;
    if (m == 1)
        for (; o + 8 <= o1; o += 8) tile_1x8(x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o + 4 <= o1; o += 4) wide[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o < o1; o++) single[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
}

static void matmul_block_avx512(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    const int K = a->n_in, ldo = a->n_out;
    int n_chunks = (K + KC - 1) / KC;
    int kc = ((K + n_chunks - 1) / n_chunks + 15) & ~15;   /* even chunks, multiple of 16 */

    for (int k0 = 0; k0 < K; k0 += kc) {
        int kn = K - k0 < kc ? K - k0 : kc;
        const float *w = a->w + k0;
        for (int tb = t0; tb < t1; tb += TB) {
            int te = tb + TB < t1 ? tb + TB : t1;
            int full = tb + (te - tb) / 4 * 4;
            for (int o = o0; o < o1; o += 4) {
                int oe = o + 4 < o1 ? o + 4 : o1;
                for (int t = tb; t < full; t += 4)
                    tile_row_range(4, a->x + (size_t)t * K + k0, w, K, kn,
                                   a->out + (size_t)t * ldo, ldo, o, oe, k0 > 0);
            }
            if (full < te)
                tile_row_range(te - full, a->x + (size_t)full * K + k0, w, K, kn,
                               a->out + (size_t)full * ldo, ldo, o0, o1, k0 > 0);
        }
    }
}

static void matmul_avx512(struct ebb_pool *pool, float *out, const float *x, const float *w,
                          int n_tok, int n_in, int n_out)
{
    ebb_cpu_matmul_drive(pool, matmul_block_avx512, 8, out, x, w, n_tok, n_in, n_out);
}

/* --------------------------------------------------------------- vector ops */

static float dot_avx512(const float *a, const float *b, int n)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 m = tail_mask16(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return hsum(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static void axpy_avx512(float *y, float alpha, const float *x, int n)
{
    __m512 va = _mm512_set1_ps(alpha);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 r = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

static void add_avx512(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask16(n - i);
        __m512 r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

static void rmsnorm_avx512(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = dot_avx512(x, x, n);
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
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    /* p * 2^n: scalef does the exponent arithmetic for us. */
    return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n));
}

static void softmax_avx512(float *x, int n)
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

static void swiglu_avx512(float *gate, const float *up, int n)
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

const struct ebb_backend ebb_cpu_avx512 = {
    .name = "avx512",
    .matmul_f32 = matmul_avx512,
    .dot_f32 = dot_avx512,
    .axpy_f32 = axpy_avx512,
    .rmsnorm_f32 = rmsnorm_avx512,
    .softmax_f32 = softmax_avx512,
    .swiglu_f32 = swiglu_avx512,
    .add_f32 = add_avx512,
    .quantize_act = ebb_cpu_quantize_act_avx512,         /* quant_avx512.c */
    .matmul_w4a8 = ebb_cpu_matmul_w4a8_avx512,
    .matmul_q8a8 = ebb_cpu_matmul_q8a8_avx512,
    .hadamard64 = ebb_cpu_hadamard64_avx512,
};
