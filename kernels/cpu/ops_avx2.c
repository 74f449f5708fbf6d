/* AVX2 + FMA kernels (8 floats per vector, 16 vector registers).
 *
 * matmul. Both operands have the input dimension contiguous (x rows and
 * GGUF weight rows), so the kernel is a grid of dot products computed in
 * register tiles: a tile of MR tokens x NR weight rows keeps MR*NR vector
 * accumulators, and each step over 8 inputs loads MR x-vectors and NR
 * w-vectors for MR*NR FMAs. 3 x 4 uses exactly the 16 registers (12
 * accumulators, 3 x-vectors, 1 w-vector) and needs 7 loads per 12 FMAs, so the
 * two FMA pipes, not the load ports, set the pace; 12 independent chains
 * cover the FMA latency. The tile's lanes are reduced once at the end
 * (horizontal adds turn four accumulators into four adjacent outputs).
 * Decode (one token) uses a 1 x 8 tile: eight chains, and the weights
 * streamed once from memory, which is what bounds it.
 *
 * Cache blocking without packing: the input dimension is cut into even chunks
 * of at most KC floats so that a tile's 7 rows (<= 22 KB) stay in L1; rows up
 * to KC are not cut at all, since every cut costs another round of horizontal
 * sums and a read-modify-write of the outputs (cutting 576 into 2 x 288 lost
 * a third of the speed). Tokens are cut into blocks of TB so that a block of
 * x chunks stays in L2 while every group of 4 weight rows, held in L1, passes
 * over it; each weight chunk is read from L3/memory once per token block.
 * Packing would save the strided row walks but costs a copy per call; with
 * rows of >= 2 KB the hardware prefetchers follow the strides.
 *
 * The other ops are straightforward 8-wide loops; exp is a polynomial
 * (range reduction by ln 2, degree-6 Taylor on [-ln2/2, ln2/2], within about
 * 2 ulp of expf), used by softmax and SwiGLU.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <math.h>

#define KC 800      /* longest input-dimension chunk (floats); longer rows are cut evenly */
#define TB 48       /* tokens per block (multiple of 3) */

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

/* One M x N register tile over kn inputs (x, w already offset to the chunk).
 * M <= 3, N in {1, 4, 8}; constant at every call so the arrays become
 * registers. Writes (or, when acc, adds to) out[m*ldo + n]. */
ALWAYS_INLINE void tile(const int M, const int N, const float *x, int ldx, const float *w, int ldw,
                        int kn, float *out, int ldo, int acc)
{
    __m256 c[3][8];
#pragma GCC unroll 3
    for (int m = 0; m < M; m++)
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) c[m][n] = _mm256_setzero_ps();

    int k = 0;
    for (; k + 8 <= kn; k += 8) {
        __m256 xv[3];
#pragma GCC unroll 3
        for (int m = 0; m < M; m++) xv[m] = _mm256_loadu_ps(x + (size_t)m * ldx + k);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)n * ldw + k);
#pragma GCC unroll 3
            for (int m = 0; m < M; m++) c[m][n] = _mm256_fmadd_ps(xv[m], wv, c[m][n]);
        }
    }
    if (k < kn) {                       /* masked tail: never reads past a row */
        __m256i mask = tail_mask(kn - k);
        __m256 xv[3];
#pragma GCC unroll 3
        for (int m = 0; m < M; m++) xv[m] = _mm256_maskload_ps(x + (size_t)m * ldx + k, mask);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            __m256 wv = _mm256_maskload_ps(w + (size_t)n * ldw + k, mask);
#pragma GCC unroll 3
            for (int m = 0; m < M; m++) c[m][n] = _mm256_fmadd_ps(xv[m], wv, c[m][n]);
        }
    }

#pragma GCC unroll 3
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
TILE_FN(3, 4) TILE_FN(2, 4) TILE_FN(1, 8) TILE_FN(1, 4)
TILE_FN(3, 1) TILE_FN(2, 1) TILE_FN(1, 1)

typedef void (*tile_fn)(const float *, int, const float *, int, int, float *, int, int);

/* Rows [o0, o1) for m (1..3) tokens starting at x/out, one input chunk. */
static void tile_row_range(int m, const float *x, const float *w, int ld, int kn,
                           float *out, int ldo, int o0, int o1, int acc)
{
    static const tile_fn wide[4] = { NULL, tile_1x4, tile_2x4, tile_3x4 };
    static const tile_fn single[4] = { NULL, tile_1x1, tile_2x1, tile_3x1 };
    int o = o0;
    if (m == 1)
        for (; o + 8 <= o1; o += 8) tile_1x8(x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o + 4 <= o1; o += 4) wide[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o < o1; o++) single[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
}

static void matmul_block_avx2(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    const int K = a->n_in, ldo = a->n_out;
    int n_chunks = (K + KC - 1) / KC;
    int kc = ((K + n_chunks - 1) / n_chunks + 7) & ~7;     /* even chunks, multiple of 8 */

    for (int k0 = 0; k0 < K; k0 += kc) {
        int kn = K - k0 < kc ? K - k0 : kc;
        const float *w = a->w + k0;
        for (int tb = t0; tb < t1; tb += TB) {
            int te = tb + TB < t1 ? tb + TB : t1;
            int full = tb + (te - tb) / 3 * 3;            /* end of the whole 3-token tiles */
            /* Each group of 4 rows (in L1) visits every token triple of the block (in L2). */
            for (int o = o0; o < o1; o += 4) {
                int oe = o + 4 < o1 ? o + 4 : o1;
                for (int t = tb; t < full; t += 3)
                    tile_row_range(3, a->x + (size_t)t * K + k0, w, K, kn,
                                   a->out + (size_t)t * ldo, ldo, o, oe, k0 > 0);
            }
            if (full < te)
                tile_row_range(te - full, a->x + (size_t)full * K + k0, w, K, kn,
                               a->out + (size_t)full * ldo, ldo, o0, o1, k0 > 0);
        }
    }
}

static void matmul_avx2(struct ebb_pool *pool, float *out, const float *x, const float *w,
                        int n_tok, int n_in, int n_out)
{
    ebb_cpu_matmul_drive(pool, matmul_block_avx2, 8, out, x, w, n_tok, n_in, n_out);
}

/* --------------------------------------------------------------- vector ops */

static float dot_avx2(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    if (i < n) {
        __m256i m = tail_mask(n - i);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), s1);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

static void axpy_avx2(float *y, float alpha, const float *x, int n)
{
    __m256 va = _mm256_set1_ps(alpha);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(alpha, x[i], y[i]);
}

static void add_avx2(float *y, const float *x, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

static void rmsnorm_avx2(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = dot_avx2(x, x, n);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    __m256 vs = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs),
                                                _mm256_loadu_ps(g + i)));
    for (; i < n; i++) out[i] = x[i] * scale * g[i];
}

/* e^x for x in the float range; inputs below about -87.3 give 0, above about
 * 88.3 give e^88.3 (callers only need the lower end exact: softmax feeds
 * x - max <= 0, SwiGLU divides by 1 + e^-x). */
ALWAYS_INLINE __m256 exp_avx2(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.3f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2, with ln2 split in two so that n*ln2_hi is exact. */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static void softmax_avx2(float *x, int n)
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

static void swiglu_avx2(float *gate, const float *up, int n)
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

const struct ebb_backend ebb_cpu_avx2 = {
    .name = "avx2",
    .matmul_f32 = matmul_avx2,
    .dot_f32 = dot_avx2,
    .axpy_f32 = axpy_avx2,
    .rmsnorm_f32 = rmsnorm_avx2,
    .softmax_f32 = softmax_avx2,
    .swiglu_f32 = swiglu_avx2,
    .add_f32 = add_avx2,
    .quantize_act = ebb_cpu_quantize_act_avx2,         /* quant_avx2.c */
    .matmul_w4a8 = ebb_cpu_matmul_w4a8_avx2,
    .matmul_q8a8 = ebb_cpu_matmul_q8a8_avx2,
    .hadamard64 = ebb_cpu_hadamard64_avx2,
};
