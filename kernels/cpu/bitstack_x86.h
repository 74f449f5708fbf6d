/* Private to kernels/cpu: the walk of BitStack's sign sums that the AVX2
 * and AVX-512 paths share (bitstack_avx2.c, bitstack_avx512.c say how their
 * tiles work). Included after the file defines
 *     BX_ROWS                      rows a tile
 *     static int32_t bx_total(const int8_t *x, int n)        a vector's sum
 *     always-inline bx_tile(nv, isum, n_vec, s, x0, x1, x2, x3, tot, n, rows_left, nv_left)
 * (declared here, defined after the include) where s holds BX_ROWS row pointers (past the last row: the last again),
 * nv (1 to 4) is a constant at every call, and the tile stores rows
 * < rows_left and vectors < nv_left of T_v - 2 S through bx_store_row. */
#ifndef BX_ROWS
#error "define BX_ROWS, bx_total and bx_tile before including bitstack_x86.h"
#endif

#include <immintrin.h>

#define BX_GROUP 64   /* vectors whose totals are taken at a time */

static int32_t bx_total(const int8_t *x, int n);
static inline __attribute__((always_inline)) void bx_tile(const int nv, int32_t *isum, int n_vec,
                                                          const uint8_t *const *s, const int8_t *x0,
                                                          const int8_t *x1, const int8_t *x2, const int8_t *x3,
                                                          const int32_t *tot, int n, int n_rows_left, int nv_left);

/* One row's four sums s of the sign-set inputs: T_v - 2 S into dst, the
 * first nv_left of them. */
static inline void bx_store_row(int32_t *dst, const int32_t *tot, __m128i s, int nv_left) {
    const __m128i sum = _mm_sub_epi32(_mm_loadu_si128((const __m128i *)tot), _mm_slli_epi32(s, 1));
    if (nv_left >= 4) {
        _mm_storeu_si128((__m128i *)dst, sum);
        return;
    }
    int32_t lanes[4];
    _mm_storeu_si128((__m128i *)lanes, sum);
    for (int c = 0; c < nv_left; c++) dst[c] = lanes[c];
}

/* backend.h's bitstack_isums: vectors in groups whose totals are taken
 * first, then tiles of BX_ROWS rows x up to four vectors. */
static inline void bx_isums(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n) {
    const size_t row_bytes = (size_t)n / 8;
    int32_t tot[BX_GROUP + 4];
    for (int vg = 0; vg < n_vec; vg += BX_GROUP) {
        const int nv = n_vec - vg < BX_GROUP ? n_vec - vg : BX_GROUP;
        for (int v = 0; v < nv; v++) tot[v] = bx_total(t + (size_t)(vg + v) * n, n);
        for (int v = nv; v < BX_GROUP + 4; v++) tot[v] = 0;
        for (int o = 0; o < n_rows; o += BX_ROWS) {
            const uint8_t *s[BX_ROWS];
            for (int r = 0; r < BX_ROWS; r++) s[r] = signs + (size_t)(o + r < n_rows ? o + r : n_rows - 1) * row_bytes;
            for (int v = 0; v < nv; v += 4) {
                const int8_t *x = t + (size_t)(vg + v) * n;
                const size_t n2 = 2 * (size_t)n, n3 = 3 * (size_t)n;
                const int left = nv - v;
                int32_t *dst = isum + (size_t)o * n_vec + vg + v;
                switch (left < 4 ? left : 4) {   /* a tile of as many vectors as are left, up to four */
                case 1: bx_tile(1, dst, n_vec, s, x, x, x, x, tot + v, n, n_rows - o, left); break;
                case 2: bx_tile(2, dst, n_vec, s, x, x + n, x, x, tot + v, n, n_rows - o, left); break;
                case 3: bx_tile(3, dst, n_vec, s, x, x + n, x + n2, x, tot + v, n, n_rows - o, left); break;
                default: bx_tile(4, dst, n_vec, s, x, x + n, x + n2, x + n3, tot + v, n, n_rows - o, left);
                }
            }
        }
    }
}
