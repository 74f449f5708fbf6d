/* The native GGUF types' products, scalar reference: one weight row, stored
 * as the file stores it, times one token's activations quantized to 8 bits.
 *
 * This file is the definition every other path (AVX2, AVX-512, CUDA) must
 * reproduce bit for bit. The integer sums are exact, so only the float steps
 * need agreeing on, and each type's are written out once in native.h; here
 * they are plain C in the order stated there. The weight values a product
 * uses are exactly those kernels/formats.c decodes (tested against it).
 *
 * Layouts are read byte by byte at their documented offsets (formats.c),
 * never by overlaying structs on mapped bytes, so any alignment is safe.
 */
#include "kernels/cpu/native.h"
#include "kernels/cpu/ops.h"

#include <math.h>
#include <string.h>

#include "kernels/formats.h"

static float f16(const uint8_t *p) { return ebb_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }
static uint32_t u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* ------------------------------------------------------- activation forms */

/* The act_inverse() rule of ops.h over n values. */
static float block_scale(const float *x, int n, float qmax, float *inv)
{
    float amax = 0, d;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    *inv = act_inverse(amax, qmax, &d);
    return d;
}

void ebb_native_quantize_q8b32_scalar(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *s)
{
    for (int b = 0; b < n / EBB_NATIVE_QK; b++, x += EBB_NATIVE_QK, q += EBB_NATIVE_QK) {
        float inv;
        d[b] = block_scale(x, EBB_NATIVE_QK, b < n_hi ? 127.0f : 7.0f, &inv);
        int sum = 0;
        for (int i = 0; i < EBB_NATIVE_QK; i++) sum += q[i] = (int8_t)roundf(x[i] * inv);
        s[b] = (int16_t)sum;
    }
}

void ebb_native_quantize_q8k_scalar(const float *x, int n, int8_t *q, float *d, int16_t *bsums)
{
    for (int b = 0; b < n / EBB_NATIVE_QK_K; b++, x += EBB_NATIVE_QK_K, q += EBB_NATIVE_QK_K) {
        float inv;
        d[b] = block_scale(x, EBB_NATIVE_QK_K, 127.0f, &inv);
        for (int g = 0; g < EBB_NATIVE_QK_K / 16; g++) {
            int sum = 0;
            for (int i = 16 * g; i < 16 * g + 16; i++) sum += q[i] = (int8_t)roundf(x[i] * inv);
            *bsums++ = (int16_t)sum;
        }
    }
}

/* ------------------------------------------------------ legacy block types */

/* A block's 32 codes, unpacked: value j < 16 in the low nibble of byte j,
 * value 16 + j in its high nibble; the fifth bit, where there is one, is bit
 * j of qh. */
static void unpack4(const uint8_t *qs, int v[32])
{
    for (int j = 0; j < 16; j++) {
        v[j] = qs[j] & 0x0f;
        v[j + 16] = qs[j] >> 4;
    }
}

static void unpack5(const uint8_t *qs, uint32_t qh, int v[32])
{
    unpack4(qs, v);
    for (int j = 0; j < 32; j++) v[j] |= (int)((qh >> j) & 1u) << 4;
}

static int32_t idot32(const int v[32], int offset, const int8_t *a)
{
    int32_t sum = 0;
    for (int j = 0; j < 32; j++) sum += (v[j] - offset) * a[j];
    return sum;
}

float ebb_native_dot_q4_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    int v[32];
    for (int b = 0; b < n / 32; b++, w += 18) {
        unpack4(w + 2, v);
        acc = fmaf((float)idot32(v, 8, a->q + 32 * b), f16(w) * a->d[b], acc);
    }
    return acc;
}

float ebb_native_dot_q5_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    int v[32];
    for (int b = 0; b < n / 32; b++, w += 22) {
        unpack5(w + 6, u32(w + 2), v);
        acc = fmaf((float)idot32(v, 16, a->q + 32 * b), f16(w) * a->d[b], acc);
    }
    return acc;
}

float ebb_native_dot_q8_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    for (int b = 0; b < n / 32; b++, w += 34) {
        const int8_t *qs = (const int8_t *)(w + 2), *q = a->q + 32 * b;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += qs[j] * q[j];
        acc = fmaf((float)sum, f16(w) * a->d[b], acc);
    }
    return acc;
}

float ebb_native_dot_q4_1_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    int v[32];
    for (int b = 0; b < n / 32; b++, w += 20) {
        unpack4(w + 4, v);
        acc = fmaf((float)idot32(v, 0, a->q + 32 * b), f16(w) * a->d[b], acc);
        acc = fmaf((float)a->sums[b], f16(w + 2) * a->d[b], acc);
    }
    return acc;
}

/* W2G64: each 64-value block meets two activation blocks, each in Q4_1's
 * steps with the block's one (d, m). */
float ebb_native_dot_w2g64_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    for (int g = 0; g < n / 64; g++, w += 20) {
        const float d = f16(w), m = f16(w + 2);
        for (int h = 0; h < 2; h++) {
            const int b = 2 * g + h;
            const int8_t *q = a->q + 32 * b;
            int32_t isum = 0;
            for (int j = 0; j < 16; j++) {
                isum += ((w[4 + j] >> (4 * h)) & 3) * q[j];
                isum += ((w[4 + j] >> (4 * h + 2)) & 3) * q[16 + j];
            }
            acc = fmaf((float)isum, d * a->d[b], acc);
            acc = fmaf((float)a->sums[b], m * a->d[b], acc);
        }
    }
    return acc;
}

float ebb_native_dot_q5_1_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    int v[32];
    for (int b = 0; b < n / 32; b++, w += 24) {
        unpack5(w + 8, u32(w + 4), v);
        acc = fmaf((float)idot32(v, 0, a->q + 32 * b), f16(w) * a->d[b], acc);
        acc = fmaf((float)a->sums[b], f16(w + 2) * a->d[b], acc);
    }
    return acc;
}

/* --------------------------------------------------------------- K-quants */

/* Q4_K and Q5_K: eight sub-blocks of 32 (per 64 values, the low nibbles of
 * 32 bytes then their high nibbles; Q5_K adds bit `2 * pair (+ 1)` of qh[l]). */
static float dot_q45_k(const uint8_t *w, const struct ebb_native_act *a, int n, int five)
{
    const size_t bytes = five ? 176 : 144;
    float acc = 0;
    for (int b = 0; b < n / 256; b++, w += bytes) {
        const uint8_t *scales = w + 4, *qh = w + 16, *qs = w + (five ? 48 : 16);
        const int8_t *q = a->q + 256 * b;
        const int16_t *bs = a->sums + 16 * b;
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {
            int sc, m;
            ebb_k4_scale_min(scales, j, &sc, &m);
            const uint8_t *nib = qs + 32 * (j / 2);
            const int shift = (j & 1) * 4;
            int32_t isum = 0;
            for (int l = 0; l < 32; l++) {
                int v = (nib[l] >> shift) & 0x0f;
                if (five) v |= ((qh[l] >> j) & 1) << 4;
                isum += v * q[32 * j + l];
            }
            sumi += sc * isum;
            summ += m * (bs[2 * j] + bs[2 * j + 1]);
        }
        acc = fmaf((float)sumi, f16(w) * a->d[b], acc);
        acc = fmaf(-(float)summ, f16(w + 2) * a->d[b], acc);
    }
    return acc;
}

float ebb_native_dot_q4_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    return dot_q45_k(w, a, n, 0);
}

float ebb_native_dot_q5_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    return dot_q45_k(w, a, n, 1);
}

/* Q6_K: per 128 values, ql (64 bytes) and qh (32 bytes) make four runs of 32;
 * sub-block (16 values) j has the int8 scale sc[j]. */
float ebb_native_dot_q6_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    for (int b = 0; b < n / 256; b++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        const int8_t *q = a->q + 256 * b;
        int32_t sumi = 0;
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = w + 64 * half, *qh = w + 128 + 32 * half;
            for (int run = 0; run < 4; run++) {         /* values 128*half + 32*run + l */
                int32_t isum[2] = {0, 0};
                for (int l = 0; l < 32; l++) {
                    const int low = run & 1 ? ql[l + 32] : ql[l];
                    const int v = ((run < 2 ? low & 0x0f : low >> 4) | (((qh[l] >> (2 * run)) & 3) << 4)) - 32;
                    isum[l / 16] += v * q[128 * half + 32 * run + l];
                }
                const int j = 8 * half + 2 * run;
                sumi += sc[j] * isum[0] + sc[j + 1] * isum[1];
            }
        }
        acc = fmaf((float)sumi, f16(w + 208) * a->d[b], acc);
    }
    return acc;
}

/* Q2_K: 16 sub-blocks of 16; scales[j]: low nibble scale, high nibble min;
 * per 128 values, 32 bytes of 2-bit codes at shifts 0, 2, 4, 6 make four
 * runs of 32 (two sub-blocks each). */
float ebb_native_dot_q2_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    for (int b = 0; b < n / 256; b++, w += 84) {
        const uint8_t *scales = w, *qs = w + 16;
        const int8_t *q = a->q + 256 * b;
        const int16_t *bs = a->sums + 16 * b;
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 16; j++) summ += (scales[j] >> 4) * bs[j];
        for (int half = 0; half < 2; half++)
            for (int run = 0; run < 4; run++)
                for (int sub = 0; sub < 2; sub++) {
                    const int j = 8 * half + 2 * run + sub;
                    int32_t isum = 0;
                    for (int l = 16 * sub; l < 16 * sub + 16; l++)
                        isum += ((qs[32 * half + l] >> (2 * run)) & 3) * q[128 * half + 32 * run + l];
                    sumi += (scales[j] & 0x0f) * isum;
                }
        acc = fmaf((float)sumi, f16(w + 80) * a->d[b], acc);
        acc = fmaf(-(float)summ, f16(w + 82) * a->d[b], acc);
    }
    return acc;
}

/* Q3_K: codes as Q2_K's (32 bytes per 128 values, shifts 0..6), a CLEAR bit
 * of the high mask (bit `4 * half + run` of hmask[l]) subtracts 4. */
float ebb_native_dot_q3_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n)
{
    float acc = 0;
    for (int b = 0; b < n / 256; b++, w += 110) {
        const uint8_t *hmask = w, *qs = w + 32;
        const int8_t *q = a->q + 256 * b;
        int sc[16];
        ebb_q3_k_scales(w + 96, sc);
        int32_t sumi = 0;
        for (int half = 0; half < 2; half++)
            for (int run = 0; run < 4; run++)
                for (int sub = 0; sub < 2; sub++) {
                    const int j = 8 * half + 2 * run + sub, bit = 4 * half + run;
                    int32_t isum = 0;
                    for (int l = 16 * sub; l < 16 * sub + 16; l++) {
                        int v = (qs[32 * half + l] >> (2 * run)) & 3;
                        if (!((hmask[l] >> bit) & 1)) v -= 4;
                        isum += v * q[128 * half + 32 * run + l];
                    }
                    sumi += sc[j] * isum;
                }
        acc = fmaf((float)sumi, f16(w + 108) * a->d[b], acc);
    }
    return acc;
}

/* ------------------------------------------------------------ rectangles */

static void block_of(ebb_native_dot_fn dot, int k_quant, const struct ebb_native_matmul_args *a, int t0, int t1,
                     int o0, int o1)
{
    const int n = a->n_in, per_d = k_quant ? EBB_NATIVE_QK_K : EBB_NATIVE_QK, per_sum = k_quant ? 16 : 32;
    for (int t = t0; t < t1; t++) {
        const struct ebb_native_act act = {a->q + (size_t)t * n, a->d + (size_t)t * (n / per_d),
                                           a->sums + (size_t)t * (n / per_sum)};
        for (int o = o0; o < o1; o++)
            a->out[(size_t)t * a->n_out + o] = dot(a->w + (size_t)o * a->row_bytes, &act, n);
    }
}

#define NATIVE_BLOCK(type, k_quant) \
    void ebb_native_block_##type##_scalar(const struct ebb_native_matmul_args *a, int t0, int t1, int o0, int o1) \
    { \
        block_of(ebb_native_dot_##type##_scalar, k_quant, a, t0, t1, o0, o1); \
    }
NATIVE_BLOCK(q4_0, 0)
NATIVE_BLOCK(q4_1, 0)
NATIVE_BLOCK(q5_0, 0)
NATIVE_BLOCK(q5_1, 0)
NATIVE_BLOCK(q8_0, 0)
NATIVE_BLOCK(q2_k, 1)
NATIVE_BLOCK(q3_k, 1)
NATIVE_BLOCK(q4_k, 1)
NATIVE_BLOCK(q5_k, 1)
NATIVE_BLOCK(q6_k, 1)
NATIVE_BLOCK(w2g64, 0)
