/* Attention and KV-row ops, portable C: the definition the SIMD versions
 * repeat bit for bit (backend.h spells the arithmetic out), and the path for
 * quantization groups smaller than 64. The AVX-512 path uses the AVX2 ones.
 */
#include "kernels/cpu/ops.h"

#include <math.h>

#include "kernels/formats.h"

static const uint8_t *row_bytes(const void *base, size_t stride, int r) {
    return (const uint8_t *)base + (size_t)r * stride;
}

/* backend.h's dot8: eight fma chains, then a fixed pairwise tree. */
static float dot8(const float *a, const float *b, int n) {
    float l[8] = {0};
    for (int i = 0; i < n; i++) l[i % 8] = fmaf(a[i], b[i], l[i % 8]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

void ebb_cpu_attn_scores_scalar(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                   size_t k_stride, int n_rows, int n) {
    for (int j = 0; j < n_q; j++)
        for (int r = 0; r < n_rows; r++) s[(size_t)j * s_stride + r] = dot8(q + (size_t)j * q_stride, k + (size_t)r * k_stride, n);
}

void ebb_cpu_attn_values_scalar(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++)
        for (int i = 0; i < n; i++) y[i] = fmaf(p[r], v[(size_t)r * v_stride + i], y[i]);
}

void ebb_cpu_kv_rows_f16_scalar(float *out, const uint16_t *rows, size_t stride, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        const uint16_t *row = (const uint16_t *)(const void *)row_bytes(rows, stride, r);
        for (int i = 0; i < n; i++) out[(size_t)r * n + i] = ebb_f16_to_f32(row[i]);
    }
}

/* Code i of a group (bits 8, 4 or 2; the packing rule of kernels/formats.h:
 * byte i % B at shift bits * (i / B), B = group * bits / 8). */
static int code_at(const uint8_t *c, int bits, int group, int i) {
    const int B = group * bits / 8;
    return (c[i % B] >> (bits * (i / B))) & ((1 << bits) - 1);
}

void ebb_cpu_kv_rows_q_scalar(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                              int bits, int group) {
    const int group_bytes = group * bits / 8;
    for (int r = 0; r < n_rows; r++) {
        const uint8_t *c = row_bytes(codes, stride, r);
        const uint16_t *p = (const uint16_t *)(const void *)row_bytes(dm, stride, r);
        for (int g = 0; g < n / group; g++) {
            const float d = ebb_f16_to_f32(p[2 * g]), m = ebb_f16_to_f32(p[2 * g + 1]);
            for (int i = 0; i < group; i++)
                out[(size_t)r * n + g * group + i] = fmaf(d, (float)code_at(c + g * group_bytes, bits, group, i), m);
        }
    }
}

void ebb_cpu_kv_rows_qc_scalar(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                               int bits, int group) {
    const int group_bytes = group * bits / 8;
    for (int r = 0; r < n_rows; r++) {
        const uint8_t *c = row_bytes(codes, stride, r);
        for (int i = 0; i < n; i++)
            out[(size_t)r * n + i] = fmaf(ebb_f16_to_f32(dm[2 * i]),
                                          (float)code_at(c + (i / group) * group_bytes, bits, group, i % group),
                                          ebb_f16_to_f32(dm[2 * i + 1]));
    }
}
