/* The steps between the products, one portable version for every CPU path:
 * each is a memory walk (a gather, a row lookup, RoPE's four products per
 * pair) that the compiler vectorises as far as it pays, and each is exact,
 * so the paths share it rather than repeat it per instruction set. The CUDA
 * backend repeats the same arithmetic (kernels/cuda/hostdev.h). */
#include "kernels/cpu/ops.h"

#include <string.h>

#include "kernels/formats.h"

void ebb_cpu_get_rows(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n)
{
    const struct ebb_type_info *ti = ebb_type_info(type);
    const size_t row = ebb_row_bytes(type, (uint64_t)n);
    for (int r = 0; r < n_rows; r++)
        ti->to_f32((const uint8_t *)table + (size_t)ids[r] * row, out + (size_t)r * n, (size_t)n);
}

void ebb_cpu_permute(float *out, const float *x, const int32_t *perm, int n_tok, int n)
{
    for (int t = 0; t < n_tok; t++) {
        const float *src = x + (size_t)t * n;
        float *dst = out + (size_t)t * n;
        for (int i = 0; i < n; i++) dst[i] = src[perm[i]];
    }
}

void ebb_cpu_rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                  const float *cos, const float *sin)
{
    const int half = rope_dim / 2;
    for (int t = 0; t < n_tok; t++) {
        const float *c = cos + (size_t)t * half, *s = sin + (size_t)t * half;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (size_t)t * stride + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * c[i] - x1 * s[i];
                v[b] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

void ebb_cpu_scale(float *out, const float *x, float s, int n)
{
    for (int i = 0; i < n; i++) out[i] = x[i] * s;
}

#define F16_MAX 65504.0f

void ebb_cpu_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{
    if (bits == 32) {
        memcpy(row, x, (size_t)n * sizeof(float));
        return;
    }
    if (bits == 16) {
        uint16_t *h = (uint16_t *)(void *)row;
        for (int i = 0; i < n; i++) h[i] = ebb_f32_to_f16(x[i] > F16_MAX ? F16_MAX : x[i] < -F16_MAX ? -F16_MAX : x[i]);
        return;
    }
    uint16_t *dm = (uint16_t *)(void *)(row + (size_t)n * bits / 8);
    if (!rotate) {
        ebb_kvq_quantize_row(bits, x, n, group, row, dm);
        return;
    }
    float block[64];   /* rotation implies groups of 64 */
    for (int g = 0; g < n / 64; g++) {
        memcpy(block, x + 64 * g, sizeof block);
        ebb_cpu_hadamard64_scalar(block, 64);
        ebb_kvq_quantize_row(bits, block, 64, 64, row + (size_t)g * 8 * bits, dm + 2 * g);
    }
}
