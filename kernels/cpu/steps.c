/* The steps between the products, one portable version for every CPU path:
 * each is a memory walk (a gather, a row lookup, RoPE's four products per
 * pair) that the compiler vectorises as far as it pays, and each is exact,
 * so the paths share it rather than repeat it per instruction set. The CUDA
 * backend repeats the same arithmetic (kernels/cuda/hostdev.h). */
#include "kernels/cpu/ops.h"

#include <math.h>
#include <string.h>

#include "kernels/cpu/native.h"
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

void ebb_cpu_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{
    if (bits == 32) {
        memcpy(row, x, (size_t)n * sizeof(float));
        return;
    }
    if (bits == 16) {
        uint16_t *h = (uint16_t *)(void *)row;
        for (int i = 0; i < n; i++) h[i] = ebb_f32_to_f16(ebb_f16_saturate(x[i]));
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

/* The k-th largest of v[0..n) (k in [1, n]), reordering v (quickselect). */
static float kth_largest(float *v, int n, int k)
{
    int lo = 0, hi = n - 1;
    const int want = k - 1;
    while (lo < hi) {
        const float pivot = v[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                const float t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return v[want];
}

static float block_amax(const float *x)
{
    float m = 0;
    for (int i = 0; i < EBB_ACT_BLOCK; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

/* backend.h's rule by a threshold: the n_hi-th largest block amplitude,
 * every block above it and the first ties at it 8-bit. Outliers move from
 * token to token; a choice fixed per activation point spends 8 bits on
 * blocks that are loud on average. Rows of more than LOUDEST_BLOCKS blocks
 * (no model has one) take the rule's definition instead, block by block. */
#define LOUDEST_BLOCKS 2048

void ebb_cpu_quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    const int blocks = n / EBB_ACT_BLOCK;
    float amax[LOUDEST_BLOCKS], sorted[LOUDEST_BLOCKS];
    if (blocks > LOUDEST_BLOCKS) {
        for (int b = 0; b < blocks; b++) {
            const float mine = block_amax(x + b * EBB_ACT_BLOCK);
            int rank = 0;
            for (int i = 0; i < blocks && rank < n_hi; i++) {
                const float other = block_amax(x + i * EBB_ACT_BLOCK);
                rank += other > mine || (other == mine && i < b);
            }
            ebb_native_quantize_q8b32_scalar(x + b * EBB_ACT_BLOCK, EBB_ACT_BLOCK, rank < n_hi,
                                             q + b * EBB_ACT_BLOCK, d + b, sums + b);
        }
        return;
    }
    for (int b = 0; b < blocks; b++) amax[b] = sorted[b] = block_amax(x + b * EBB_ACT_BLOCK);
    if (n_hi > blocks) n_hi = blocks;
    const float threshold = n_hi > 0 ? kth_largest(sorted, blocks, n_hi) : INFINITY;
    int above = 0;
    for (int b = 0; b < blocks; b++) above += amax[b] > threshold;
    int ties = n_hi - above;   /* blocks equal to the threshold that still get 8 bits, lowest index first */
    for (int b = 0; b < blocks; b++) {
        const int hi = amax[b] > threshold || (amax[b] == threshold && ties-- > 0);
        ebb_native_quantize_q8b32_scalar(x + b * EBB_ACT_BLOCK, EBB_ACT_BLOCK, hi, q + b * EBB_ACT_BLOCK, d + b,
                                         sums + b);
    }
}
