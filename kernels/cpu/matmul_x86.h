/* The f32 matmul for x86 SIMD, written once for AVX2 and AVX-512, with the
 * other f32 loops the two paths share step for step (the dot product under
 * rmsnorm, the polynomial of exp).
 *
 * Included by ops_avx2.c and ops_avx512.c (each compiled with its own ISA
 * flags), which first define FX_ISA (the name suffix) and the vector steps,
 * the only place the instruction sets differ:
 *   fx_vec, FX_VL           the float vector and its width;
 *   FX_MR                   tokens per register tile (what the register file
 *                           holds: 3 on AVX2's 16 registers, 4 on AVX-512's 32);
 *   fx_zero(), fx_set1(f), fx_load(p), fx_add(a, b), fx_fma(a, b, c) (a*b + c),
 *   fx_fnma(a, b, c) (c - a*b);
 *   fx_mask, fx_tail_mask(n), fx_load_tail(p, m)   lanes < n, the rest zero,
 *                           never reading past them;
 *   fx_hsum(v)              the sum of v's lanes;
 *   fx_hsum4(a, b, c, d)    [sum a, sum b, sum c, sum d] as an __m128.
 *
 * Both operands have the input dimension contiguous (x rows and GGUF weight
 * rows), so the kernel is a grid of dot products computed in register tiles:
 * a tile of M tokens x N weight rows keeps M*N vector accumulators, and each
 * step over FX_VL inputs loads M x-vectors and N w-vectors for M*N FMAs. On
 * AVX2, 3 x 4 uses exactly the 16 registers (12 accumulators, 3 x-vectors, 1
 * w-vector) and needs 7 loads per 12 FMAs, so the two FMA pipes, not the
 * load ports, set the pace; 12 independent chains cover the FMA latency.
 * AVX-512 has twice the registers: 4 x 4 (21 registers, 8 loads per 16
 * FMAs). The tile's lanes are reduced once at the end (horizontal adds turn
 * four accumulators into four adjacent outputs). Decode (one token) uses a
 * 1 x 8 tile: eight chains, and the weights streamed once from memory, which
 * is what bounds it. Row tails use masked loads.
 *
 * Cache blocking without packing: the input dimension is cut into even chunks
 * of at most KC floats so that a tile's rows (<= 22 KB) stay in L1; rows up
 * to KC are not cut at all, since every cut costs another round of horizontal
 * sums and a read-modify-write of the outputs (cutting 576 into 2 x 288 lost
 * a third of the speed). Tokens are cut into blocks of TB so that a block of
 * x chunks stays in L2 while every group of 4 weight rows, held in L1, passes
 * over it; each weight chunk is read from L3/memory once per token block.
 * Packing would save the strided row walks but costs a copy per call; with
 * rows of >= 2 KB the hardware prefetchers follow the strides.
 */
#ifndef FX_ISA
#error "define FX_ISA and the vector steps before including matmul_x86.h"
#endif

#include "kernels/cpu/ops.h"

#include <immintrin.h>

#define FX_CAT2(a, b) a##_##b
#define FX_CAT(a, b) FX_CAT2(a, b)
#define FX_FN(name) FX_CAT(name, FX_ISA)

#define FX_KC 800      /* longest input-dimension chunk (floats); longer rows are cut evenly */
#define FX_TB 48       /* tokens per block (a multiple of FX_MR, 3 or 4) */

/* One M x N register tile over kn inputs (x, w already offset to the chunk).
 * M <= FX_MR, N in {1, 4, 8}; constant at every call so the arrays become
 * registers. Writes (or, when acc, adds to) out[m*ldo + n]. */
static inline __attribute__((always_inline)) void fx_tile(const int M, const int N, const float *x, int ldx,
                                                          const float *w, int ldw, int kn, float *out, int ldo,
                                                          int acc)
{
    fx_vec c[FX_MR][8];
#pragma GCC unroll 4
    for (int m = 0; m < M; m++)
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) c[m][n] = fx_zero();

    int k = 0;
    for (; k + FX_VL <= kn; k += FX_VL) {
        fx_vec xv[FX_MR];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xv[m] = fx_load(x + (size_t)m * ldx + k);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            fx_vec wv = fx_load(w + (size_t)n * ldw + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) c[m][n] = fx_fma(xv[m], wv, c[m][n]);
        }
    }
    if (k < kn) {                       /* masked tail: never reads past a row */
        fx_mask mask = fx_tail_mask(kn - k);
        fx_vec xv[FX_MR];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xv[m] = fx_load_tail(x + (size_t)m * ldx + k, mask);
#pragma GCC unroll 8
        for (int n = 0; n < N; n++) {
            fx_vec wv = fx_load_tail(w + (size_t)n * ldw + k, mask);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) c[m][n] = fx_fma(xv[m], wv, c[m][n]);
        }
    }

#pragma GCC unroll 4
    for (int m = 0; m < M; m++) {
        float *o = out + (size_t)m * ldo;
        if (N == 1) {
            float s = fx_hsum(c[m][0]);
            o[0] = acc ? o[0] + s : s;
            continue;
        }
#pragma GCC unroll 2
        for (int n = 0; n < N; n += 4) {
            __m128 s = fx_hsum4(c[m][n], c[m][n + 1], c[m][n + 2], c[m][n + 3]);
            if (acc) s = _mm_add_ps(s, _mm_loadu_ps(o + n));
            _mm_storeu_ps(o + n, s);
        }
    }
}

#define FX_TILE_FN(M, N) \
    static void fx_tile_##M##x##N(const float *x, int ldx, const float *w, int ldw, int kn, \
                                  float *out, int ldo, int acc) \
    { fx_tile(M, N, x, ldx, w, ldw, kn, out, ldo, acc); }
FX_TILE_FN(1, 8) FX_TILE_FN(1, 4) FX_TILE_FN(2, 4) FX_TILE_FN(3, 4)
FX_TILE_FN(1, 1) FX_TILE_FN(2, 1) FX_TILE_FN(3, 1)
#if FX_MR == 4
FX_TILE_FN(4, 4) FX_TILE_FN(4, 1)
#define FX_TILES_4 fx_tile_4x4
#define FX_TILES_1 fx_tile_4x1
#else
#define FX_TILES_4 NULL
#define FX_TILES_1 NULL
#endif

typedef void (*fx_tile_fn)(const float *, int, const float *, int, int, float *, int, int);

/* Rows [o0, o1) for m (1..FX_MR) tokens starting at x/out, one input chunk. */
static void fx_row_range(int m, const float *x, const float *w, int ld, int kn, float *out, int ldo, int o0,
                         int o1, int acc)
{
    static const fx_tile_fn wide[5] = { NULL, fx_tile_1x4, fx_tile_2x4, fx_tile_3x4, FX_TILES_4 };
    static const fx_tile_fn single[5] = { NULL, fx_tile_1x1, fx_tile_2x1, fx_tile_3x1, FX_TILES_1 };
    int o = o0;
    if (m == 1)
        for (; o + 8 <= o1; o += 8) fx_tile_1x8(x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o + 4 <= o1; o += 4) wide[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
    for (; o < o1; o++) single[m](x, ld, w + (size_t)o * ld, ld, kn, out + o, ldo, acc);
}

static void fx_block(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    const int K = a->n_in, ldo = a->n_out;
    const float *x = a->x.f, *w0 = (const float *)(const void *)a->w;
    int n_chunks = (K + FX_KC - 1) / FX_KC;
    int kc = ((K + n_chunks - 1) / n_chunks + FX_VL - 1) & ~(FX_VL - 1);   /* even chunks, whole vectors */

    for (int k0 = 0; k0 < K; k0 += kc) {
        int kn = K - k0 < kc ? K - k0 : kc;
        const float *w = w0 + k0;
        for (int tb = t0; tb < t1; tb += FX_TB) {
            int te = tb + FX_TB < t1 ? tb + FX_TB : t1;
            int full = tb + (te - tb) / FX_MR * FX_MR;            /* end of the whole tiles */
            /* Each group of 4 rows (in L1) visits every token tile of the block (in L2). */
            for (int o = o0; o < o1; o += 4) {
                int oe = o + 4 < o1 ? o + 4 : o1;
                for (int t = tb; t < full; t += FX_MR)
                    fx_row_range(FX_MR, x + (size_t)t * K + k0, w, K, kn, a->out + (size_t)t * ldo, ldo, o, oe,
                                 k0 > 0);
            }
            if (full < te)
                fx_row_range(te - full, x + (size_t)full * K + k0, w, K, kn, a->out + (size_t)full * ldo, ldo, o0,
                             o1, k0 > 0);
        }
    }
}

EBB_CPU_MATMUL(FX_FN(ebb_cpu_matmul_f32), EBB_TYPE_F32, fx_block, 8, 3)

/* ---------------------------------------------------------- shared loops */

/* sum a[i] * b[i] (rmsnorm's sum of squares): four accumulators, a masked
 * tail, one horizontal sum. */
static float fx_dot(const float *a, const float *b, int n)
{
    fx_vec s0 = fx_zero(), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 4 * FX_VL <= n; i += 4 * FX_VL) {
        s0 = fx_fma(fx_load(a + i), fx_load(b + i), s0);
        s1 = fx_fma(fx_load(a + i + FX_VL), fx_load(b + i + FX_VL), s1);
        s2 = fx_fma(fx_load(a + i + 2 * FX_VL), fx_load(b + i + 2 * FX_VL), s2);
        s3 = fx_fma(fx_load(a + i + 3 * FX_VL), fx_load(b + i + 3 * FX_VL), s3);
    }
    for (; i + FX_VL <= n; i += FX_VL) s0 = fx_fma(fx_load(a + i), fx_load(b + i), s0);
    if (i < n) {
        fx_mask m = fx_tail_mask(n - i);
        s1 = fx_fma(fx_load_tail(a + i, m), fx_load_tail(b + i, m), s1);
    }
    return fx_hsum(fx_add(fx_add(s0, s1), fx_add(s2, s3)));
}

/* e^(x - n ln2) for x already clamped to [-87.33, 88.3] and n = round(x /
 * ln2): range reduction (ln2 split in two so that n*ln2_hi is exact), then a
 * degree-6 Taylor polynomial on [-ln2/2, ln2/2]. The caller scales by 2^n. */
static inline __attribute__((always_inline)) fx_vec fx_exp_reduced(fx_vec x, fx_vec n)
{
    fx_vec r = fx_fnma(n, fx_set1(0.693359375f), x);
    r = fx_fnma(n, fx_set1(-2.12194440e-4f), r);
    fx_vec p = fx_set1(1.0f / 720);
    p = fx_fma(p, r, fx_set1(1.0f / 120));
    p = fx_fma(p, r, fx_set1(1.0f / 24));
    p = fx_fma(p, r, fx_set1(1.0f / 6));
    p = fx_fma(p, r, fx_set1(0.5f));
    p = fx_fma(p, r, fx_set1(1.0f));
    return fx_fma(p, r, fx_set1(1.0f));
}
