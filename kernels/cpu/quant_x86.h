/* The W4G64 matmul for x86 SIMD, written once for AVX2 and AVX-512 VNNI.
 *
 * Included by quant_avx2.c and quant_avx512.c (each compiled with its own ISA
 * flags), which first define QX_ISA (the name suffix) and the integer steps,
 * the only place the instruction sets differ:
 *   qx_dot_w4(lo, hi, a_lo, a_hi): lanes (of the ISA's choice of width)
 *       summing lo*a_lo + hi*a_hi, lo/hi unsigned bytes 0..15 (weight
 *       nibbles), a signed codes;
 *   qx_reduce8_w4(p[8]): [sum of p0's lanes, ..., sum of p7's] as int32.
 * AVX2 builds them from maddubs and keeps W4 sums in int16 lanes until the
 * reduction; VNNI does each dot step in vpdpbusd.
 *
 * Exactness. Every path must give the scalar path's bits (quant_scalar.c,
 * float steps in ops.h). Integer sums are exact in any order, so the only
 * care is in the float steps: per output, acc = fma((float)isum, d * s, acc)
 * block after block in order, with the FMA instruction; d comes from
 * vcvtph2ps, which is exact.
 *
 * Matmul design. A W4G64 block is 34 bytes: f16 d and 32 bytes of nibbles
 * for 64 inputs. The definition needs each block's exact integer sum before it meets the
 * scales, so a kernel cannot keep lane-wise partial sums across blocks as
 * ggml's dot products do: every (token, row, block) ends in a horizontal
 * sum. Tiles are therefore sized for those sums: a tile is M tokens x N rows
 * with M*N <= 8 "pairs"; for each block, the 8 pairs' lane vectors are summed
 * together by one hadd tree (9-11 instructions for 8 sums), and the 8 sums
 * meet their scales as one vector: one convert, one multiply (d*s), one FMA
 * into a vector accumulator whose lane k belongs to pair k.
 * Pair k = r*MS + m (row r, token m; MS = M rounded up to 1, 2 or 4), so the
 * tokens' scales are a broadcast of MS consecutive floats and the rows' d a
 * permute of N converted halves.
 *   Prefill: 4 tokens x 2 rows. A row's block is unpacked once (load, and,
 *   shift, and) for 4 tokens; activations are read straight from L1 as
 *   memory operands.
 *   Decode: 1 token x 8 rows; rows stream from memory, which bounds it.
 *   Eight short rows walked side by side (306 bytes each for 576 inputs) do
 *   not look like a stream to the hardware prefetchers, so a decode tile
 *   prefetches the next tile's rows (contiguous with its own) as it goes, and
 *   each row range starts by prefetching its first tile. On the 2-core
 *   development VM this took decode from about 8 to 14-20 GB/s.
 * W4G64 nibbles are used unsigned (0..15), as the unsigned operand both ISAs
 * need, and the offset is taken out once per pair: sum (w-8)*a = sum w*a - 8 *
 * sum a, with 8 * sum a per (token, group) precomputed for a block of tokens
 * (no sign tricks in the inner loop).
 * Blocking: tokens in blocks of TB (their codes stay in L2 while each pair of
 * rows, in L1, meets all of them), the input dimension in even chunks of at
 * most KG groups (accumulators go through out between chunks, exactly: the
 * float sequence is unchanged). Every output's bits depend only on its own
 * row and token, so any split over threads or tiles gives the same results
 * (batch invariance).
 */
#ifndef QX_ISA
#error "define QX_ISA and the dot steps before including quant_x86.h"
#endif

#include "kernels/cpu/ops.h"
#include "kernels/formats.h"

#include <immintrin.h>
#include <string.h>

#define QX_CAT2(a, b) a##_##b
#define QX_CAT(a, b) QX_CAT2(a, b)
#define QX_FN(name) QX_CAT(name, QX_ISA)

#include "kernels/cpu/simd_x86.h"

#define BLOCK_BYTES EBB_W4G64_BLOCK_BYTES
#define TB 32                 /* tokens per block (multiple of 4) */
#define KG 32                 /* most groups of 64 inputs per chunk */
#define PF_TILES 1            /* decode: prefetch distance, in tiles of rows */

/* ---------------------------------------------------------------- matmuls */

/* Per token block and input chunk: the tokens' group scales and 8 x
 * the sum of each group's codes, token-minor so that MS consecutive tokens
 * are one load. Padded by 4 so a broadcast of 4 never leaves the array. */
struct qctx {
    const struct matmul_args *a;
    int groups, g0, g1, tb;
    int32_t corr[KG][TB + 4];
    float scale[KG][TB + 4];
    float rowd[KG][8];    /* prefill: the current row pair's block scales as 4 x d0, 4 x d1 */
};

/* Sum of 64 signed bytes: shifted to unsigned (xor 0x80) for vpsadbw. */
ALWAYS_INLINE int32_t sum64_i8(const int8_t *p)
{
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256i s0 = _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), bias),
                                 _mm256_setzero_si256());
    __m256i s1 = _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32)), bias),
                                 _mm256_setzero_si256());
    __m256i s = _mm256_add_epi64(s0, s1);
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi64(h, _mm_unpackhi_epi64(h, h));
    return (int32_t)_mm_cvtsi128_si32(h) - 64 * 128;
}

static void fill_ctx(struct qctx *c, int te)
{
    const struct matmul_args *a = c->a;
    for (int g = c->g0; g < c->g1; g++) {
        int gl = g - c->g0;
        for (int t = c->tb; t < te; t++) {
            c->scale[gl][t - c->tb] = a->x.s[(size_t)t * c->groups + g];
            c->corr[gl][t - c->tb] = 8 * sum64_i8(a->x.q + (size_t)t * a->n_in + (size_t)g * 64);
        }
        for (int t = te - c->tb; t < TB + 4; t++) {
            c->scale[gl][t] = 0;
            c->corr[gl][t] = 0;
        }
    }
}

#ifdef QX_W4_LANES_INT32
ALWAYS_INLINE __m256i qx_reduce8_w4(const __m256i p[8]) { return reduce8(p); }
#endif

/* MS consecutive floats / ints from p, repeated across the 8 lanes. */
ALWAYS_INLINE __m256 bcast_ps(const int MS, const float *p)
{
    if (MS == 4) return _mm256_broadcast_ps((const __m128 *)p);
    if (MS == 2) return _mm256_castpd_ps(_mm256_broadcast_sd((const double *)p));
    return _mm256_broadcast_ss(p);
}

ALWAYS_INLINE __m256i bcast_epi32(const int MS, const int32_t *p)
{
    if (MS == 4) return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    int64_t v2;
    if (MS == 2) { memcpy(&v2, p, 8); return _mm256_set1_epi64x(v2); }
    return _mm256_set1_epi32(*p);
}

/* The f16 scales of N rows' blocks at byte offset off, lane k = d of row k / MS. */
ALWAYS_INLINE __m256 row_scales(const int N, const int MS, const uint8_t *const *w, size_t off)
{
    uint16_t h[8] = { 0 };
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) memcpy(&h[r], w[r] + off, 2);
    __m256 d = _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3],
                                              (short)h[4], (short)h[5], (short)h[6], (short)h[7]));
    if (MS == 4) return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    if (MS == 2) return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    return d;
}

/* The lane sums of one weight block (at byte offset off in each of N rows)
 * with M tokens' codes (at aq_off in each): p[r * MS + m] for row r, token
 * m, the other slots zero. Nibbles are unpacked once per row for all tokens. */
ALWAYS_INLINE void block_dots(const int M, const int N, const int MS, const uint8_t *const *wr, size_t off,
                              const int8_t *const *qt, size_t aq_off, __m256i p[8])
{
    const __m256i nib = _mm256_set1_epi8(0x0f);
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) p[k] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wr[r] + off + 2));
        const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
#pragma GCC unroll 4
        for (int m = 0; m < M; m++)
            p[r * MS + m] = qx_dot_w4(lo, hi, _mm256_loadu_si256((const __m256i *)(qt[m] + aq_off)),
                                      _mm256_loadu_si256((const __m256i *)(qt[m] + aq_off + 32)));
    }
}

/* One tile: tokens [t, t+M) x rows [o, o+N) over the chunk's groups. The
 * first chunk starts each output from 0, later ones continue from out. */
ALWAYS_INLINE void tile(const int M, const int N, const struct qctx *c, int t, int o)
{
    const int MS = M == 1 ? 1 : M == 2 ? 2 : 4;
    const struct matmul_args *a = c->a;
    const int8_t *qt[4];
    const uint8_t *wr[8];
#pragma GCC unroll 4
    for (int m = 0; m < M; m++) qt[m] = a->x.q + (size_t)(t + m) * a->n_in;
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) wr[r] = weight_row(a, o + r);

    float lanes[8] = { 0 };
    if (c->g0 > 0)
        for (int r = 0; r < N; r++)
            for (int m = 0; m < M; m++) lanes[r * MS + m] = a->out[(size_t)(t + m) * a->n_out + o + r];
    __m256 acc = _mm256_loadu_ps(lanes);

    const int tl = t - c->tb;
    /* Decode streams its rows from memory once: fetch the rows PF_TILES
     * tiles ahead (contiguous with these), a tile's worth per block step.
     * (uintptr_t: the address may lie past the matrix; prefetches never fault.) */
    const uintptr_t pf_base = (uintptr_t)wr[0] + (uintptr_t)PF_TILES * N * a->row_bytes;
    const size_t pf_step = (size_t)N * BLOCK_BYTES;
    for (int g = c->g0; g < c->g1; g++) {
        const int gl = g - c->g0;
        if (M == 1)
#pragma GCC unroll 8
            for (size_t l = 0; l < pf_step + 63; l += 64)
                _mm_prefetch((const char *)(pf_base + (size_t)g * pf_step + l), _MM_HINT_T0);
        const __m256 s = bcast_ps(MS, &c->scale[gl][tl]);
        const size_t off = (size_t)g * BLOCK_BYTES;
        __m256i p[8];
        block_dots(M, N, MS, wr, off, qt, (size_t)g * 64, p);
        __m256i sums = _mm256_sub_epi32(qx_reduce8_w4(p), bcast_epi32(MS, &c->corr[gl][tl]));
        /* Prefill tiles share their rows' scales, converted once per row pair. */
        __m256 ds = _mm256_mul_ps(M == 4 ? _mm256_loadu_ps(c->rowd[gl]) : row_scales(N, MS, wr, off), s);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), ds, acc);
    }

    _mm256_storeu_ps(lanes, acc);
    for (int r = 0; r < N; r++)
        for (int m = 0; m < M; m++) a->out[(size_t)(t + m) * a->n_out + o + r] = lanes[r * MS + m];
}

typedef void (*tile_fn)(const struct qctx *c, int t, int o);

/* c->rowd for rows [o, o + n), n 1 or 2 (a missing second row scales by 0). */
static void fill_row_scales(struct qctx *c, int o, int n)
{
    const uint8_t *w[2] = { weight_row(c->a, o), weight_row(c->a, o + n - 1) };
    for (int g = c->g0; g < c->g1; g++) {
        __m256 d = row_scales(2, 4, w, (size_t)g * BLOCK_BYTES);
        if (n == 1) d = _mm256_blend_ps(d, _mm256_setzero_ps(), 0xf0);
        _mm256_storeu_ps(c->rowd[g - c->g0], d);
    }
}

#define TILE_FN(M, N) \
    static void tile_##M##x##N(const struct qctx *c, int t, int o) { tile(M, N, c, t, o); }
TILE_FN(4, 2) TILE_FN(4, 1) TILE_FN(3, 2) TILE_FN(3, 1)
TILE_FN(2, 4) TILE_FN(2, 3) TILE_FN(2, 2) TILE_FN(2, 1)
TILE_FN(1, 8) TILE_FN(1, 7) TILE_FN(1, 6) TILE_FN(1, 5)
TILE_FN(1, 4) TILE_FN(1, 3) TILE_FN(1, 2) TILE_FN(1, 1)
/* [M][N]: the tile for M tokens and N rows (N up to 8 / MS) */
static const tile_fn tiles[5][9] = {
    [1] = { NULL, tile_1x1, tile_1x2, tile_1x3, tile_1x4, tile_1x5, tile_1x6, tile_1x7, tile_1x8 },
    [2] = { NULL, tile_2x1, tile_2x2, tile_2x3, tile_2x4 },
    [3] = { NULL, tile_3x1, tile_3x2 },
    [4] = { NULL, tile_4x1, tile_4x2 },
};

/* Rows [o0, o1) for the M tokens at t, in tiles of the widest N. */
static void tile_rows(const tile_fn row_tiles[9], int M, const struct qctx *c, int t, int o0, int o1)
{
    const int n_max = M == 1 ? 8 : M == 2 ? 4 : 2;
    if (M == 1) {
        /* Decode: the tiles fetch their successors; start the first one here. */
        const char *p = (const char *)weight_row(c->a, o0);
        size_t len = (size_t)(o1 - o0 < n_max ? o1 - o0 : n_max) * c->a->row_bytes;
        for (size_t l = 0; l < len; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
    }
    int o = o0;
    for (; o + n_max <= o1; o += n_max) row_tiles[n_max](c, t, o);
    if (o < o1) row_tiles[o1 - o](c, t, o);
}

void QX_FN(ebb_cpu_block_w4g64)(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    struct qctx c;
    c.a = a;
    c.groups = a->n_in / EBB_ACT_GROUP;
    int chunks = (c.groups + KG - 1) / KG;
    int kg = (c.groups + chunks - 1) / chunks;                  /* even chunks */
    for (c.g0 = 0; c.g0 < c.groups; c.g0 += kg) {
        c.g1 = c.g0 + kg < c.groups ? c.g0 + kg : c.groups;
        for (c.tb = t0; c.tb < t1; c.tb += TB) {
            int te = c.tb + TB < t1 ? c.tb + TB : t1;
            fill_ctx(&c, te);
            int quads_end = c.tb + (te - c.tb) / 4 * 4;
            /* Each pair of rows (in L1) meets every token quad of the block (in L2). */
            if (quads_end > c.tb)
                for (int o = o0; o < o1; o += 2) {
                    const int n = o + 2 <= o1 ? 2 : 1;
                    fill_row_scales(&c, o, n);
                    const tile_fn f = tiles[4][n];
                    for (int t = c.tb; t < quads_end; t += 4) f(&c, t, o);
                }
            if (te > quads_end) tile_rows(tiles[te - quads_end], te - quads_end, &c, quads_end, o0, o1);
        }
    }
}

#ifndef QX_RECTANGLE_ONLY
EBB_CPU_MATMUL(QX_FN(ebb_cpu_matmul_w4g64), EBB_TYPE_W4G64, QX_FN(ebb_cpu_block_w4g64), 8, 4)
#endif
