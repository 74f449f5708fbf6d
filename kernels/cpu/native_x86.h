/* The native GGUF products (native.h), and W2G64's, for x86 SIMD, written
 * once for AVX2 and AVX-512 VNNI.
 *
 * Included by native_avx2.c and native_avx512.c (each compiled with its own
 * ISA flags), which first define NX_ISA (the name suffix) and the two integer
 * steps, the only place the instruction sets differ:
 *   nx_dot(acc, u, s): acc + the int32 lanes summing 4 products u*s each,
 *       u unsigned bytes, s signed bytes (never -128);
 *   nx_dot_scaled(acc, u, s, sc): acc + the int32 lanes summing 2 int16
 *       lanes of pairwise u*s products, each times its int16 lane of sc.
 * AVX2 builds them from vpmaddubsw and vpmaddwd; VNNI has vpdpbusd and
 * vpdpwssd. Both run at 256 bits: each (row, token, block) ends in a
 * horizontal sum (below), and 512-bit vectors would double that work.
 *
 * Exactness. Every output must equal the scalar path's bits
 * (native_scalar.c, float steps in native.h). The integer sums are exact in
 * any order (no int16 step can saturate: a vpmaddubsw pair is at most 2 * 128
 * * 127 for Q8_0's |w| and 2 * 63 * 127 for Q6_K's unsigned codes), so the
 * kernels are free to regroup them:
 * - codes with an offset (Q4_0 8, Q5_0 16, Q3_K 4, Q6_K 32) are used
 *   unsigned, as the unsigned operand the instructions need, and the offset
 *   comes back through the activations' stored code sums: sum (v - k) * a =
 *   sum v * a - k * sum a (per 16 values for Q3_K and Q6_K, times their scale);
 * - Q8_0's signed weights multiply as |w| against a carrying w's sign;
 * - a K-quant's sub-block scales multiply the int16 pair sums in their lanes,
 *   so a super-block needs one horizontal sum, not sixteen.
 * The float steps are native.h's, in its order, with the FMA instruction:
 * one lane per (row, token) pair, acc = fma((float)isum, d_w * d_a, acc) per
 * block, d_w from vcvtph2ps (exact) and the product rounded first.
 * Activation codes are round-half-away-from-zero of one rounded product x *
 * inv, made opaque to the optimizer so that gnu11's -ffp-contract=fast can
 * never fuse it into what follows.
 *
 * Matmul design. A tile is M tokens x N rows with M * N = 8 pairs: per block
 * each pair's lane vector is formed, the 8 are summed by one hadd tree, and
 * the 8 sums meet their scales as one vector. Shapes:
 *   decode 1 x 8: rows stream from memory once; eight short rows side by
 *   side do not look like a stream to the prefetchers, so each tile fetches
 *   its successor's rows (contiguous with its own) as it goes;
 *   2 x 4 and prefill 4 x 2: each row's unpacked block serves every token;
 *   a pair of rows (in L1) meets all tokens of a block of TB (in L2).
 * On the AVX-512 path (NX_WIDE_PREFILL) whole tiles of 16 rows go
 * another way: their blocks are rewritten into interleaved codes so each
 * lane is one row's sum -- packed into a chunk for prefill of 9 tokens or
 * more (see "wide prefill"), or, for Q4_0, Q4_1 and Q8_0 at any count and
 * Q4_K and Q5_K at 5-16, transposed into registers where each token's sums
 * stay (row16_rows).
 * The AVX2 path does the latter over 8 rows for Q4_0 and Q4_1 from 3
 * tokens and Q4_K and Q5_K from 5 (row8_rows).
 * native_amx.c compiles this file a third time with NX_AMX: the same
 * interleaved codes are the tile unit's operand, and the legacy types from
 * 3 tokens (Q4_0, Q4_1 and Q8_0 from 25), Q4_K and Q5_K from 13, multiply
 * on it (see "on AMX").
 * Edges reuse the same three shapes: a missing row or token repeats the
 * tile's first one and its lanes are not stored. Lanes never mix, so every
 * output depends only on its own row and token: any rectangle, split over
 * threads or not, gives the same bits (batch invariance).
 */
#ifndef NX_ISA
#error "define NX_ISA and the dot steps before including native_x86.h"
#endif

#include "kernels/cpu/native.h"
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <limits.h>
#include <string.h>

#define NX_CAT2(a, b) a##_##b
#define NX_CAT(a, b) NX_CAT2(a, b)
#define NX_FN(name) NX_CAT(name, NX_ISA)

#include "kernels/cpu/simd_x86.h"

#define TB 32   /* tokens per block of the prefill loop (multiple of 4) */
/* Products of fewer tokens stream each row once, so their tiles prefetch
 * as decode's do, and on the AVX-512 path they take the tiles, not the wide
 * prefill: packing a row tile costs more than it saves below about 9 tokens
 * (a verification pass of speculative decoding has 2 to 9; `ebb bench
 * --verify 16`: 4 tokens took 1.9 one-token passes on the tiles, 2.7 wide;
 * 9 took 4.1 on the tiles, 3.7 wide). Q4_0, Q4_1 and Q8_0 take neither:
 * row16_rows is quicker at every count. */
#define WIDE_MIN_TOKENS 9
/* Q4_K and Q5_K in registers (row16_k4_tokens) from 5 tokens: the 1 x 8,
 * 2 x 4 and 4 x 2 tiles are as quick at 2-4 (a Q4_K_M-shaped 1.1B's pass of
 * 2 / 4 tokens 38.8 / 43.6 ms on the tiles, 40.6 / 46.4 here; 5 / 8 tokens
 * 60.6 / 77.2 against 54.2 / 64.3). Up to 16 on the VNNI path (its wide
 * path took 5-13% longer at 9-32 tokens for Q4_K, but a Q5_K prefill of 256
 * 13% less: the fifth bits are merged again for every 8 tokens here, once
 * for all in its pack), up to 12 on AMX (the tile unit is as quick from 14). */
#define K_ROW16_MIN_TOKENS 5
#define K_ROW16_MAX_TOKENS 16
#define K_ROW16_MAX_TOKENS_AMX 12

/* The legacy types (blocks of 32) and ebb's W2G64 (blocks of 64, walked
 * as two halves of 32 against the two activation blocks), then the
 * K-quants. */
enum { NT_Q4_0, NT_Q4_1, NT_Q5_0, NT_Q5_1, NT_Q8_0, NT_W2G64, NT_Q2_K, NT_Q3_K, NT_Q4_K, NT_Q5_K, NT_Q6_K,
       NT_W4G64 /* ebb's W4G64 (quant_x86.h's product), here only for AMX */ };

ALWAYS_INLINE int is_k(const int T) { return T >= NT_Q2_K && T <= NT_Q6_K; }

ALWAYS_INLINE int min_int(int x, int y) { return x < y ? x : y; }

/* Bytes per block of 32 (per 256 for the K-quants; W2G64: half its 20). */
ALWAYS_INLINE size_t block_bytes(const int T)
{
    static const unsigned short bytes[] = { 18, 20, 22, 24, 34, 10, 84, 110, 144, 176, 210, 34 };
    return bytes[T];
}

/* Where activation block b's weights start in a row: W2G64's two halves
 * share their block's (d, m). */
ALWAYS_INLINE size_t block_at(const int T, int b)
{
    return T == NT_W2G64 ? (size_t)(b >> 1) * 20 : (size_t)b * block_bytes(T);
}

/* Types whose blocks have a minimum (x = d * q + m). */
ALWAYS_INLINE int has_min(const int T) { return T == NT_Q4_1 || T == NT_Q5_1 || T == NT_W2G64; }

ALWAYS_INLINE uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

ALWAYS_INLINE short ld16(const uint8_t *p)
{
    short v;
    memcpy(&v, p, 2);
    return v;
}

ALWAYS_INLINE __m256i ld256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* ------------------------------------------------------- activation forms */

/* The scalar path's block_scale() rule from the block's absolute maximum. */
ALWAYS_INLINE float scale_of(__m256 m, float qmax, float *inv)
{
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float d;
    *inv = act_inverse(_mm_cvtss_f32(m4), qmax, &d);
    return d;
}

ALWAYS_INLINE __m256 absmax_of(const float *x, int n)
{
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
    return m;
}

/* 32 codes of x as int32 lanes c[0..3], stored to q as bytes. */
ALWAYS_INLINE void codes32(const float *x, __m256 vinv, int8_t *q, __m256i c[4])
{
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        c[i] = _mm256_cvttps_epi32(round_half_away(opaque(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), vinv))));
    /* Packing interleaves 128-bit lanes; the permute restores the order. */
    __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

#ifndef NX_AMX   /* the AMX path quantizes with the AVX-512 path's functions */
void NX_FN(ebb_native_quantize_q8b32)(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *s)
{
    for (int b = 0; b < n / EBB_NATIVE_QK; b++, x += EBB_NATIVE_QK, q += EBB_NATIVE_QK) {
        float inv;
        d[b] = scale_of(absmax_of(x, EBB_NATIVE_QK), b < n_hi ? 127.0f : 7.0f, &inv);
        __m256i c[4];
        codes32(x, _mm256_set1_ps(inv), q, c);
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 1));
        s[b] = (int16_t)_mm_cvtsi128_si32(h);
    }
}

void NX_FN(ebb_native_quantize_q8k)(const float *x, int n, int8_t *q, float *d, int16_t *bsums)
{
    for (int b = 0; b < n / EBB_NATIVE_QK_K; b++, x += EBB_NATIVE_QK_K, q += EBB_NATIVE_QK_K, bsums += 16) {
        float inv;
        d[b] = scale_of(absmax_of(x, EBB_NATIVE_QK_K), 127.0f, &inv);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int half = 0; half < 2; half++) {      /* 128 values: eight sums of 16 */
            __m256i g[8];
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m256i c[4];
                const int at = 128 * half + 32 * k;
                codes32(x + at, vinv, q + at, c);
                g[2 * k] = _mm256_add_epi32(c[0], c[1]);
                g[2 * k + 1] = _mm256_add_epi32(c[2], c[3]);
            }
            __m256i sums = reduce8(g);
            __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
            _mm_storeu_si128((__m128i *)(bsums + 8 * half), s16);
        }
    }
}
#endif

/* ------------------------------------------------------ tiles' shared parts */

/* M tokens' floats / int16s at index i, repeated across the 8 lanes (lane k
 * holds token k % M). */
ALWAYS_INLINE __m256 tok_ps(const int M, const float *const *p, size_t i)
{
    if (M == 1) return _mm256_set1_ps(p[0][i]);
    __m128 v = M == 2 ? _mm_setr_ps(p[0][i], p[1][i], p[0][i], p[1][i]) : _mm_setr_ps(p[0][i], p[1][i], p[2][i], p[3][i]);
    return _mm256_set_m128(v, v);
}

ALWAYS_INLINE __m256i tok_epi32(const int M, const int16_t *const *p, size_t i)
{
    if (M == 1) return _mm256_set1_epi32(p[0][i]);
    __m128i v = M == 2 ? _mm_setr_epi32(p[0][i], p[1][i], p[0][i], p[1][i])
                       : _mm_setr_epi32(p[0][i], p[1][i], p[2][i], p[3][i]);
    return _mm256_set_m128i(v, v);
}

/* The f16 at byte off of the N rows' blocks, lane k = row k / M. */
ALWAYS_INLINE __m256 row_f16(const int N, const int M, const uint8_t *const *w, size_t off)
{
    __m128i h = N == 8 ? _mm_setr_epi16(ld16(w[0] + off), ld16(w[1] + off), ld16(w[2] + off), ld16(w[3] + off),
                                        ld16(w[4] + off), ld16(w[5] + off), ld16(w[6] + off), ld16(w[7] + off))
              : N == 4 ? _mm_setr_epi16(ld16(w[0] + off), ld16(w[1] + off), ld16(w[2] + off), ld16(w[3] + off), 0, 0, 0, 0)
                       : _mm_setr_epi16(ld16(w[0] + off), ld16(w[1] + off), 0, 0, 0, 0, 0, 0);
    __m256 d = _mm256_cvtph_ps(h);
    if (M == 4) return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    if (M == 2) return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    return d;
}

/* The tile's row and token pointers; a missing row or token repeats the first. */
struct tile_at {
    const uint8_t *w[8];
    const int8_t *q[4];
    const float *d[4];
    const int16_t *s[4];
};

ALWAYS_INLINE void tile_pointers(const int T, const int M, const int N, const struct ebb_native_matmul_args *a,
                                 int t, int mv, int o, int nv, struct tile_at *p)
{
    const int per_d = is_k(T) ? EBB_NATIVE_QK_K : EBB_NATIVE_QK, per_sum = is_k(T) ? 16 : 32;
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) p->w[r] = a->w + (size_t)(o + (r < nv ? r : 0)) * a->row_bytes;
#pragma GCC unroll 4
    for (int m = 0; m < M; m++) {
        const size_t tm = (size_t)(t + (m < mv ? m : 0));
        p->q[m] = a->q + tm * (size_t)a->n_in;
        p->d[m] = a->d + tm * (size_t)(a->n_in / per_d);
        p->s[m] = a->sums + tm * (size_t)(a->n_in / per_sum);
    }
}

/* Decode: fetch the next tile's rows (contiguous with these), a tile's worth
 * per block step. (uintptr_t: the address may lie past the matrix;
 * prefetches never fault.) */
ALWAYS_INLINE void prefetch_next(const int N, const size_t BB, const struct ebb_native_matmul_args *a,
                                 const struct tile_at *p, int b)
{
    const uintptr_t base = (uintptr_t)p->w[0] + (uintptr_t)N * a->row_bytes + (uintptr_t)b * N * BB;
#pragma GCC unroll 8
    for (size_t l = 0; l < N * BB + 63; l += 64) _mm_prefetch((const char *)(base + l), _MM_HINT_T0);
}

ALWAYS_INLINE void store_tile(const int M, const struct ebb_native_matmul_args *a, __m256 acc, int t, int mv,
                              int o, int nv)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int r = 0; r < nv; r++)
        for (int m = 0; m < mv; m++) a->out[(size_t)(t + m) * a->n_out + o + r] = lanes[r * M + m];
}

/* ------------------------------------------------------ legacy block types */

/* 16 bytes of nibbles as 32 unsigned bytes: value j < 16 the low nibble of
 * byte j, value 16 + j its high nibble. */
ALWAYS_INLINE __m256i nibbles32(const uint8_t *p)
{
    __m128i x = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0f));
}

/* Bit j of qh as 16 in byte j. */
ALWAYS_INLINE __m256i fifth_bits32(uint32_t qh)
{
    const __m256i byte_of = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), byte_of), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
}

/* Half h of W2G64's 16 code bytes as 32 unsigned bytes: values 32h + j and
 * 32h + 16 + j sit at bits 4h and 4h + 2 of byte j. */
ALWAYS_INLINE __m256i pairs32(const uint8_t *p, int h)
{
    __m128i x = _mm_srl_epi16(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128(4 * h));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 2), x), _mm256_set1_epi8(3));
}

/* Activation block b's 32 codes (blk: where block_at puts it): unsigned for
 * the 2-, 4- and 5-bit types, Q8_0's signed. */
ALWAYS_INLINE __m256i legacy_codes(const int T, const uint8_t *blk, int b)
{
    switch (T) {
    case NT_W2G64: return pairs32(blk + 4, b & 1);
    case NT_Q4_0: return nibbles32(blk + 2);
    case NT_Q4_1: return nibbles32(blk + 4);
    case NT_Q5_0: return _mm256_or_si256(nibbles32(blk + 6), fifth_bits32(ld32(blk + 2)));
    case NT_Q5_1: return _mm256_or_si256(nibbles32(blk + 8), fifth_bits32(ld32(blk + 4)));
    default: return ld256(blk + 2);
    }
}

/* Block b (at byte off of each row) of a tile's pairs, added to acc. */
ALWAYS_INLINE __m256 legacy_step(const int T, const int M, const int N, const struct tile_at *pt, int b, size_t off,
                             __m256 acc)
{
    const struct tile_at p = *pt;
    __m256i v[8];
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) {
        const __m256i w = legacy_codes(T, p.w[r] + off, b);
        const __m256i u = T == NT_Q8_0 ? _mm256_abs_epi8(w) : w;
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            __m256i s = ld256(p.q[m] + (size_t)EBB_NATIVE_QK * b);
            if (T == NT_Q8_0) s = _mm256_sign_epi8(s, w);
            v[r * M + m] = nx_dot(_mm256_setzero_si256(), u, s);
        }
    }
    __m256i isum = reduce8(v);
    if (T == NT_Q4_0 || T == NT_Q5_0)
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(tok_epi32(M, p.s, b), T == NT_Q4_0 ? 3 : 4));
    const __m256 da = tok_ps(M, p.d, b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(row_f16(N, M, p.w, off), da), acc);
    if (has_min(T))
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tok_epi32(M, p.s, b)),
                              _mm256_mul_ps(row_f16(N, M, p.w, off + 2), da), acc);
    return acc;
}

/* --------------------------------------------------------------- K-quants */

/* A super-block's scales as 16 int16 lanes, lane i the scale of values 16i ..
 * 16i + 15 (Q4_K/Q5_K: each 32-value scale twice), and likewise its minimums
 * (types that have them). */
ALWAYS_INLINE void k_scales(const int T, const uint8_t *blk, __m256i *sc, __m256i *mins)
{
    if (T == NT_Q6_K) {
        *sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    } else if (T == NT_Q2_K) {
        const __m128i x = _mm_loadu_si128((const __m128i *)blk), low = _mm_set1_epi8(0x0f);
        *sc = _mm256_cvtepu8_epi16(_mm_and_si128(x, low));
        *mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(x, 4), low));
    } else if (T == NT_Q3_K) {
        /* low 4 bits: scale i < 8 from byte i's low nibble, i >= 8 from byte
         * i - 8's high one; top 2 bits of scale i: byte 8 + i % 4 at bit 2 * (i / 4) */
        const __m128i x = _mm_loadl_epi64((const __m128i *)(blk + 96)), low = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(x, low), _mm_and_si128(_mm_srli_epi16(x, 4), low));
        __m128i hi = _mm_srlv_epi32(_mm_set1_epi32((int)ld32(blk + 104)), _mm_setr_epi32(0, 2, 4, 6));
        hi = _mm_slli_epi32(_mm_and_si128(hi, _mm_set1_epi8(3)), 4);
        *sc = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_or_si128(lo, hi), _mm_set1_epi8(32)));
    } else {
        /* Q4_K/Q5_K's 12 bytes as words s0 (bytes 0-3), s1 (4-7), s2 (8-11):
         * scales 0-3 the low 6 bits of s0, mins 0-3 of s1; scales 4-7 the
         * low nibbles of s2 with s0's top 2 bits above, mins 4-7 s2's high
         * nibbles with s1's top bits (formats.c's ebb_k4_scale_min). */
        const uint32_t s0 = ld32(blk + 4), s1 = ld32(blk + 8), s2 = ld32(blk + 12);
        const __m128i v = _mm_setr_epi32((int)(s0 & 0x3f3f3f3f),
                                         (int)((s2 & 0x0f0f0f0f) | ((s0 >> 2) & 0x30303030)),
                                         (int)(s1 & 0x3f3f3f3f),
                                         (int)(((s2 >> 4) & 0x0f0f0f0f) | ((s1 >> 2) & 0x30303030)));
        *sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
        *mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
    }
}

/* Lanes 0-7: the scale of values 32c .. 32c + 15; lanes 8-15: of the next 16
 * (the int16 lanes a vpmaddubsw of 32 values makes). */
ALWAYS_INLINE __m256i chunk_scale(__m256i sc, const int c)
{
    /* Two literal immediates: clang wants one at the call, before inlining. */
    const __m256i half = c < 4 ? _mm256_permute2x128_si256(sc, sc, 0x00) : _mm256_permute2x128_si256(sc, sc, 0x11);
    const int k = c & 3;
    const __m256i pick = _mm256_set_m128i(_mm_set1_epi16((short)(((4 * k + 3) << 8) | (4 * k + 2))),
                                          _mm_set1_epi16((short)(((4 * k + 1) << 8) | (4 * k))));
    return _mm256_shuffle_epi8(half, pick);
}

/* Values 32c .. 32c + 31 of a super-block as unsigned bytes (Q3_K's codes
 * plus 4, Q6_K's plus 32: the offsets are taken out with the code sums). */
ALWAYS_INLINE __m256i k_codes(const int T, const uint8_t *blk, const int c)
{
    const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    const int half = c / 4, run = c % 4;
    switch (T) {
    case NT_Q4_K:
    case NT_Q5_K: {
        const __m256i x = ld256(blk + (T == NT_Q4_K ? 16 : 48) + 32 * (c / 2));
        __m256i v = _mm256_and_si256(c & 1 ? _mm256_srli_epi16(x, 4) : x, low4);
        if (T == NT_Q5_K)   /* bit c of qh[l] is bit 4 */
            v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(ld256(blk + 16), c), one), 4));
        return v;
    }
    case NT_Q6_K: {
        const __m256i ql = ld256(blk + 64 * half + 32 * (run & 1));
        const __m256i lo = _mm256_and_si256(run < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(ld256(blk + 128 + 32 * half), 2 * run), low2);
        return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    }
    case NT_Q2_K:
        return _mm256_and_si256(_mm256_srli_epi16(ld256(blk + 16 + 32 * half), 2 * run), low2);
    default: {  /* Q3_K: a set bit 4 * half + run of hmask[l] adds 4 */
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ld256(blk + 32 + 32 * half), 2 * run), low2);
        const __m256i hbit = _mm256_and_si256(_mm256_srli_epi16(ld256(blk), 4 * half + run), one);
        return _mm256_or_si256(lo, _mm256_slli_epi16(hbit, 2));
    }
    }
}

/* Super-block b (at byte off of each row) of a tile's pairs, added to acc. */
ALWAYS_INLINE __m256 k_step(const int T, const int M, const int N, const struct tile_at *pt, int b, size_t off,
                        __m256 acc)
{
    const struct tile_at p = *pt;
    const size_t d_at = T == NT_Q2_K ? 80 : T == NT_Q3_K ? 108 : T == NT_Q6_K ? 208 : 0;
    const int has_min = T == NT_Q2_K || T == NT_Q4_K || T == NT_Q5_K;
    const int offset_shift = T == NT_Q6_K ? 5 : T == NT_Q3_K ? 2 : 0;   /* offset 32 or 4 */
    __m256i v[8], mm[8];
#pragma GCC unroll 8
    for (int r = 0; r < N; r++) {
        const uint8_t *blk = p.w[r] + off;
        __m256i sc, mins = _mm256_setzero_si256();
        k_scales(T, blk, &sc, &mins);
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) v[r * M + m] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m256i w = k_codes(T, blk, c), s = chunk_scale(sc, c);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++)
                v[r * M + m] = nx_dot_scaled(v[r * M + m], w, ld256(p.q[m] + (size_t)EBB_NATIVE_QK_K * b + 32 * c), s);
        }
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            const __m256i bs = ld256(p.s[m] + (size_t)16 * b);
            if (has_min) mm[r * M + m] = _mm256_madd_epi16(mins, bs);
            if (offset_shift)
                v[r * M + m] = _mm256_sub_epi32(v[r * M + m], _mm256_slli_epi32(_mm256_madd_epi16(sc, bs), offset_shift));
        }
    }
    const __m256 da = tok_ps(M, p.d, b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(v)), _mm256_mul_ps(row_f16(N, M, p.w, off + d_at), da), acc);
    if (has_min) {
        const __m256i neg_summ = _mm256_sub_epi32(_mm256_setzero_si256(), reduce8(mm));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(neg_summ), _mm256_mul_ps(row_f16(N, M, p.w, off + d_at + 2), da),
                              acc);
    }
    return acc;
}

/* One tile: tokens [t, t + mv) x rows [o, o + nv), in an M x N shape. */
ALWAYS_INLINE void tile(const int T, const int M, const int N, const struct ebb_native_matmul_args *a, int t, int mv,
                        int o, int nv)
{
    const size_t BB = block_bytes(T);
    const int nb = a->n_in / (is_k(T) ? EBB_NATIVE_QK_K : EBB_NATIVE_QK);
    struct tile_at p;
    tile_pointers(T, M, N, a, t, mv, o, nv, &p);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (M <= 2 || a->n_tok < WIDE_MIN_TOKENS) prefetch_next(N, BB, a, &p, b);
        acc = is_k(T) ? k_step(T, M, N, &p, b, (size_t)b * BB, acc) : legacy_step(T, M, N, &p, b, block_at(T, b), acc);
    }
    store_tile(M, a, acc, t, mv, o, nv);
}

/* ---------------------------------------------- 8 rows in registers (AVX2) */

/* Tokens in registers (row8_rows, row16_rows): at most REG_GROUP at a time,
 * each count its own code so that its sums stay in registers; groups of 12
 * measured no quicker than 8 on AVX-512, and 8 quicker than 4 on AVX2. */
#define REG_GROUP 8
#define BY_TOKEN_GROUPS(tokens, T, a, t0, t1, o) \
    for (int t_ = (t0); t_ < (t1); t_ += REG_GROUP) { \
        switch (min_int((t1) - t_, REG_GROUP)) { \
        case 1: tokens(T, 1, a, t_, o); break; \
        case 2: tokens(T, 2, a, t_, o); break; \
        case 3: tokens(T, 3, a, t_, o); break; \
        case 4: tokens(T, 4, a, t_, o); break; \
        case 5: tokens(T, 5, a, t_, o); break; \
        case 6: tokens(T, 6, a, t_, o); break; \
        case 7: tokens(T, 7, a, t_, o); break; \
        default: tokens(T, 8, a, t_, o); break; \
        } \
    }

/* The n rows after the n at o (row8_rows: 8, row16_rows and the wide
 * packs: 16), contiguous with them, block b's share at a time (as decode's
 * tiles fetch their successors): one stream, which the hardware follows
 * well, where n rows read side by side are not. On this Xeon, wide_pack's
 * prefetch of each row ahead left 2 tokens on AMX slower than on the 2 x 4
 * tiles once the model streamed from memory (12 s of samples against 10
 * decoding 2 sequences); with this, `ebb bench --verify 8` gave c(1) 1.47 ->
 * 1.24, c(8) 2.53 -> 2.39. (The VNNI wide path keeps its own: tuned on an
 * AMD EPYC, neutral here.) (uintptr_t: the address may lie past the
 * matrix; prefetches never fault.) */
ALWAYS_INLINE void next_rows_prefetch(const int T, const struct ebb_native_matmul_args *a, int o, int n, int b)
{
    const size_t share = (size_t)n * block_bytes(T);   /* per block b: of 32, W4G64's 64, a K-quant's 256 */
    const uintptr_t next = (uintptr_t)a->w + (uintptr_t)(o + n) * a->row_bytes + (uintptr_t)b * share;
    for (size_t l = 0; l < share; l += 64) _mm_prefetch((const char *)(next + l), _MM_HINT_T0);
}

#ifndef NX_WIDE_PREFILL
/* row16_tokens' shape (below, "wide prefill") for AVX2, which has neither
 * 512-bit registers nor vpdpbusd: 8 rows' Q4_0/Q4_1 block transposed into
 * 8 registers (lane r: row r), and per token 8 vpmaddubsw against its
 * activation bytes broadcast, summed as int16 (8 steps of at most 2 x 15 x
 * 127 stay within int16), then one vpmaddwd into each row's int32 sum,
 * and native.h's fold. From 3 tokens: below, the 1 x 8 and 2 x 4 tiles are
 * quicker (the default model on this path, `ebb bench --verify 8`, ms per
 * pass of 1, 2, 3 .. 9 tokens: tiles 4.65 6.69 11.09 11.52 15.00 17.49
 * 22.60 22.33 27.26, here from 1 token 6.75 8.02 9.32 10.16 12.72 13.92
 * 15.72 16.93 19.87), and at every count above (pp512 457-483 -> 828-838
 * tok/s, 12 sequences decoding 366-384 -> 501-513). Q8_0's codes would
 * saturate vpmaddubsw's int16 pairs, so it keeps the tiles. */
ALWAYS_INLINE int takes_row8(const int T) { return T == NT_Q4_0 || T == NT_Q4_1 || T == NT_Q4_K || T == NT_Q5_K; }
/* Q4_K and Q5_K from 5 (row8_k4_tokens below): the 1.1B Q4_K's pass of 3
 * tokens took the same on either, 4 tokens 50-52 ms on the 4 x 2 tiles and
 * 55 here. */
#define ROW8_MIN_TOKENS(T) ((T) == NT_Q4_K || (T) == NT_Q5_K ? 5 : 3)

/* 16 bytes of each of 8 rows (row r at p + r * stride) as 4 vectors, lane
 * r of v[k] row r's dword k. */
ALWAYS_INLINE void rows8_dwords(const uint8_t *p, size_t stride, __m256i v[4])
{
    __m256i z[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++)
        z[g] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + (size_t)(g + 4) * stride)),
                                _mm_loadu_si128((const __m128i *)(p + (size_t)g * stride)));
    const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
    v[0] = _mm256_unpacklo_epi64(t0, t2);
    v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3);
    v[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* The 8 f16 halves (lo: each lane's low 16 bits, else its high ones) of 8
 * int32 lanes as floats. */
ALWAYS_INLINE __m256 halves8_ps(__m256i x, int hi)
{
    const __m256i pick = hi ? _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6,
                                               7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1)
                            : _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4,
                                               5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i h = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, pick), 0x08);
    return _mm256_cvtph_ps(_mm256_castsi256_si128(h));
}

ALWAYS_INLINE void row8_tokens(const int T, const int M, const struct ebb_native_matmul_args *a, int t0, int o)
{
    const int nb = a->n_in / EBB_NATIVE_QK;
    const size_t stride = a->row_bytes, BB = block_bytes(T);
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m256i row_at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)stride));
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const uint8_t *q[REG_GROUP];
    const float *da[REG_GROUP];
    const int16_t *asum[REG_GROUP];
    __m256 acc[REG_GROUP];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        q[m] = (const uint8_t *)(a->q + (size_t)(t0 + m) * a->n_in);
        da[m] = a->d + (size_t)(t0 + m) * nb;
        asum[m] = a->sums + (size_t)(t0 + m) * nb;
        acc[m] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = rows + (size_t)b * BB;
        next_rows_prefetch(T, a, o, 8, b);
        const __m256i head = _mm256_i32gather_epi32((const int *)(const void *)blk, row_at, 1);
        __m256i v[4], codes[8];
        rows8_dwords(blk + (T == NT_Q4_1 ? 4 : 2), stride, v);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            codes[k] = _mm256_and_si256(v[k], low);
            codes[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v[k], 4), low);
        }
        const __m256 d = halves8_ps(head, 0);
        const __m256 mn = T == NT_Q4_1 ? halves8_ps(head, 1) : _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const uint8_t *x = q[m] + (size_t)EBB_NATIVE_QK * b;
            __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(codes[k], _mm256_set1_epi32((int)ld32(x + 4 * k))));
            __m256i isum = _mm256_madd_epi16(s16, ones);
            if (T == NT_Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32((int)asum[m][b] * 8));
            const __m256 vda = _mm256_set1_ps(da[m][b]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, vda), acc[m]);
            if (T == NT_Q4_1)
                acc[m] = _mm256_fmadd_ps(_mm256_set1_ps((float)asum[m][b]), _mm256_mul_ps(mn, vda), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) _mm256_storeu_ps(a->out + (size_t)(t0 + m) * a->n_out + o, acc[m]);
}

/* Q4_K and Q5_K the same way, a super-block of 256 at a time: its
 * header's d | dmin and three scale words of the 8 rows in one transpose
 * (decoded as formats.c's ebb_k4_scale_min does, 8 rows at once), each 32
 * bytes of codes two more, whose nibbles are two sub-blocks' codes as they
 * stand (Q5_K's fifth bits from two more: bit c of byte l, value 32c + l).
 * A sub-block's int16 sums go to int32 by vpmaddwd against its scale (each
 * row's, twice), so the scale costs nothing more: one for Q4_K's 8
 * vpmaddubsw steps, two for Q5_K's (4 steps of 5-bit codes fill an int16);
 * the minimums meet the token's sums of 16 the same way, and the fold is
 * native.h's. */
ALWAYS_INLINE void row8_k4_tokens(const int T, const int M, const struct ebb_native_matmul_args *a, int t0, int o)
{
    const int nb = a->n_in / EBB_NATIVE_QK_K, steps = T == NT_Q5_K ? 4 : 8;   /* per int16 sum */
    const size_t stride = a->row_bytes, BB = block_bytes(T);
    const uint8_t *rows = a->w + (size_t)o * stride;
    const int qs_at = T == NT_Q5_K ? 48 : 16;   /* the codes, after Q5_K's 32 bytes of fifth bits */
    const __m256i low4 = _mm256_set1_epi8(0x0f), low6 = _mm256_set1_epi8(0x3f), top2 = _mm256_set1_epi8(0x30);
    const __m256i byte = _mm256_set1_epi32(0xff), bit4 = _mm256_set1_epi8(0x10);
    const uint8_t *q[REG_GROUP], *bs[REG_GROUP];
    const float *da[REG_GROUP];
    __m256 acc[REG_GROUP];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        q[m] = (const uint8_t *)(a->q + (size_t)(t0 + m) * a->n_in);
        da[m] = a->d + (size_t)(t0 + m) * nb;
        bs[m] = (const uint8_t *)(a->sums + (size_t)(t0 + m) * (a->n_in / 16));
        acc[m] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = rows + (size_t)b * BB;
        next_rows_prefetch(T, a, o, 8, b);
        __m256i h[4];
        rows8_dwords(blk, stride, h);   /* d | dmin, scale words s0, s1, s2 */
        const __m256i sc_lo = _mm256_and_si256(h[1], low6), mn_lo = _mm256_and_si256(h[2], low6);
        const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(h[3], low4),
                                              _mm256_and_si256(_mm256_srli_epi32(h[1], 2), top2));
        const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(h[3], 4), low4),
                                              _mm256_and_si256(_mm256_srli_epi32(h[2], 2), top2));
        __m256i scale[8], min[8];   /* sub-block j's, each row's twice as int16 */
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i sc = _mm256_and_si256(_mm256_srli_epi32(j < 4 ? sc_lo : sc_hi, 8 * (j & 3)), byte);
            const __m256i mn = _mm256_and_si256(_mm256_srli_epi32(j < 4 ? mn_lo : mn_hi, 8 * (j & 3)), byte);
            scale[j] = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
            min[j] = _mm256_or_si256(mn, _mm256_slli_epi32(mn, 16));
        }
        __m256i sumi[REG_GROUP], qh[8];
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) sumi[m] = _mm256_setzero_si256();
        if (T == NT_Q5_K) {
            rows8_dwords(blk + 16, stride, qh);
            rows8_dwords(blk + 32, stride, qh + 4);
        }
        for (int pair = 0; pair < 4; pair++) {   /* sub-blocks 2 pair (low nibbles) and 2 pair + 1 (high) */
            __m256i v[8];
            rows8_dwords(blk + qs_at + 32 * pair, stride, v);
            rows8_dwords(blk + qs_at + 32 * pair + 16, stride, v + 4);
#pragma GCC unroll 2
            for (int half = 0; half < 2; half++) {
                const int j = 2 * pair + half;
                __m256i codes[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    codes[k] = _mm256_and_si256(half ? _mm256_srli_epi16(v[k], 4) : v[k], low4);
                    if (T == NT_Q5_K)
                        codes[k] = _mm256_or_si256(
                            codes[k], _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh[k], j), 4), bit4));
                }
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    const uint8_t *x = q[m] + (size_t)EBB_NATIVE_QK_K * b + 32 * j;
#pragma GCC unroll 2
                    for (int k0 = 0; k0 < 8; k0 += steps) {
                        __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
                        for (int k = k0; k < k0 + steps; k++)
                            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(codes[k], _mm256_set1_epi32((int)ld32(x + 4 * k))));
                        sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(s16, scale[j]));
                    }
                }
            }
        }
        const __m256 d = halves8_ps(h[0], 0), dmin = halves8_ps(h[0], 1);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const uint8_t *s = bs[m] + 32 * (size_t)b;   /* the token's 16 sums of 16, two per sub-block */
            __m256i summ = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) summ = _mm256_add_epi32(summ, _mm256_madd_epi16(min[j], _mm256_set1_epi32((int)ld32(s + 4 * j))));
            const __m256 vda = _mm256_set1_ps(da[m][b]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[m]), _mm256_mul_ps(d, vda), acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), summ)),
                                     _mm256_mul_ps(dmin, vda), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) _mm256_storeu_ps(a->out + (size_t)(t0 + m) * a->n_out + o, acc[m]);
}

ALWAYS_INLINE void row8_rows(const int T, const struct ebb_native_matmul_args *a, int t0, int t1, int o)
{
    if (T == NT_Q4_K || T == NT_Q5_K) {
        BY_TOKEN_GROUPS(row8_k4_tokens, T, a, t0, t1, o);
    } else {
        BY_TOKEN_GROUPS(row8_tokens, T, a, t0, t1, o);
    }
}
#endif

/* ------------------------------------------- wide prefill (AVX-512 VNNI) */

#ifdef NX_WIDE_PREFILL
/* Prefill of the legacy types, 16 rows at a time. The 4x2 tiles above end
 * every (row, token) block in a horizontal sum; here the 16 rows' blocks are
 * first rewritten, once per row tile, into interleaved signed codes (lane r
 * of a 512-bit vector holds 4 consecutive codes of row r, Q4_0/Q5_0's offset
 * already taken out), so each token's block is 8 vpdpbusd against its
 * broadcast activation bytes and every lane is one row's exact integer sum:
 * no horizontal work. vpdpbusd wants the activation unsigned: a + 128 (the
 * sign bit flipped), and 128 times the row block's code sum comes back out.
 * The float steps are native.h's per (row, token), in its order, so the
 * results are the 4x2 tiles' bits. */
#define WIDE_ROWS 16
/* Packing reads 16 rows side by side, 16 streams a row_bytes apart, which
 * the hardware prefetchers follow badly once a matrix streams from memory:
 * each row's bytes two cache lines ahead are fetched as its block is read.
 * On an AMD EPYC (Zen 4) the default model's Q8_0 head (49,152 x 576) at 16
 * tokens took 14.6 ms wide against 10.6 ms on the tiles, 9.9 ms with this
 * (4 or 5 lines ahead was worse); 12 decoding sequences ran 388 -> 512
 * tokens/s. */
#define WIDE_PREFETCH 128
#define WIDE_CHUNK 32   /* blocks packed at a time: 22 KiB, in L1 with the tokens' bytes */
#define WIDE_K_CHUNK 4  /* super-blocks packed at a time: 25 KiB */
#define WIDE_SCRATCH (32 * 1024)

struct wide_block {              /* one block of 32 inputs of 16 rows */
    __m512i codes[8];            /* [k][row]: codes 4k .. 4k + 3 of each row, signed */
    __m512i code_sum;            /* 128 * each row's code sum (the activation's +128) */
    __m512 d, m;                 /* each row's scale, and minimum (Q4_1, Q5_1, W2G64) */
};

/* Block b of the 16 rows at o as wide_block's codes (signed, the offset of
 * Q4_0 and Q5_0 taken out), and the rows' scales and minimums. */
ALWAYS_INLINE void wide_pack_block(const int T, const struct ebb_native_matmul_args *a, int o, int b,
                                   __m512i codes[8], __m512 *d_out, __m512 *m_out)
{
    const __m256i offset = _mm256_set1_epi8((char)(T == NT_Q4_0 ? 8 : T == NT_Q5_0 ? 16 : 0));
    /* word k of row r at lane r of codes[k]: a transpose of 16 rows x 8 words */
    const __m512i column = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    int32_t words[WIDE_ROWS][8];
    uint16_t d[WIDE_ROWS], m[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) {
        const uint8_t *blk = a->w + (size_t)(o + r) * a->row_bytes + block_at(T, b);
        _mm_prefetch((const char *)blk + WIDE_PREFETCH, _MM_HINT_T0);
        /* Q8_0's codes are signed already (offset 0) */
        _mm256_storeu_si256((__m256i *)words[r], _mm256_sub_epi8(legacy_codes(T, blk, b), offset));
        d[r] = (uint16_t)ld16(blk);
        m[r] = has_min(T) ? (uint16_t)ld16(blk + 2) : 0;
    }
    for (int k = 0; k < 8; k++)
        codes[k] = _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(k)), words, 4);
    *d_out = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
    *m_out = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m));
}

ALWAYS_INLINE void wide_pack(const int T, const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                             struct wide_block *wb)
{
    for (int b = b0; b < b1; b++, wb++) {
        wide_pack_block(T, a, o, b, wb->codes, &wb->d, &wb->m);
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), wb->codes[k]);
        wb->code_sum = _mm512_slli_epi32(sum, 7);
    }
}

/* Tokens [t0, t1) against blocks [b0, b1) of the 16 rows at o, packed in wb:
 * the first chunk starts each output from 0, later ones continue from out
 * (exactly: the float steps stay in order). */
ALWAYS_INLINE void wide_tokens(const int T, const struct ebb_native_matmul_args *a, const struct wide_block *wb0,
                               int t0, int t1, int o, int b0, int b1)
{
    const int nb = a->n_in / EBB_NATIVE_QK;
    const struct wide_block *wb = wb0 - b0;
    for (int t = t0; t < t1; t++) {
        const uint8_t *q = (const uint8_t *)(a->q + (size_t)t * a->n_in);
        const float *da = a->d + (size_t)t * nb;
        const int16_t *asum = a->sums + (size_t)t * nb;
        float *out = a->out + (size_t)t * a->n_out + o;
        __m512 acc = b0 ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
        for (int b = b0; b < b1; b++) {
            __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                isum = _mm512_dpbusd_epi32(isum, _mm512_set1_epi32((int)(ld32(q + 32 * b + 4 * k) ^ 0x80808080u)),
                                           wb[b].codes[k]);
            isum = _mm512_sub_epi32(isum, wb[b].code_sum);
            const __m512 vda = _mm512_set1_ps(da[b]);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(wb[b].d, vda), acc);
            if (has_min(T))
                acc = _mm512_fmadd_ps(_mm512_set1_ps((float)asum[b]), _mm512_mul_ps(wb[b].m, vda), acc);
        }
        _mm512_storeu_ps(out, acc);
    }
}

/* 16 bytes of each of 16 rows (row r at p + r * stride) as 4 vectors, lane
 * r of v[k] row r's dword k: 4 rows per vector's 128-bit lanes, then a 4 x
 * 4 transpose inside the lanes. */
ALWAYS_INLINE void rows_dwords(const uint8_t *p, size_t stride, __m512i v[4])
{
    __m512i z[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        const uint8_t *r = p + (size_t)g * stride;
        __m512i x = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)r));
        x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(r + 4 * stride)), 1);
        x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(r + 8 * stride)), 2);
        z[g] = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(r + 12 * stride)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    v[0] = _mm512_unpacklo_epi64(t0, t2);
    v[1] = _mm512_unpackhi_epi64(t0, t2);
    v[2] = _mm512_unpacklo_epi64(t1, t3);
    v[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* Byte offsets of 16 rows stride apart: a gather of one dword of each. */
ALWAYS_INLINE __m512i rows16_at(size_t stride)
{
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)stride));
}

/* runs x 16 bytes of nibbles of 16 rows (from p, rows stride apart) as
 * signed codes, less offset: lo[4h + k] the low nibbles of run h's dword k,
 * hi[4h + k] the high ones. Q4_0/Q4_1 (one run: codes 0-15 then 16-31),
 * W4G64 (two: 0-31 then 32-63) and two Q4_K/Q5_K chunks (two runs: chunk 2j
 * then 2j + 1) are all this. */
ALWAYS_INLINE void rows_nibbles(const uint8_t *p, size_t stride, const int runs, __m512i offset, __m512i *lo,
                                __m512i *hi)
{
    const __m512i low = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 2
    for (int h = 0; h < runs; h++) {
        __m512i v[4];
        rows_dwords(p + 16 * h, stride, v);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            lo[4 * h + k] = _mm512_sub_epi8(_mm512_and_si512(v[k], low), offset);
            hi[4 * h + k] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v[k], 4), low), offset);
        }
    }
}

/* 16 rows at a time, with nothing packed: each block's codes are
 * transposed into registers (as AMX packs them) and meet every token's
 * block there, up to REG_GROUP tokens whose 16 sums stay in registers
 * along the whole row, so the transpose is shared by the tokens and no
 * lane ever needs a horizontal sum. The 4x2 tiles pay a horizontal sum per
 * (row, token, block), wide_pack a store and a gather per block that only
 * many tokens repay, so this is quicker for one token (decode) as for a
 * verification pass or a prefill. Every code is vpdpbusd's unsigned
 * operand (Q4's nibbles as they stand, Q8_0's w + 128, W4G64's q), so each
 * token's activation bytes are its broadcast memory operand as they stand,
 * and the offsets come back through the activation sums: Q4_0 8 and Q8_0
 * 128 times the stored sums of 32, W4G64 8 times a sum of 64 taken here.
 * The float fold is native.h's (W4G64's is ops.h's: the same steps without
 * a minimum), so the bits are the scalar path's. */
ALWAYS_INLINE int takes_row16(const int T)
{
    return T == NT_Q4_0 || T == NT_Q4_1 || T == NT_Q8_0 || T == NT_Q4_K || T == NT_Q5_K;
}

ALWAYS_INLINE void row16_tokens(const int T, const int M, const struct ebb_native_matmul_args *a, int t0, int o)
{
    const int w4 = T == NT_W4G64, K = w4 ? 16 : 8;   /* dwords of codes per row and block */
    const int nb = a->n_in / (w4 ? EBB_W4G64_GROUP : EBB_NATIVE_QK);
    const size_t stride = a->row_bytes;
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m512i row_at = rows16_at(stride);
    const uint8_t *q[REG_GROUP];
    const float *da[REG_GROUP];
    const int16_t *asum[REG_GROUP];
    __m512 acc[REG_GROUP];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        q[m] = (const uint8_t *)(a->q + (size_t)(t0 + m) * a->n_in);
        da[m] = a->d + (size_t)(t0 + m) * nb;
        asum[m] = w4 ? NULL : a->sums + (size_t)(t0 + m) * nb;
        acc[m] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = rows + (size_t)b * block_bytes(T);
        next_rows_prefetch(T, a, o, WIDE_ROWS, b);
        const __m512i head = _mm512_i32gather_epi32(row_at, blk, 1);   /* d, then (Q4_1) m */
        /* every code unsigned: vpdpbusd's first operand, so each token's
         * activation bytes are its broadcast memory operand as they stand */
        __m512i codes[16];
        if (T == NT_Q8_0) {   /* w + 128 */
            rows_dwords(blk + 2, stride, codes);
            rows_dwords(blk + 18, stride, codes + 4);
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) codes[k] = _mm512_xor_si512(codes[k], _mm512_set1_epi8((char)0x80));
        } else {   /* Q4: codes 0-15 low nibbles, 16-31 high; W4G64: 0-31 and 32-63 */
            rows_nibbles(blk + (T == NT_Q4_1 ? 4 : 2), stride, w4 ? 2 : 1, _mm512_setzero_si512(), codes,
                         codes + K / 2);
        }
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
        const __m512 mn = has_min(T) ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)))
                                     : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const uint8_t *x = q[m] + (size_t)(K * 4) * b;
            __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 16
            for (int k = 0; k < K; k++)
                isum = _mm512_dpbusd_epi32(isum, codes[k], _mm512_set1_epi32((int)ld32(x + 4 * k)));
            int offset_sum = 0;
            if (T == NT_Q4_0) offset_sum = (int)asum[m][b] * 8;
            if (T == NT_Q8_0) offset_sum = (int)asum[m][b] * 128;
            if (w4)
                offset_sum = _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(
                                 _mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(x))) * 8;
            if (T != NT_Q4_1) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(offset_sum));
            const __m512 vda = _mm512_set1_ps(da[m][b]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, vda), acc[m]);
            if (has_min(T))
                acc[m] = _mm512_fmadd_ps(_mm512_set1_ps((float)asum[m][b]), _mm512_mul_ps(mn, vda), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) _mm512_storeu_ps(a->out + (size_t)(t0 + m) * a->n_out + o, acc[m]);
}

/* Q4_K and Q5_K's 6-bit scale and minimum of each sub-block j of 32 as
 * int32 lanes (lane r: row r), from the header's scale words s0, s1, s2 of
 * 16 rows (h[1..3] of rows_dwords): formats.c's ebb_k4_scale_min, 16 rows
 * at once. */
ALWAYS_INLINE void k4_scales_mins(const __m512i h[4], __m512i scale[8], __m512i min[8])
{
    const __m512i low4 = _mm512_set1_epi8(0x0f), low6 = _mm512_set1_epi8(0x3f), top2 = _mm512_set1_epi8(0x30);
    const __m512i byte = _mm512_set1_epi32(0xff);
    const __m512i sc_lo = _mm512_and_si512(h[1], low6), mn_lo = _mm512_and_si512(h[2], low6);
    const __m512i sc_hi = _mm512_or_si512(_mm512_and_si512(h[3], low4),
                                          _mm512_and_si512(_mm512_srli_epi32(h[1], 2), top2));
    const __m512i mn_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(h[3], 4), low4),
                                          _mm512_and_si512(_mm512_srli_epi32(h[2], 2), top2));
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        scale[j] = _mm512_and_si512(_mm512_srli_epi32(j < 4 ? sc_lo : sc_hi, 8 * (j & 3)), byte);
        min[j] = _mm512_and_si512(_mm512_srli_epi32(j < 4 ? mn_lo : mn_hi, 8 * (j & 3)), byte);
    }
}

/* Q4_K and Q5_K the same way below the wide path's 9 tokens, as
 * row8_k4_tokens on AVX2: the 16 rows' header decoded in one transpose,
 * each pair of sub-blocks' codes from two more (Q5_K's fifth bits two
 * more per super-block), a sub-block's 8 vpdpbusd per token scaled once
 * (vpmulld) into the row's sum, the minimums against the token's sums of
 * 16 by vpdpwssd, native.h's fold. */
ALWAYS_INLINE void row16_k4_tokens(const int T, const int M, const struct ebb_native_matmul_args *a, int t0, int o)
{
    const int nb = a->n_in / EBB_NATIVE_QK_K, qs_at = T == NT_Q5_K ? 48 : 16;
    const size_t stride = a->row_bytes, BB = block_bytes(T);
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m512i bit4 = _mm512_set1_epi8(0x10);
    const uint8_t *q[REG_GROUP], *bs[REG_GROUP];
    const float *da[REG_GROUP];
    __m512 acc[REG_GROUP];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        q[m] = (const uint8_t *)(a->q + (size_t)(t0 + m) * a->n_in);
        da[m] = a->d + (size_t)(t0 + m) * nb;
        bs[m] = (const uint8_t *)(a->sums + (size_t)(t0 + m) * (a->n_in / 16));
        acc[m] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = rows + (size_t)b * BB;
        next_rows_prefetch(T, a, o, WIDE_ROWS, b);
        __m512i h[4];
        rows_dwords(blk, stride, h);   /* d | dmin, scale words s0, s1, s2 */
        __m512i scale[8], min[8];   /* sub-block j's: the scale as int32, the minimum twice as int16 */
        k4_scales_mins(h, scale, min);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) min[j] = _mm512_or_si512(min[j], _mm512_slli_epi32(min[j], 16));
        __m512i sumi[REG_GROUP], qh[8];
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) sumi[m] = _mm512_setzero_si512();
        if (T == NT_Q5_K) {
            rows_dwords(blk + 16, stride, qh);
            rows_dwords(blk + 32, stride, qh + 4);
        }
        for (int pair = 0; pair < 4; pair++) {   /* sub-blocks 2 pair (low nibbles) and 2 pair + 1 (high) */
            __m512i codes[2][8];
            rows_nibbles(blk + qs_at + 32 * pair, stride, 2, _mm512_setzero_si512(), codes[0], codes[1]);
#pragma GCC unroll 2
            for (int half = 0; half < 2; half++) {
                const int j = 2 * pair + half;
                if (T == NT_Q5_K)
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        codes[half][k] = _mm512_or_si512(
                            codes[half][k], _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh[k], j), 4), bit4));
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    const uint8_t *x = q[m] + (size_t)EBB_NATIVE_QK_K * b + 32 * j;
                    __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        isum = _mm512_dpbusd_epi32(isum, codes[half][k], _mm512_set1_epi32((int)ld32(x + 4 * k)));
                    sumi[m] = _mm512_add_epi32(sumi[m], _mm512_mullo_epi32(isum, scale[j]));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h[0]));
        const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h[0], 16)));
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const uint8_t *s = bs[m] + 32 * (size_t)b;   /* the token's 16 sums of 16, two per sub-block */
            __m512i summ = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) summ = _mm512_dpwssd_epi32(summ, min[j], _mm512_set1_epi32((int)ld32(s + 4 * j)));
            const __m512 vda = _mm512_set1_ps(da[m][b]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, vda), acc[m]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), summ)),
                                     _mm512_mul_ps(dmin, vda), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) _mm512_storeu_ps(a->out + (size_t)(t0 + m) * a->n_out + o, acc[m]);
}

ALWAYS_INLINE void row16_rows(const int T, const struct ebb_native_matmul_args *a, int t0, int t1, int o)
{
    if (T == NT_Q4_K || T == NT_Q5_K) {
        BY_TOKEN_GROUPS(row16_k4_tokens, T, a, t0, t1, o);
    } else {
        BY_TOKEN_GROUPS(row16_tokens, T, a, t0, t1, o);
    }
}

#ifdef NX_AMX
/* The same prefill on AMX (Intel's tile unit), from 3 tokens on, which
 * covers speculative decoding's verification passes and a few sequences
 * decoding together. One TDPBSSD multiplies the tokens' activation
 * bytes (read in place, rows n_in apart, or copied, below) by the 16 rows' packed
 * codes (lane r of codes[k] being row r's codes 4k .. 4k + 3: exactly the
 * tile's layout) into 16 x 16 exact int32 sums. Both operands are signed,
 * so neither the +128 of the activations nor the code sums are needed.
 * What is left per (token, block) is the float fold, 16 rows wide, in
 * native.h's order: the scalar path's bits again, and every output depends
 * only on its own row and token.
 *
 * Costs on a Xeon with AMX (single thread; `ebb bench --verify`): a tile
 * store takes about 22 cycles however few its rows, a product 9 (32 bytes
 * deep) or 16 (64), so with few tokens the stores set the pace. Up to 4
 * tokens, two blocks share one product and one store: the tile is 64
 * bytes deep, rows [0, M) hold block 2p's activations then zeros, rows [M,
 * 2M) zeros then block 2p + 1's, against both blocks' codes, 16 deep rows,
 * which lie one after the other in the chunk. And the packing must be
 * cheap: Q4_0, Q4_1 and Q8_0 (the default model's types) transpose 16
 * rows' bytes in registers (a Q4 block's low nibbles are codes 0-15, its
 * high ones 16-31, so the nibbles of the transposed dwords are codes[0..3]
 * and codes[4..7] as they stand; W4G64, at the end of the file, is packed
 * the same way); Q5_0, Q5_1 and W2G64 take wide_pack's. */
#define AMX_TOKENS 16      /* a tile's rows */
/* Pairs pay up to 4 tokens (a 1,536 x 576 Q4_1 product of 3 tokens, one
 * thread: 0.41 -> 0.39 ms; of 2, 0.39 -> 0.34) and cost from 6 (a 64-deep
 * product of 12 or 16 rows, and the copies, outweigh the store saved). */
#define AMX_PAIRED_TOKENS 4
/* Two tokens stay off the tile unit: on AMX the packing is not repaid. One
 * thread, a 5,632 x 2,048 Q4_0 product of 2 tokens from memory: 0.85 ms on
 * the 2 x 4 tiles, 1.05 on AMX (3 tokens: 1.24 and 1.16); the default
 * model's Q8_0 head (49,152 x 576): 1.29 and 1.69 ms (3 tokens: 2.61 and
 * 1.83). Q4_0, Q4_1 and Q8_0 stay on row16_rows up to AMX_ROW16_MAX_TOKENS,
 * which beats the tile unit there: the default model's pass of k + 1
 * tokens over one token's (`ebb bench --verify 40`), k = 7: 2.01-2.08 on
 * AMX, 1.44-1.57 on row16_rows; k = 15: 2.75-3.02 and 2.51-2.66; from about
 * 25 tokens AMX's is quicker (k = 31: 4.98-5.17 and 4.29-4.38). */
#define AMX_MIN_TOKENS 3
#define AMX_ROW16_MAX_TOKENS 24

struct amx_chunk {                         /* WIDE_CHUNK blocks of 16 rows */
    __m512i codes[WIDE_CHUNK][8];
    __m512 d[WIDE_CHUNK], m[WIDE_CHUNK];   /* the rows' scales, minimums */
};
_Static_assert(sizeof(struct amx_chunk) <= WIDE_SCRATCH, "AMX chunk fits the scratch");

/* Inputs per block and product: W4G64's 64 (its codes fill two of the
 * chunk's blocks of 32, 16 tile rows), the legacy types' 32. */
ALWAYS_INLINE int amx_block(const int T) { return T == NT_W4G64 ? 64 : EBB_NATIVE_QK; }

/* ldtilecfg's 64 bytes (palette 1). */
struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0 to 3: sums (rows x 16 int32); 4 and 5: activations (rows x depth
 * bytes); 6 and 7: packed codes (depth / 4 x 64 bytes). Each thread's
 * configuration is its own and holds until the next. */
static _Thread_local int amx_configured_rows, amx_configured_depth;

ALWAYS_INLINE void amx_configure(int rows, int depth)
{
    if (rows == amx_configured_rows && depth == amx_configured_depth) return;
    struct amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 4; i++) c.rows[i] = (uint8_t)rows, c.colsb[i] = 64;
    for (int i = 4; i < 6; i++) c.rows[i] = (uint8_t)rows, c.colsb[i] = (uint16_t)depth;
    for (int i = 6; i < 8; i++) c.rows[i] = (uint8_t)(depth / 4), c.colsb[i] = 64;
    _tile_loadconfig(&c);
    amx_configured_rows = rows, amx_configured_depth = depth;
}

/* Blocks [b0, b1) of the 16 rows at o into the chunk: codes, d and (Q4_1)
 * m; each row's first dword (d, then m) by one gather. */
ALWAYS_INLINE void amx_pack(const int T, const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                            struct amx_chunk *ch)
{
    if (T != NT_Q4_0 && T != NT_Q4_1 && T != NT_Q8_0 && T != NT_W4G64) {
        for (int b = b0; b < b1; b++) wide_pack_block(T, a, o, b, ch->codes[b - b0], &ch->d[b - b0], &ch->m[b - b0]);
        return;
    }
    const size_t stride = a->row_bytes;
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m512i row_at = rows16_at(stride);
    const __m512i offset = _mm512_set1_epi8(T == NT_Q4_0 || T == NT_W4G64 ? 8 : 0);
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = rows + block_at(T, b);
        __m512i *codes = ch->codes[(b - b0) * amx_block(T) / EBB_NATIVE_QK];
        next_rows_prefetch(T, a, o, WIDE_ROWS, b);
        /* each row's first dword: d, then (Q4_1) m, as f16 */
        const __m512i head = _mm512_i32gather_epi32(row_at, blk, 1);
        if (T == NT_Q8_0) {   /* signed bytes already */
            rows_dwords(blk + 2, stride, codes);
            rows_dwords(blk + 18, stride, codes + 4);
        } else {   /* low nibbles first: Q4's codes 0-15 (16-31 high), W4G64's 0-31 (32-63 high) */
            const int runs = amx_block(T) / EBB_NATIVE_QK;
            rows_nibbles(blk + (T == NT_Q4_1 ? 4 : 2), stride, runs, offset, codes, codes + 4 * runs);
        }
        ch->d[b - b0] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));   /* W4G64: one per 64 */
        if (has_min(T)) ch->m[b - b0] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
    }
}

/* One product into tile C (through tiles A and B), stored as rows of 16
 * int32 at sums. A macro: tile numbers are immediates of the instructions. */
#define AMX_SUMS(C, A, B, act, ld_act, codes, sums) \
    do { \
        _tile_loadd(A, act, ld_act); \
        _tile_loadd(B, codes, 64); \
        _tile_zero(C); \
        _tile_dpbssd(C, A, B); \
        _tile_stored(C, sums, 64); \
    } while (0)

/* Products 0 .. n - 1, the i-th from act + i * act_step (rows ld_act apart)
 * and codes + i * codes_step, four in flight on four sum tiles (tiles are
 * not renamed: one reused would wait for each store), to sums + i * 16
 * rows. */
ALWAYS_INLINE void amx_products(int n, const int8_t *act, size_t act_step, size_t ld_act, const __m512i *codes,
                                int codes_step, int32_t (*sums)[16])
{
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        AMX_SUMS(0, 4, 6, act + i * act_step, ld_act, codes + i * codes_step, sums[16 * i]);
        AMX_SUMS(1, 5, 7, act + (i + 1) * act_step, ld_act, codes + (i + 1) * codes_step, sums[16 * (i + 1)]);
        AMX_SUMS(2, 4, 6, act + (i + 2) * act_step, ld_act, codes + (i + 2) * codes_step, sums[16 * (i + 2)]);
        AMX_SUMS(3, 5, 7, act + (i + 3) * act_step, ld_act, codes + (i + 3) * codes_step, sums[16 * (i + 3)]);
    }
    for (; i < n; i++) AMX_SUMS(0, 4, 6, act + i * act_step, ld_act, codes + i * codes_step, sums[16 * i]);
}

/* Token m's fold of a block: acc = fma(isum, d * da, acc), then the
 * minimum's term. */
ALWAYS_INLINE __m512 amx_fold(const int T, __m512 d, __m512 m, const int32_t *sums, float da, int asum, __m512 acc)
{
    const __m512 vda = _mm512_set1_ps(da);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums)), _mm512_mul_ps(d, vda), acc);
    if (has_min(T)) acc = _mm512_fmadd_ps(_mm512_set1_ps((float)asum), _mm512_mul_ps(m, vda), acc);
    return acc;
}


/* Each thread's sums of one chunk (row s of product i at [16 i + s]) and, for
 * the paired products, their activation tiles. */
static _Thread_local _Alignas(64) int32_t amx_sums[WIDE_CHUNK * AMX_TOKENS][16];
static _Thread_local _Alignas(64) int8_t amx_pairs[WIDE_CHUNK / 2][2 * AMX_PAIRED_TOKENS][64];

/* The paired products' activation tiles for M tokens (M <= 4) and n blocks
 * of 32 (token m's block i at q + m * ld + 32 i): pair p's rows [0, M)
 * block 2p then zeros, rows [M, 2M) zeros then block 2p + 1 (zeros past
 * the last block). */
static inline void amx_fill_pairs(const int8_t *q, size_t ld, int M, int n)
{
    const __m256i zero = _mm256_setzero_si256();
    for (int p = 0; p < (n + 1) / 2; p++)
        for (int m = 0; m < M; m++) {
            const int8_t *x = q + (size_t)m * ld + 2 * EBB_NATIVE_QK * p;
            _mm256_store_si256((__m256i *)amx_pairs[p][m], ld256(x));
            _mm256_store_si256((__m256i *)(amx_pairs[p][m] + 32), zero);
            _mm256_store_si256((__m256i *)amx_pairs[p][M + m], zero);
            _mm256_store_si256((__m256i *)(amx_pairs[p][M + m] + 32), 2 * p + 1 < n ? ld256(x + EBB_NATIVE_QK) : zero);
        }
}

/* The fold of tokens t .. t + G - 1 (rows m .. m + G - 1 of the products)
 * over the chunk's n blocks, each token's accumulator one chain in block
 * order (the scalar bits); G chains side by side, since one alone waits on
 * its two dependent FMAs per block. */
ALWAYS_INLINE void amx_fold_tokens(const int T, const int G, const int paired, const struct ebb_native_matmul_args *a,
                                   const struct amx_chunk *ch, int t, int m, int M, int o, int b0, int n)
{
    const int nb = a->n_in / amx_block(T);
    __m512 acc[4];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
        acc[g] = b0 ? _mm512_loadu_ps(a->out + (size_t)(t + g) * a->n_out + o) : _mm512_setzero_ps();
    const float *da = a->d + (size_t)t * nb + b0;
    const int16_t *asum = has_min(T) ? a->sums + (size_t)t * nb + b0 : NULL;
    for (int k = 0; k < n; k++) {
        const int32_t (*sums)[16] = paired ? &amx_sums[16 * (k >> 1) + (k & 1) * M + m] : &amx_sums[16 * k + m];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++)
            acc[g] = amx_fold(T, ch->d[k], ch->m[k], sums[g], da[(size_t)g * nb + k],
                              has_min(T) ? asum[(size_t)g * nb + k] : 0, acc[g]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) _mm512_storeu_ps(a->out + (size_t)(t + g) * a->n_out + o, acc[g]);
}

/* The fold of a group's M tokens (from t), four, two or one at a time. */
ALWAYS_INLINE void amx_fold_group(const int T, const int paired, const struct ebb_native_matmul_args *a,
                                  const struct amx_chunk *ch, int t, int M, int o, int b0, int n)
{
    int m = 0;
    for (; m + 4 <= M; m += 4) amx_fold_tokens(T, 4, paired, a, ch, t + m, m, M, o, b0, n);
    for (; m + 2 <= M; m += 2) amx_fold_tokens(T, 2, paired, a, ch, t + m, m, M, o, b0, n);
    for (; m < M; m++) amx_fold_tokens(T, 1, paired, a, ch, t + m, m, M, o, b0, n);
}

/* Blocks [b0, b1) of the chunk ch (the 16 rows at o) against tokens [t0,
 * t1), in groups of 16 (8 paired): every product first, then the fold,
 * token by token with its accumulator in a register. */
ALWAYS_INLINE void amx_tokens(const int T, const struct ebb_native_matmul_args *a, const struct amx_chunk *ch,
                              int t0, int t1, int o, int b0, int b1)
{
    const int n = b1 - b0, QK = amx_block(T), can_pair = QK == EBB_NATIVE_QK;   /* a 64-deep block fills the tile */
    const int group = can_pair && t1 - t0 <= AMX_PAIRED_TOKENS ? AMX_PAIRED_TOKENS : AMX_TOKENS;
    for (int tg = t0; tg < t1; tg += group) {
        const int M = min_int(group, t1 - tg), paired = can_pair && M <= AMX_PAIRED_TOKENS;
        const int8_t *q = a->q + (size_t)tg * a->n_in + (size_t)QK * b0;
        if (paired) {
            amx_fill_pairs(q, (size_t)a->n_in, M, n);
            amx_configure(2 * M, 2 * EBB_NATIVE_QK);
            amx_products((n + 1) / 2, amx_pairs[0][0], sizeof amx_pairs[0], 64, ch->codes[0], 16, amx_sums);
        } else {
            amx_configure(M, QK);
            amx_products(n, q, (size_t)QK, (size_t)a->n_in, ch->codes[0], QK / 4, amx_sums);
        }
        if (paired) amx_fold_group(T, 1, a, ch, tg, M, o, b0, n);
        else amx_fold_group(T, 0, a, ch, tg, M, o, b0, n);
    }
}
#endif

/* The K-quants the same way, 16 rows per super-block of 256: the codes
 * (unsigned, as k_codes gives them) interleaved four at a time, and per row
 * its 16 sub-block scales, both as int32 lanes (to scale each sub-block's
 * sum) and as int16 pairs with the minimums (for the sums against the
 * token's 16 code sums: the minimums' term and, for Q3_K and Q6_K, the
 * codes' offset). */
struct wide_kblock {
    __m512i codes[8][8];         /* [chunk of 32][k]: codes 32c + 4k .. + 3 of each row */
    __m512i scale[16];           /* [sub-block]: each row's scale */
    __m512i scale_pairs[8];      /* [i]: each row's scales 2i, 2i + 1 as int16 */
    __m512i min_pairs[8];        /* the same for the minimums (Q2_K, Q4_K, Q5_K) */
    __m512 d, dmin;
};
_Static_assert(WIDE_K_CHUNK * sizeof(struct wide_kblock) <= WIDE_SCRATCH, "K chunk fits the scratch");
_Static_assert(WIDE_CHUNK * sizeof(struct wide_block) <= WIDE_SCRATCH, "legacy chunk fits the scratch");

/* lanes r: word k of row r, from words[16][8] */
ALWAYS_INLINE __m512i wide_column(const int32_t (*words)[8], int k)
{
    const __m512i column = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    return _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(k)), words, 4);
}

ALWAYS_INLINE void wide_k_pack(const int T, const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                               struct wide_kblock *wb)
{
    const size_t BB = block_bytes(T), d_at = T == NT_Q2_K ? 80 : T == NT_Q3_K ? 108 : T == NT_Q6_K ? 208 : 0;
    const int has_min = T == NT_Q2_K || T == NT_Q4_K || T == NT_Q5_K;
    for (int b = b0; b < b1; b++, wb++) {
        int32_t words[8][WIDE_ROWS][8], sc_words[WIDE_ROWS][8], min_words[WIDE_ROWS][8];
        int32_t scale[16][WIDE_ROWS];
        uint16_t d[WIDE_ROWS], dmin[WIDE_ROWS];
        for (int r = 0; r < WIDE_ROWS; r++) {
            const uint8_t *blk = a->w + (size_t)(o + r) * a->row_bytes + (size_t)b * BB;
            /* the row's next super-block, as wide_pack does (WIDE_PREFETCH): Q4_K and Q6_K at
             * 16 tokens x 14336 x 4096 went 43 -> 51 and 35 -> 46 GMAC/s, one thread */
            for (size_t ahead = 0; ahead < BB; ahead += 64) _mm_prefetch((const char *)blk + BB + ahead, _MM_HINT_T0);
            __m256i sc, mins = _mm256_setzero_si256();
            k_scales(T, blk, &sc, &mins);
            _mm256_storeu_si256((__m256i *)sc_words[r], sc);
            _mm256_storeu_si256((__m256i *)min_words[r], mins);
            const int16_t *s16 = (const int16_t *)sc_words[r];
            for (int j = 0; j < 16; j++) scale[j][r] = s16[j];
            for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)words[c][r], k_codes(T, blk, c));
            d[r] = (uint16_t)ld16(blk + d_at);
            dmin[r] = has_min ? (uint16_t)ld16(blk + d_at + 2) : 0;
        }
        for (int c = 0; c < 8; c++)
            for (int k = 0; k < 8; k++) wb->codes[c][k] = wide_column((const int32_t (*)[8])words[c], k);
        for (int j = 0; j < 16; j++) wb->scale[j] = _mm512_loadu_si512(scale[j]);
        for (int i = 0; i < 8; i++) {
            wb->scale_pairs[i] = wide_column((const int32_t (*)[8])sc_words, i);
            wb->min_pairs[i] = wide_column((const int32_t (*)[8])min_words, i);
        }
        wb->d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
        wb->dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dmin));
    }
}

/* A super-block's float steps for one token, from its scaled code sums
 * sumi (each row's sum over sub-blocks of scale x isum, codes unsigned):
 * the offset of Q3_K and Q6_K and the minimums' term through the token's
 * 16 code sums bs (int16 pairs against each row's scale or minimum pairs),
 * then native.h's two FMAs. */
ALWAYS_INLINE __m512 wide_k_fold(const int T, const struct wide_kblock *wb, __m512i sumi, const uint8_t *bs, float da,
                                 __m512 acc)
{
    const int has_min = T == NT_Q2_K || T == NT_Q4_K || T == NT_Q5_K;
    const int offset_shift = T == NT_Q6_K ? 5 : T == NT_Q3_K ? 2 : 0;   /* offset 32 or 4 */
    __m512i summ = _mm512_setzero_si512(), corr = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        const __m512i pair = _mm512_set1_epi32((int)ld32(bs + 4 * i));
        if (has_min) summ = _mm512_dpwssd_epi32(summ, wb->min_pairs[i], pair);
        if (offset_shift) corr = _mm512_dpwssd_epi32(corr, wb->scale_pairs[i], pair);
    }
    if (offset_shift) sumi = _mm512_sub_epi32(sumi, _mm512_slli_epi32(corr, offset_shift));
    const __m512 vda = _mm512_set1_ps(da);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(wb->d, vda), acc);
    if (has_min)
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(), summ)),
                              _mm512_mul_ps(wb->dmin, vda), acc);
    return acc;
}

ALWAYS_INLINE void wide_k_tokens(const int T, const struct ebb_native_matmul_args *a, const struct wide_kblock *wb0,
                                 int t0, int t1, int o, int b0, int b1)
{
    const int nb = a->n_in / EBB_NATIVE_QK_K;
    const struct wide_kblock *wb = wb0 - b0;
    for (int t = t0; t < t1; t++) {
        const uint8_t *q = (const uint8_t *)(a->q + (size_t)t * a->n_in);
        const float *da = a->d + (size_t)t * nb;
        const uint8_t *bsums = (const uint8_t *)(a->sums + (size_t)t * (a->n_in / 16));
        float *out = a->out + (size_t)t * a->n_out + o;
        __m512 acc = b0 ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
        for (int b = b0; b < b1; b++) {
            const uint8_t *qb = q + (size_t)EBB_NATIVE_QK_K * b, *bs = bsums + 32 * (size_t)b;
            __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) {   /* sub-block j: values 16j .. 16j + 15, words 4j .. 4j + 3 */
                __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int w = 0; w < 4; w++)
                    isum = _mm512_dpbusd_epi32(isum, wb[b].codes[j / 2][4 * (j % 2) + w],
                                               _mm512_set1_epi32((int)ld32(qb + 16 * j + 4 * w)));
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(isum, wb[b].scale[j]));
            }
            acc = wide_k_fold(T, &wb[b], sumi, bs, da[b], acc);
        }
        _mm512_storeu_ps(out, acc);
    }
}

/* Q4_K and Q5_K super-blocks of the 16 rows at o into wide_kblock's codes,
 * its scales of each 32 (scale[2j] = scale[2j + 1]), minimum pairs, d and
 * dmin (not scale_pairs: only the offsets of Q3_K and Q6_K read them), by
 * in-register transposes rather than wide_k_pack's gathers, for the VNNI
 * wide path and AMX alike (a 1.1B Q4_K decoding 12 sequences on the VNNI
 * path: 90-91 -> 108-112 tok/s; its 9-token threshold stays, the tiles
 * being quicker below it either way): the block's first
 * 16 bytes give d | dmin and the three scale words (formats.c's
 * ebb_k4_scale_min, 16 rows at once), each 32 bytes of codes two
 * transposes whose nibbles are two chunks' codes as they stand, and Q5_K's
 * 32 bytes of fifth bits two more (bit c of byte l: value 32c + l). */
ALWAYS_INLINE void k_pack_transposed(const int T, const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                              struct wide_kblock *wb)
{
    const size_t stride = a->row_bytes, BB = block_bytes(T);
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m512i bit4 = _mm512_set1_epi8(0x10);
    for (int b = b0; b < b1; b++, wb++) {
        const uint8_t *blk = rows + (size_t)b * BB;
        next_rows_prefetch(T, a, o, WIDE_ROWS, b);
        __m512i h[4], scale[8], min[8];
        rows_dwords(blk, stride, h);   /* d | dmin, scale words s0, s1, s2 */
        k4_scales_mins(h, scale, min);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            wb->scale[2 * j] = wb->scale[2 * j + 1] = scale[j];
            wb->min_pairs[j] = _mm512_or_si512(min[j], _mm512_slli_epi32(min[j], 16));
        }
        wb->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h[0]));
        wb->dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h[0], 16)));
        __m512i qh[8];
        if (T == NT_Q5_K) {
            rows_dwords(blk + 16, stride, qh);
            rows_dwords(blk + 32, stride, qh + 4);
        }
        const uint8_t *qs = blk + (T == NT_Q4_K ? 16 : 48);
        for (int pair = 0; pair < 4; pair++) {   /* chunks 2 pair (low nibbles) and 2 pair + 1 (high) */
            __m512i *lo = wb->codes[2 * pair], *hi = wb->codes[2 * pair + 1];
            rows_nibbles(qs + 32 * pair, stride, 2, _mm512_setzero_si512(), lo, hi);
            if (T == NT_Q5_K)
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    lo[k] = _mm512_or_si512(lo[k], _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh[k], 2 * pair), 4), bit4));
                    hi[k] = _mm512_or_si512(hi[k], _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh[k], 2 * pair + 1), 4), bit4));
                }
        }
    }
}

/* Q6_K the same way: its codes unsigned (0-63, the offset 32 coming back
 * through scale_pairs in wide_k_fold, as from wide_k_pack), each half of
 * the super-block (128 values) its 64 bytes of low nibbles as two
 * rows_nibbles (bytes l and 32 + l: chunks 4n, 4n + 1 from the low nibbles,
 * 4n + 2, 4n + 3 from the high) and its 32 bytes of high pairs as two
 * transposes (bits 2m, 2m + 1 of byte l: chunk 4n + m), the 16 signed
 * scales one more, d a gather (it ends the block: 16 bytes from it would
 * read past the last row). */
ALWAYS_INLINE void k6_pack_transposed(const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                                      struct wide_kblock *wb)
{
    const size_t stride = a->row_bytes, BB = block_bytes(NT_Q6_K);
    const uint8_t *rows = a->w + (size_t)o * stride;
    const __m512i pair_bits = _mm512_set1_epi8(0x30), low16 = _mm512_set1_epi32(0xffff);
    const __m512i row_at = rows16_at(stride);
    for (int b = b0; b < b1; b++, wb++) {
        const uint8_t *blk = rows + (size_t)b * BB;
        next_rows_prefetch(NT_Q6_K, a, o, WIDE_ROWS, b);
        __m512i s[4];
        rows_dwords(blk + 192, stride, s);   /* s[k]: scales 4k .. 4k + 3 */
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) wb->scale[j] = _mm512_srai_epi32(_mm512_slli_epi32(s[j / 4], 24 - 8 * (j % 4)), 24);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m512i x = _mm512_srli_epi32(s[i / 2], 16 * (i % 2));          /* scales 2i, 2i + 1 first */
            const __m512i first = _mm512_srai_epi16(_mm512_slli_epi16(x, 8), 8);   /* low word: scale 2i */
            const __m512i second = _mm512_srai_epi16(x, 8);                        /* low word: scale 2i + 1 */
            wb->scale_pairs[i] = _mm512_or_si512(_mm512_and_si512(first, low16), _mm512_slli_epi32(second, 16));
        }
        const __m512i d = _mm512_i32gather_epi32(row_at, (const void *)(blk + 206), 1);   /* d: the high half */
        wb->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(d, 16)));
        wb->dmin = _mm512_setzero_ps();
        for (int n = 0; n < 2; n++) {
            __m512i qh[8];
            rows_dwords(blk + 128 + 32 * n, stride, qh);
            rows_dwords(blk + 128 + 32 * n + 16, stride, qh + 4);
            __m512i(*codes)[8] = wb->codes + 4 * n;
            rows_nibbles(blk + 64 * n, stride, 2, _mm512_setzero_si512(), codes[0], codes[2]);
            rows_nibbles(blk + 64 * n + 32, stride, 2, _mm512_setzero_si512(), codes[1], codes[3]);
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++)
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++)
                    codes[m][k] = _mm512_or_si512(
                        codes[m][k], _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh[k], 2 * m), 4), pair_bits));
        }
    }
}

/* A K-quant super-block range of the 16 rows at o, packed by transposes
 * where the type has them, else by wide_k_pack's gathers (Q2_K, Q3_K). */
ALWAYS_INLINE void k_pack(const int T, const struct ebb_native_matmul_args *a, int o, int b0, int b1,
                          struct wide_kblock *wb)
{
    if (T == NT_Q4_K || T == NT_Q5_K) k_pack_transposed(T, a, o, b0, b1, wb);
    else if (T == NT_Q6_K) k6_pack_transposed(a, o, b0, b1, wb);
    else wide_k_pack(T, a, o, b0, b1, wb);
}

#ifdef NX_AMX
/* Q4_K and Q5_K on AMX, from 13 tokens (below, row16_k4_tokens from 5 and
 * the tiles below that: a 1.1B Q4_K's c(2) 1.23 on the tiles, 1.79-1.85
 * from AMX at 3 tokens). Their scales are per 32 values; the K-quants with
 * scales per 16 would need a tile store per 16 values and measured slower
 * than the VNNI wide path (Q6_K prefill of 64 tokens 100 -> 82-90 GMAC/s,
 * one thread), so they keep it. The super-block is packed as wide_kblock
 * (k_pack_transposed), one product per 32 values (the tail of a few tokens in
 * pairs, as the legacy types'), then per token the products' sums times
 * their scales and wide_k_fold, the VNNI path's own float steps. */

ALWAYS_INLINE void amx_k_tokens(const int T, const struct ebb_native_matmul_args *a, const struct wide_kblock *wb0,
                                int t0, int t1, int o, int b0, int b1)
{
    const int J = EBB_NATIVE_QK_K / EBB_NATIVE_QK;   /* sub-blocks of 32 */
    const int nb = a->n_in / EBB_NATIVE_QK_K;
    const int group = t1 - t0 <= AMX_PAIRED_TOKENS ? AMX_PAIRED_TOKENS : AMX_TOKENS;
    for (int tg = t0; tg < t1; tg += group) {
        const int M = min_int(group, t1 - tg), paired = M <= AMX_PAIRED_TOKENS;
        for (int b = b0; b < b1; b++) {
            const struct wide_kblock *wb = &wb0[b - b0];
            const int8_t *q = a->q + (size_t)tg * a->n_in + (size_t)EBB_NATIVE_QK_K * b;
            if (paired) {
                amx_fill_pairs(q, (size_t)a->n_in, M, J);
                amx_configure(2 * M, 2 * EBB_NATIVE_QK);
                amx_products(J / 2, amx_pairs[0][0], sizeof amx_pairs[0], 64, wb->codes[0], 16, amx_sums);
            } else {
                amx_configure(M, EBB_NATIVE_QK);
                amx_products(J, q, EBB_NATIVE_QK, (size_t)a->n_in, wb->codes[0], 8, amx_sums);
            }
            for (int m = 0; m < M; m++) {
                const size_t t = (size_t)(tg + m);
                float *out = a->out + t * a->n_out + o;
                const uint8_t *bs = (const uint8_t *)(a->sums + t * (a->n_in / 16)) + 32 * (size_t)b;
                __m512i sumi = _mm512_setzero_si512();
                for (int j = 0; j < J; j++) {
                    const int32_t *isum = paired ? amx_sums[16 * (j >> 1) + (j & 1) * M + m] : amx_sums[16 * j + m];
                    sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(_mm512_load_si512(isum), wb->scale[2 * j]));
                }
                const __m512 acc = b ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
                _mm512_storeu_ps(out, wide_k_fold(T, wb, sumi, bs, a->d[t * nb + b], acc));
            }
        }
    }
}
#endif
#endif

/* ------------------------------------------------------------ rectangles */

typedef void (*tile_fn)(const struct ebb_native_matmul_args *a, int t, int mv, int o, int nv);

/* tiles: 1 x 8, 2 x 4 and 4 x 2 (tokens x rows). */
typedef void (*wide_fn)(const struct ebb_native_matmul_args *a, void *scratch, int t0, int t1, int o);
/* rows_fn: tokens [t0, t1) against the REG_ROWS rows at o, in registers. */
typedef void (*rows_fn)(const struct ebb_native_matmul_args *a, int t0, int t1, int o);

/* Where a type's products go wide (tokens at least), per path; and the
 * token counts row16_rows (AVX-512, AMX) or row8_rows (AVX2) take first,
 * REG_ROWS rows at a time. */
#ifdef NX_AMX
#define LEGACY_WIDE_MIN_TOKENS(T) AMX_MIN_TOKENS
#define REG_TOKENS_AT_MOST(T) (is_k(T) ? K_ROW16_MAX_TOKENS_AMX : AMX_ROW16_MAX_TOKENS)
#else
#define LEGACY_WIDE_MIN_TOKENS(T) WIDE_MIN_TOKENS
#ifdef NX_WIDE_PREFILL
#define REG_TOKENS_AT_MOST(T) (is_k(T) ? K_ROW16_MAX_TOKENS : INT_MAX)
#endif
#endif
#ifdef NX_WIDE_PREFILL
#define REG_ROWS WIDE_ROWS
#define REG_MIN_TOKENS(T) (is_k(T) ? K_ROW16_MIN_TOKENS : 1)
#else
#define REG_ROWS 8
#define REG_MIN_TOKENS(T) ROW8_MIN_TOKENS(T)
#define REG_TOKENS_AT_MOST(T) INT_MAX   /* no wide path on AVX2 */
#endif

#ifdef NX_WIDE_PREFILL
/* Each worker's own packed chunk: no allocation per product. */
static _Thread_local _Alignas(64) unsigned char wide_scratch[WIDE_SCRATCH];
#endif

static void rectangle(const tile_fn tiles[3], wide_fn wide, int wide_min_tokens, rows_fn in_registers,
                      int reg_min_tokens, int reg_max_tokens, const struct ebb_native_matmul_args *a, int t0, int t1,
                      int o0, int o1)
{
    /* Whole tiles of REG_ROWS rows of the types in_registers takes; the
     * rows left over take the tiles below. */
    if (in_registers && t1 - t0 >= reg_min_tokens && t1 - t0 <= reg_max_tokens && o1 - o0 >= REG_ROWS) {
        const int rows_end = o0 + (o1 - o0) / REG_ROWS * REG_ROWS;
        for (int o = o0; o < rows_end; o += REG_ROWS) in_registers(a, t0, t1, o);
        o0 = rows_end;
        if (o0 == o1) return;
    }
#ifdef NX_WIDE_PREFILL
    /* Enough tokens: whole 16-row tiles go wide, the rows left over take
     * the tiles below. */
    if (wide && t1 - t0 >= wide_min_tokens && o1 - o0 >= WIDE_ROWS) {
        unsigned char *scratch = wide_scratch;
        const int rows_end = o0 + (o1 - o0) / WIDE_ROWS * WIDE_ROWS;
        for (int o = o0; o < rows_end; o += WIDE_ROWS) wide(a, scratch, t0, t1, o);
        o0 = rows_end;
        if (o0 == o1) return;
    }
#endif
    for (int tb = t0; tb < t1; tb += TB) {
        const int te = min_int(tb + TB, t1), quads_end = tb + (te - tb) / 4 * 4, rest = te - quads_end;
        /* Each pair of rows (in L1) meets every token quad of the block (in L2). */
        if (quads_end > tb)
            for (int o = o0; o < o1; o += 2)
                for (int t = tb; t < quads_end; t += 4) tiles[2](a, t, 4, o, min_int(2, o1 - o));
        if (rest == 3)
            for (int o = o0; o < o1; o += 2) tiles[2](a, quads_end, 3, o, min_int(2, o1 - o));
        else if (rest == 2)
            for (int o = o0; o < o1; o += 4) tiles[1](a, quads_end, 2, o, min_int(4, o1 - o));
        else if (rest == 1) {
            /* Decode: the tiles fetch their successors; start the first one here. */
            const char *w = (const char *)(a->w + (size_t)o0 * a->row_bytes);
            const size_t len = (size_t)min_int(o1 - o0, 8) * a->row_bytes;
            for (size_t l = 0; l < len; l += 64) _mm_prefetch(w + l, _MM_HINT_T0);
            for (int o = o0; o < o1; o += 8) tiles[0](a, quads_end, 1, o, min_int(8, o1 - o));
        }
    }
}

#ifdef NX_WIDE_PREFILL
#ifdef NX_AMX
#define WIDE_LEGACY(T, a, scratch, t0, t1, o, b0, b1) \
    (amx_pack(T, a, o, b0, b1, scratch), amx_tokens(T, a, scratch, t0, t1, o, b0, b1))
#define WIDE_K(T, a, scratch, t0, t1, o, b0, b1) \
    (k_pack(T, a, o, b0, b1, scratch), (T) == NT_Q4_K || (T) == NT_Q5_K \
                                           ? amx_k_tokens(T, a, scratch, t0, t1, o, b0, b1) \
                                           : wide_k_tokens(T, a, scratch, t0, t1, o, b0, b1))
#else
#define WIDE_K(T, a, scratch, t0, t1, o, b0, b1) \
    (k_pack(T, a, o, b0, b1, scratch), wide_k_tokens(T, a, scratch, t0, t1, o, b0, b1))
#define WIDE_LEGACY(T, a, scratch, t0, t1, o, b0, b1) \
    (wide_pack(T, a, o, b0, b1, scratch), wide_tokens(T, a, scratch, t0, t1, o, b0, b1))
#endif
#define NX_WIDE(name, T) \
    static void name##_wide(const struct ebb_native_matmul_args *a, void *scratch, int t0, int t1, int o) \
    { \
        const int k = is_k(T), nb = a->n_in / (k ? EBB_NATIVE_QK_K : EBB_NATIVE_QK); \
        const int chunk = k ? WIDE_K_CHUNK : WIDE_CHUNK; \
        for (int b0 = 0; b0 < nb; b0 += chunk) { \
            const int b1 = b0 + chunk < nb ? b0 + chunk : nb; \
            if (k) { \
                WIDE_K(T, a, scratch, t0, t1, o, b0, b1); \
            } else { \
                WIDE_LEGACY(T, a, scratch, t0, t1, o, b0, b1); \
            } \
        } \
    }
#define NX_WIDE_FN(name, T) name##_wide
#else
#define NX_WIDE(name, T)
#define NX_WIDE_FN(name, T) NULL
#endif

#ifdef NX_WIDE_PREFILL
#define NX_REGS(name, T) \
    static void name##_regs(const struct ebb_native_matmul_args *a, int t0, int t1, int o) \
    { \
        if (takes_row16(T)) row16_rows(T, a, t0, t1, o); \
    }
#define NX_REGS_FN(name, T) (takes_row16(T) ? name##_regs : NULL)
#else
#define NX_REGS(name, T) \
    static void name##_regs(const struct ebb_native_matmul_args *a, int t0, int t1, int o) \
    { \
        if (takes_row8(T)) row8_rows(T, a, t0, t1, o); \
    }
#define NX_REGS_FN(name, T) (takes_row8(T) ? name##_regs : NULL)
#endif

#define NX_TYPE(name, T) \
    static void name##_1x8(const struct ebb_native_matmul_args *a, int t, int mv, int o, int nv) \
    { \
        tile(T, 1, 8, a, t, mv, o, nv); \
    } \
    static void name##_2x4(const struct ebb_native_matmul_args *a, int t, int mv, int o, int nv) \
    { \
        tile(T, 2, 4, a, t, mv, o, nv); \
    } \
    static void name##_4x2(const struct ebb_native_matmul_args *a, int t, int mv, int o, int nv) \
    { \
        tile(T, 4, 2, a, t, mv, o, nv); \
    } \
    NX_WIDE(name, T) \
    NX_REGS(name, T) \
    void NX_FN(ebb_native_block_##name)(const struct ebb_native_matmul_args *a, int t0, int t1, int o0, int o1) \
    { \
        static const tile_fn tiles[3] = { name##_1x8, name##_2x4, name##_4x2 }; \
        rectangle(tiles, NX_WIDE_FN(name, T), is_k(T) ? WIDE_MIN_TOKENS : LEGACY_WIDE_MIN_TOKENS(T), \
                  NX_REGS_FN(name, T), REG_MIN_TOKENS(T), REG_TOKENS_AT_MOST(T), a, t0, t1, o0, o1); \
    }

NX_TYPE(q4_0, NT_Q4_0)
NX_TYPE(q4_1, NT_Q4_1)
NX_TYPE(q5_0, NT_Q5_0)
NX_TYPE(q5_1, NT_Q5_1)
NX_TYPE(q8_0, NT_Q8_0)
NX_TYPE(q2_k, NT_Q2_K)
NX_TYPE(q3_k, NT_Q3_K)
NX_TYPE(q4_k, NT_Q4_K)
NX_TYPE(q5_k, NT_Q5_K)
NX_TYPE(q6_k, NT_Q6_K)
NX_TYPE(w2g64, NT_W2G64)

#ifdef NX_WIDE_PREFILL
/* W4G64, ebb's own 4-bit type (quant_x86.h has its tiles): from 2 tokens,
 * whole 16-row tiles on row16_rows, or on AMX on the tile unit (one 64-deep
 * product per block, no pairs since the tile is full, its rows packed as
 * Q4_0's are); one token and the rows left over on quant_x86.h's
 * rectangle. From 2, not 3 as the GGUF types on AMX: W4G64's tiles have no
 * quick 2-token shape (`ebb pack --format w4a4` of the default model, `ebb
 * bench --verify 8`: c(1) 1.48-1.56 on its tiles, 1.21-1.31 on AMX;
 * decoding 2 sequences 270-276 -> 393-422 tok/s). One token decodes as
 * fast on row16_rows as on the tiles (302-323 against 312-325 tok/s), and
 * on AMX row16_rows gains nothing at 2 to 8 tokens and loses from 9
 * (decoding 12 sequences: 799-853 against 922-1036 tok/s). */
#define W4G64_WIDE_MIN_TOKENS 2
static void wide_block_w4g64(const struct matmul_args *m, int t0, int t1, int o0, int o1)
{
    int rows_end = o0;
    if (t1 - t0 >= W4G64_WIDE_MIN_TOKENS && o1 - o0 >= WIDE_ROWS) {
        const struct ebb_native_matmul_args a = {m->out, m->x.q, m->x.s, NULL, m->w, m->row_bytes,
                                                 m->n_tok, m->n_in, m->n_out};
        rows_end = o0 + (o1 - o0) / WIDE_ROWS * WIDE_ROWS;
        for (int o = o0; o < rows_end; o += WIDE_ROWS) {
#ifdef NX_AMX
            const int nb = m->n_in / EBB_W4G64_GROUP, chunk = WIDE_CHUNK * EBB_NATIVE_QK / EBB_W4G64_GROUP;
            for (int b0 = 0; b0 < nb; b0 += chunk) {
                const int b1 = min_int(b0 + chunk, nb);
                amx_pack(NT_W4G64, &a, o, b0, b1, (struct amx_chunk *)(void *)wide_scratch);
                amx_tokens(NT_W4G64, &a, (const struct amx_chunk *)(void *)wide_scratch, t0, t1, o, b0, b1);
            }
#else
            row16_rows(NT_W4G64, &a, t0, t1, o);
#endif
        }
    }
    if (rows_end < o1) ebb_cpu_block_w4g64_avx512(m, t0, t1, rows_end, o1);
}

EBB_CPU_MATMUL(NX_FN(ebb_cpu_matmul_w4g64), EBB_TYPE_W4G64, wide_block_w4g64, 16, 4)
#endif
