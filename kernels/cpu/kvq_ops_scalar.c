/* KV-cache row ops, portable C: the reference the SIMD versions are tested
 * against, and the path for groups smaller than 64.
 *
 * A quantized value is m + d * code, so a dot product with x splits into
 * d * (x . codes) + m * sum(x) per group, and a weighted sum of rows adds
 * (w * d) * codes to y plus, once per group at the end, sum_r w_r * m_r to
 * every value of the group. Both keep the inner loops on the integer codes.
 */
#include "kernels/cpu/kvq_ops.h"

#include "kernels/formats.h"

static const uint8_t *row_bytes(const void *base, size_t stride, int r) {
    return (const uint8_t *)base + (size_t)r * stride;
}

static const uint16_t *row_dm(const uint16_t *dm, size_t stride, int r) {
    return (const uint16_t *)(const void *)row_bytes(dm, stride, r);
}

static void dot_f16(float *out, const float *x, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = row_dm(rows, stride, r);
        float s = 0;
        for (int i = 0; i < n; i++) s += x[i] * ebb_f16_to_f32(row[i]);
        out[r] = s;
    }
}

static void axpy_f16(float *y, const float *w, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = row_dm(rows, stride, r);
        for (int i = 0; i < n; i++) y[i] += w[r] * ebb_f16_to_f32(row[i]);
    }
}

/* Code i of a group (bits 8 or 4, nibble layout in backend.h). */
static int code_at(const uint8_t *c, int bits, int group, int i) {
    if (bits == 8) return c[i];
    int half = group / 2;
    return i < half ? c[i] & 15 : c[i - half] >> 4;
}

static void dot_q(int bits, float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                  int n_rows, int n, int group) {
    const int n_groups = n / group, group_bytes = group * bits / 8;
    for (int r = 0; r < n_rows; r++) {
        const uint8_t *c = row_bytes(codes, stride, r);
        const uint16_t *p = row_dm(dm, stride, r);
        float acc = 0;
        for (int g = 0; g < n_groups; g++) {
            const float *xg = x + g * group;
            const uint8_t *cg = c + g * group_bytes;
            float sc = 0, sx = 0;
            for (int i = 0; i < group; i++) {
                sc += xg[i] * (float)code_at(cg, bits, group, i);
                sx += xg[i];
            }
            acc += ebb_f16_to_f32(p[2 * g]) * sc + ebb_f16_to_f32(p[2 * g + 1]) * sx;
        }
        out[r] = acc;
    }
}

static void axpy_q(int bits, float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                   int n_rows, int n, int group) {
    const int n_groups = n / group, group_bytes = group * bits / 8;
    for (int g = 0; g < n_groups; g++) {
        float *yg = y + g * group;
        float msum = 0;
        for (int r = 0; r < n_rows; r++) {
            const uint8_t *cg = row_bytes(codes, stride, r) + g * group_bytes;
            const uint16_t *p = row_dm(dm, stride, r);
            float a = w[r] * ebb_f16_to_f32(p[2 * g]);
            msum += w[r] * ebb_f16_to_f32(p[2 * g + 1]);
            for (int i = 0; i < group; i++) yg[i] += a * (float)code_at(cg, bits, group, i);
        }
        for (int i = 0; i < group; i++) yg[i] += msum;
    }
}

void ebb_kv_dot_q8_scalar(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                          int n_rows, int n, int group) {
    dot_q(8, out, x, codes, dm, stride, n_rows, n, group);
}

void ebb_kv_axpy_q8_scalar(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                           int n_rows, int n, int group) {
    axpy_q(8, y, w, codes, dm, stride, n_rows, n, group);
}

void ebb_kv_dot_q4_scalar(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                          int n_rows, int n, int group) {
    dot_q(4, out, x, codes, dm, stride, n_rows, n, group);
}

void ebb_kv_axpy_q4_scalar(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                           int n_rows, int n, int group) {
    axpy_q(4, y, w, codes, dm, stride, n_rows, n, group);
}

void ebb_cpu_kvq_ops_scalar(struct ebb_backend *be) {
    be->kv_dot_f16 = dot_f16;
    be->kv_axpy_f16 = axpy_f16;
    be->kv_dot_q8 = ebb_kv_dot_q8_scalar;
    be->kv_axpy_q8 = ebb_kv_axpy_q8_scalar;
    be->kv_dot_q4 = ebb_kv_dot_q4_scalar;
    be->kv_axpy_q4 = ebb_kv_axpy_q4_scalar;
}
