/* BitStack's sign products, AVX-512 (BW, VL, VNNI); the same sums as
 * bitstack_scalar.c (integers: exact).
 *
 * A row's sum against a vector is its total less twice the sum over the
 * inputs whose sign bit is set: isum = T_v - 2 S. S is what VNNI does in
 * one instruction: the row's sign bits, a mask register as they lie in
 * memory, become 0/1 bytes (one masked move), and vpdpbusd multiplies them
 * with the vector's codes four at a time into int32 lanes (at most 4 * 127 a
 * lane a step: no overflow). Tiles of 4 rows x 4 vectors: each row's bytes
 * serve four vectors and each vector's codes four rows, so a step is one
 * instruction a pair (the single-vector loop needed three: a load, a masked
 * negation and the add). The 16 accumulators are folded into four sums a row
 * by unpacking against each other (no horizontal add per pair). A tile
 * takes as many vectors as are left, up to four (decoding one token, a
 * level's rank: 1 to 3 here); missing rows at the edge repeat the last
 * one and are not stored. A 32-input tail runs on the low half with
 * masked loads. The tile is written out by hand so that its 16
 * accumulators stay in registers (a loop over an array of them was left
 * in memory by the compiler, at a third of the speed).
 */
#include "kernels/cpu/ops.h"

#include <immintrin.h>
#include <string.h>

#define BX_ROWS 4
#include "kernels/cpu/bitstack_x86.h"

/* The four accumulators of one row, summed: lane c = the sum of a[c]. */
static inline __m128i fold4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static int32_t bx_total(const int8_t *x, int n) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    int i = 0;
    for (; i + 64 <= n; i += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void *)(x + i)));
    if (i < n) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(0xFFFFFFFFull, x + i));
    return _mm512_reduce_add_epi32(acc);
}

/* A row's sign bits for inputs [i, i + 64), or [i, i + 32) at the tail. */
static inline __mmask64 sign_mask(const uint8_t *s, int i, int tail) {
    if (tail) {
        uint32_t m;
        memcpy(&m, s + i / 8, 4);
        return m;
    }
    uint64_t m;
    memcpy(&m, s + i / 8, 8);
    return m;
}

/* One tile: rows s0..s3 against the first nv (1 to 4, a constant where it
 * is inlined) of vectors x0..x3, written out so the accumulators stay in
 * registers. Stores rows < n_rows_left and vectors < nv_left. */
#define ROW(r) do { \
        const __m512i b = _mm512_maskz_mov_epi8(sign_mask(s##r, i, tail), ones); \
        a##r##0 = _mm512_dpbusd_epi32(a##r##0, b, v0); \
        if (nv > 1) a##r##1 = _mm512_dpbusd_epi32(a##r##1, b, v1); \
        if (nv > 2) a##r##2 = _mm512_dpbusd_epi32(a##r##2, b, v2); \
        if (nv > 3) a##r##3 = _mm512_dpbusd_epi32(a##r##3, b, v3); \
    } while (0)
#define STORE(r) bx_store_row(isum + (size_t)(r) * n_vec, tot, fold4(a##r##0, a##r##1, a##r##2, a##r##3), nv_left)

static inline __attribute__((always_inline)) void bx_tile(const int nv, int32_t *isum, int n_vec,
                                                          const uint8_t *const *s, const int8_t *x0,
                                                          const int8_t *x1, const int8_t *x2, const int8_t *x3,
                                                          const int32_t *tot, int n, int n_rows_left, int nv_left) {
    const uint8_t *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
    const __m512i ones = _mm512_set1_epi8(1), z = _mm512_setzero_si512();
    __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
    __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
    for (int i = 0; i < n; i += 64) {
        const int tail = i + 64 > n;   /* n % 64 == 32: the low half */
        const __mmask64 lm = tail ? 0xFFFFFFFFull : ~0ull;
        const __m512i v0 = _mm512_maskz_loadu_epi8(lm, x0 + i);
        const __m512i v1 = nv > 1 ? _mm512_maskz_loadu_epi8(lm, x1 + i) : z;
        const __m512i v2 = nv > 2 ? _mm512_maskz_loadu_epi8(lm, x2 + i) : z;
        const __m512i v3 = nv > 3 ? _mm512_maskz_loadu_epi8(lm, x3 + i) : z;
        ROW(0);
        ROW(1);
        ROW(2);
        ROW(3);
    }
    STORE(0);
    if (n_rows_left > 1) STORE(1);
    if (n_rows_left > 2) STORE(2);
    if (n_rows_left > 3) STORE(3);
}

void ebb_cpu_bitstack_isums_avx512(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec,
                                   int n) {
    bx_isums(isum, signs, n_rows, t, n_vec, n);
}
