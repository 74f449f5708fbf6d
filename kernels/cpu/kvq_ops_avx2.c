/* Attention and KV-row ops, AVX2 + FMA + F16C; the same bits as
 * kvq_ops_scalar.c (backend.h defines the arithmetic).
 *
 * Scores: a tile of 4 queries x 2 rows keeps eight accumulators, one per
 * (query, row) pair, so each step over 8 values loads 6 vectors for 8 FMAs;
 * the eight pairs are reduced together by one hadd tree, whose order per
 * pair is exactly dot8's. Smaller tiles at the edges run the same code with
 * zero vectors in the unused slots, so a pair's bits never depend on the
 * tile it landed in. Values: a chunk of 64 outputs stays in eight registers
 * while the rows stream past (one broadcast and eight FMAs per row).
 * These are the AVX-512 path's too (its table takes them from here).
 * Row conversions: groups of 64 (every head size that is a multiple of 64)
 * decode a group's codes with one load (4-bit: 32 bytes, low nibbles are
 * values 0..31, high nibbles 32..63; 2-bit: 16 bytes, shifts 0, 2, 4, 6 are
 * values 0..15, 16..31, 32..47, 48..63); smaller groups use the scalar code.
 * Per-channel rows (kv_rows_qc) decode the same way; a group's 64 (d, m)
 * pairs are turned into floats once, into a stack buffer the rows then read.
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* [dot8 sum of p0, ..., of p7] */
ALWAYS_INLINE __m256 reduce8(const __m256 p[8]) {
    __m256 lo4 = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
    __m256 hi4 = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

/* Queries [j, j+M) x rows [r, r+N) into s; pair (m, n) is accumulator m*2+n. */
ALWAYS_INLINE void score_tile(const int M, const int N, float *s, size_t s_stride, const float *q, size_t q_stride,
                              const float *k, size_t k_stride, int n) {
    __m256 p[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) p[i] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 kv[2];
#pragma GCC unroll 2
        for (int c = 0; c < N; c++) kv[c] = _mm256_loadu_ps(k + (size_t)c * k_stride + i);
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            __m256 qv = _mm256_loadu_ps(q + (size_t)m * q_stride + i);
#pragma GCC unroll 2
            for (int c = 0; c < N; c++) p[m * 2 + c] = _mm256_fmadd_ps(qv, kv[c], p[m * 2 + c]);
        }
    }
    if (i < n) {
        const __m256i mask = tail_mask(n - i);
        __m256 kv[2];
#pragma GCC unroll 2
        for (int c = 0; c < N; c++) kv[c] = _mm256_maskload_ps(k + (size_t)c * k_stride + i, mask);
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            __m256 qv = _mm256_maskload_ps(q + (size_t)m * q_stride + i, mask);
#pragma GCC unroll 2
            for (int c = 0; c < N; c++) p[m * 2 + c] = _mm256_fmadd_ps(qv, kv[c], p[m * 2 + c]);
        }
    }
    float out[8];
    _mm256_storeu_ps(out, reduce8(p));
#pragma GCC unroll 4
    for (int m = 0; m < M; m++)
#pragma GCC unroll 2
        for (int c = 0; c < N; c++) s[(size_t)m * s_stride + c] = out[m * 2 + c];
}

typedef void (*score_tile_fn)(float *, size_t, const float *, size_t, const float *, size_t, int);
#define SCORE_TILE(M, N)                                                                                  \
    static void score_tile_##M##x##N(float *s, size_t ss, const float *q, size_t qs, const float *k, size_t ks, \
                                     int n) { score_tile(M, N, s, ss, q, qs, k, ks, n); }
SCORE_TILE(4, 2) SCORE_TILE(3, 2) SCORE_TILE(2, 2) SCORE_TILE(1, 2)
SCORE_TILE(4, 1) SCORE_TILE(3, 1) SCORE_TILE(2, 1) SCORE_TILE(1, 1)
static const score_tile_fn score_tiles[5][3] = {
    [1] = {NULL, score_tile_1x1, score_tile_1x2}, [2] = {NULL, score_tile_2x1, score_tile_2x2},
    [3] = {NULL, score_tile_3x1, score_tile_3x2}, [4] = {NULL, score_tile_4x1, score_tile_4x2},
};

void ebb_cpu_attn_scores_avx2(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                   size_t k_stride, int n_rows, int n) {
    for (int j = 0; j < n_q; j += 4) {
        const int M = n_q - j < 4 ? n_q - j : 4;
        for (int r = 0; r < n_rows; r += 2) {
            const int N = n_rows - r < 2 ? 1 : 2;
            score_tiles[M][N](s + (size_t)j * s_stride + r, s_stride, q + (size_t)j * q_stride, q_stride,
                              k + (size_t)r * k_stride, k_stride, n);
        }
    }
}

void ebb_cpu_attn_values_avx2(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n) {
    int i = 0;
    for (; i + 64 <= n; i += 64) {          /* 64 outputs in registers across the rows */
        __m256 acc[8];
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) acc[c] = _mm256_loadu_ps(y + i + 8 * c);
        for (int r = 0; r < n_rows; r++) {
            const float *row = v + (size_t)r * v_stride + i;
            const __m256 a = _mm256_broadcast_ss(p + r);
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * c), acc[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(y + i + 8 * c, acc[c]);
    }
    for (; i < n; i += 8) {                 /* the rest a vector at a time, the last one masked */
        const __m256i mask = tail_mask(n - i);
        __m256 acc = _mm256_maskload_ps(y + i, mask);
        for (int r = 0; r < n_rows; r++)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r), _mm256_maskload_ps(v + (size_t)r * v_stride + i, mask), acc);
        _mm256_maskstore_ps(y + i, mask, acc);
    }
}

ALWAYS_INLINE const uint8_t *row_at(const void *base, size_t stride, int r) {
    return (const uint8_t *)base + (size_t)r * stride;
}

void ebb_cpu_kv_rows_f16_avx2(float *out, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = (const uint16_t *)(const void *)row_at(rows, stride, r);
        float *o = out + (size_t)r * n;
        int i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + i))));
        for (; i < n; i++) o[i] = _cvtsh_ss(row[i]);
    }
}

/* The low 8 bytes of v as 8 floats. */
ALWAYS_INLINE __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

/* One group of 64 codes as eight vectors of values 0..7, 8..15, ... */
ALWAYS_INLINE void q4_codes(const uint8_t *c, __m256 v[8]) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)c);
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i l = _mm256_and_si256(b, mask), h = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    const __m128i part[4] = {_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1), _mm256_castsi256_si128(h),
                             _mm256_extracti128_si256(h, 1)};
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        v[2 * k] = u8x8(part[k]);
        v[2 * k + 1] = u8x8(_mm_srli_si128(part[k], 8));
    }
}

/* 16 bytes of 2-bit codes: shift 2k then mask gives values 16k .. 16k + 15
 * (a 16-bit shift lets bits of the next byte in at the top, which the mask
 * drops: 2k + 1 <= 7). */
ALWAYS_INLINE void q2_codes(const uint8_t *c, __m256 v[8]) {
    const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)c), mask = _mm_set1_epi8(3);
    const __m128i part[4] = {_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 2), mask),
                             _mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(_mm_srli_epi16(b, 6), mask)};
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        v[2 * k] = u8x8(part[k]);
        v[2 * k + 1] = u8x8(_mm_srli_si128(part[k], 8));
    }
}

ALWAYS_INLINE void q8_codes(const uint8_t *c, __m256 v[8]) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) v[k] = u8x8(_mm_loadl_epi64((const __m128i *)(const void *)(c + 8 * k)));
}

/* Group g's 64 codes of a row at c (8 * bits bytes per group). */
ALWAYS_INLINE void g64_codes(const int bits, const uint8_t *c, int g, __m256 v[8]) {
    if (bits == 2) q2_codes(c + g * 16, v);
    else if (bits == 4) q4_codes(c + g * 32, v);
    else q8_codes(c + g * 64, v);
}

ALWAYS_INLINE void rows_g64(const int bits, float *out, const uint8_t *codes, const uint16_t *dm, size_t stride,
                            int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint8_t *c = row_at(codes, stride, r);
        const uint16_t *p = (const uint16_t *)(const void *)row_at(dm, stride, r);
        for (int g = 0; g < n / 64; g++) {
            __m256 v[8];
            g64_codes(bits, c, g, v);
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(p[2 * g])), m = _mm256_set1_ps(_cvtsh_ss(p[2 * g + 1]));
            float *o = out + (size_t)r * n + 64 * g;
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(d, v[k], m));
        }
    }
}

void ebb_cpu_kv_rows_q_avx2(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                            int bits, int group) {
    if (group != 64) ebb_cpu_kv_rows_q_scalar(out, codes, dm, stride, n_rows, n, bits, group);
    else if (bits == 8) rows_g64(8, out, codes, dm, stride, n_rows, n);
    else if (bits == 4) rows_g64(4, out, codes, dm, stride, n_rows, n);
    else rows_g64(2, out, codes, dm, stride, n_rows, n);
}

/* Channels 64g .. 64g + 63: eight (d, m) pairs at a time, as halves
 * [d0 m0 d1 m1 ...], widened and split: shuffle gives [d0 d1 d4 d5 | d2 d3
 * d6 d7], the 64-bit permute puts them in order. f16 -> f32 is exact, so
 * this gives the scalar path's d and m. */
ALWAYS_INLINE void channel_pairs(const uint16_t *dm, int g, float d[64], float m[64]) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) {
        const uint16_t *p = dm + 2 * (64 * g + 8 * k);
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
        const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 8)));
        const __m256 dv = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 mv = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        _mm256_storeu_ps(d + 8 * k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(dv), 0xd8)));
        _mm256_storeu_ps(m + 8 * k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mv), 0xd8)));
    }
}

/* Group by group, so a group's pairs are converted once for all the rows. */
ALWAYS_INLINE void rows_qc_g64(const int bits, float *out, const uint8_t *codes, size_t stride, const uint16_t *dm,
                               int n_rows, int n) {
    for (int g = 0; g < n / 64; g++) {
        float d[64], m[64];
        channel_pairs(dm, g, d, m);
        for (int r = 0; r < n_rows; r++) {
            __m256 v[8];
            g64_codes(bits, row_at(codes, stride, r), g, v);
            float *o = out + (size_t)r * n + 64 * g;
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(_mm256_loadu_ps(d + 8 * k), v[k], _mm256_loadu_ps(m + 8 * k)));
        }
    }
}

void ebb_cpu_kv_rows_qc_avx2(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                             int bits, int group) {
    if (group != 64) ebb_cpu_kv_rows_qc_scalar(out, codes, stride, dm, n_rows, n, bits, group);
    else if (bits == 2) rows_qc_g64(2, out, codes, stride, dm, n_rows, n);
    else if (bits == 4) rows_qc_g64(4, out, codes, stride, dm, n_rows, n);
    else rows_qc_g64(8, out, codes, stride, dm, n_rows, n);
}
