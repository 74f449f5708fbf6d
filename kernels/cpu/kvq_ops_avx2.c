/* KV-cache row ops, AVX2 + FMA + F16C.
 *
 * Groups of 64 (every head size that is a multiple of 64) take the vector
 * path: a group's 64 codes become eight vectors of 8 floats (4-bit codes: one
 * 32-byte load split into low and high nibbles, which the layout puts in
 * value order: low nibbles are values 0..31, high nibbles 32..63). The dot
 * keeps the group of x in eight registers across every row of the run and
 * reduces each row once; the weighted sum keeps the group of y in eight
 * registers across the run and stores it once. Smaller groups use the scalar
 * code, which is correct for any group and rare in practice.
 */
#include "kernels/cpu/kvq_ops.h"

#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ALWAYS_INLINE float half(uint16_t h) { return _cvtsh_ss(h); }

/* The low 8 bytes of v as 8 floats. */
ALWAYS_INLINE __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

ALWAYS_INLINE const uint8_t *row_at(const void *base, size_t stride, int r) {
    return (const uint8_t *)base + (size_t)r * stride;
}

/* Codes of one group of 64: values 0..31 (lo) or 32..63 (hi) as four vectors. */
ALWAYS_INLINE void q4_quarter(__m128i b, __m256 *v) {
    v[0] = u8x8(b);
    v[1] = u8x8(_mm_srli_si128(b, 8));
}

ALWAYS_INLINE void q4_unpack(const uint8_t *c, __m256 lo[4], __m256 hi[4]) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)c);
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i l = _mm256_and_si256(b, mask), h = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    q4_quarter(_mm256_castsi256_si128(l), lo);
    q4_quarter(_mm256_extracti128_si256(l, 1), lo + 2);
    q4_quarter(_mm256_castsi256_si128(h), hi);
    q4_quarter(_mm256_extracti128_si256(h, 1), hi + 2);
}

ALWAYS_INLINE void q8_unpack(const uint8_t *c, __m256 lo[4], __m256 hi[4]) {
    for (int k = 0; k < 4; k++) {
        lo[k] = u8x8(_mm_loadl_epi64((const __m128i *)(const void *)(c + 8 * k)));
        hi[k] = u8x8(_mm_loadl_epi64((const __m128i *)(const void *)(c + 32 + 8 * k)));
    }
}

ALWAYS_INLINE void dot_g64(const int bits, float *out, const float *x, const uint8_t *codes, const uint16_t *dm,
                           size_t stride, int n_rows, int n) {
    const int n_groups = n / 64, group_bytes = 8 * bits;
    for (int g = 0; g < n_groups; g++) {
        __m256 xv[8], xs = _mm256_setzero_ps();
        for (int k = 0; k < 8; k++) {
            xv[k] = _mm256_loadu_ps(x + 64 * g + 8 * k);
            xs = _mm256_add_ps(xs, xv[k]);
        }
        const float sx = hsum(xs);
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *c = row_at(codes, stride, r) + g * group_bytes;
            const uint16_t *p = (const uint16_t *)(const void *)row_at(dm, stride, r) + 2 * g;
            __m256 lo[4], hi[4];
            if (bits == 4) q4_unpack(c, lo, hi);
            else q8_unpack(c, lo, hi);
            __m256 a0 = _mm256_mul_ps(xv[0], lo[0]), a1 = _mm256_mul_ps(xv[4], hi[0]);
            for (int k = 1; k < 4; k++) {
                a0 = _mm256_fmadd_ps(xv[k], lo[k], a0);
                a1 = _mm256_fmadd_ps(xv[4 + k], hi[k], a1);
            }
            const float v = half(p[0]) * hsum(_mm256_add_ps(a0, a1)) + half(p[1]) * sx;
            out[r] = g ? out[r] + v : v;
        }
    }
}

ALWAYS_INLINE void axpy_g64(const int bits, float *y, const float *w, const uint8_t *codes, const uint16_t *dm,
                            size_t stride, int n_rows, int n) {
    const int n_groups = n / 64, group_bytes = 8 * bits;
    for (int g = 0; g < n_groups; g++) {
        float *yg = y + 64 * g;
        __m256 yv[8];
        for (int k = 0; k < 8; k++) yv[k] = _mm256_loadu_ps(yg + 8 * k);
        float msum = 0;
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *c = row_at(codes, stride, r) + g * group_bytes;
            const uint16_t *p = (const uint16_t *)(const void *)row_at(dm, stride, r) + 2 * g;
            const __m256 a = _mm256_set1_ps(w[r] * half(p[0]));
            msum += w[r] * half(p[1]);
            __m256 lo[4], hi[4];
            if (bits == 4) q4_unpack(c, lo, hi);
            else q8_unpack(c, lo, hi);
            for (int k = 0; k < 4; k++) {
                yv[k] = _mm256_fmadd_ps(a, lo[k], yv[k]);
                yv[4 + k] = _mm256_fmadd_ps(a, hi[k], yv[4 + k]);
            }
        }
        const __m256 m = _mm256_set1_ps(msum);
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(yg + 8 * k, _mm256_add_ps(yv[k], m));
    }
}

static void dot_q8(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                   int n_rows, int n, int group) {
    if (group != 64) ebb_kv_dot_q8_scalar(out, x, codes, dm, stride, n_rows, n, group);
    else dot_g64(8, out, x, codes, dm, stride, n_rows, n);
}

static void axpy_q8(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                    int n_rows, int n, int group) {
    if (group != 64) ebb_kv_axpy_q8_scalar(y, w, codes, dm, stride, n_rows, n, group);
    else axpy_g64(8, y, w, codes, dm, stride, n_rows, n);
}

static void dot_q4(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                   int n_rows, int n, int group) {
    if (group != 64) ebb_kv_dot_q4_scalar(out, x, codes, dm, stride, n_rows, n, group);
    else dot_g64(4, out, x, codes, dm, stride, n_rows, n);
}

static void axpy_q4(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                    int n_rows, int n, int group) {
    if (group != 64) ebb_kv_axpy_q4_scalar(y, w, codes, dm, stride, n_rows, n, group);
    else axpy_g64(4, y, w, codes, dm, stride, n_rows, n);
}

static void dot_f16(float *out, const float *x, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = (const uint16_t *)(const void *)row_at(rows, stride, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + i))), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8),
                                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + i + 8))), a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; i < n; i++) s += x[i] * half(row[i]);
        out[r] = s;
    }
}

static void axpy_f16(float *y, const float *w, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = (const uint16_t *)(const void *)row_at(rows, stride, r);
        const __m256 a = _mm256_set1_ps(w[r]);
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + i)));
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(y + i)));
        }
        for (; i < n; i++) y[i] += w[r] * half(row[i]);
    }
}

void ebb_cpu_kvq_ops_avx2(struct ebb_backend *be) {
    be->kv_dot_f16 = dot_f16;
    be->kv_axpy_f16 = axpy_f16;
    be->kv_dot_q8 = dot_q8;
    be->kv_axpy_q8 = axpy_q8;
    be->kv_dot_q4 = dot_q4;
    be->kv_axpy_q4 = axpy_q4;
}
