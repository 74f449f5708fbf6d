/* The CUDA kernels' arithmetic, written once for both sides of the bus.
 *
 * Every function here is `__host__ __device__` under nvcc and a plain static
 * inline function under the C compiler, so the same source lines run inside
 * the GPU kernels (kernels/cuda/backend_cuda.cu) and in the CPU test suite
 * (tests/unit/test_cuda_math.c), which holds them bit for bit against the
 * scalar CPU path on every build, with or without a GPU. A GPU kernel then
 * adds only the thread layout: which thread computes which element, block
 * or row, never a new formula. That is how the CUDA path keeps the op table's
 * contracts (kernels/backend.h) on machines that have never seen a GPU.
 *
 * What is written here is the definition in kernels/backend.h and
 * kernels/cpu/native.h, restated per element: the integer sums of a block
 * (exact in any order, so lanes may split them) and the float steps that fold
 * them into a row's output (one chain, in block order, which a kernel runs on
 * one lane). Nothing here reads a struct overlaid on weight bytes: fields are
 * read at their documented offsets (kernels/formats.h), so any alignment works.
 *
 * nvcc must not contract a * b + c into an FMA where the CPU path rounds
 * twice: the CUDA sources are compiled with --fmad=false, and every fused
 * step the contracts name is spelled fmaf() here.
 */
#ifndef EBB_KERNELS_CUDA_HOSTDEV_H
#define EBB_KERNELS_CUDA_HOSTDEV_H
#include <stddef.h>
#include <stdint.h>
#ifndef __CUDACC__
#include <math.h>
#endif

#include "kernels/backend.h"
#include "kernels/formats.h"

#ifdef __CUDACC__
#define EBB_HD static __host__ __device__ __forceinline__
#else
#define EBB_HD static inline
#endif

/* ------------------------------------------------------------ scalars */

EBB_HD uint32_t ebb_hd_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
EBB_HD uint32_t ebb_hd_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

EBB_HD float ebb_hd_bits_f32(uint32_t u)
{
    union { uint32_t u; float f; } v;
    v.u = u;
    return v.f;
}

/* IEEE half to float, exactly (ebb_f16_to_f32's rule: subnormals scaled,
 * infinities and NaN payloads kept). */
EBB_HD float ebb_hd_f16(uint32_t h)
{
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return ebb_hd_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return ebb_hd_bits_f32(sign);
        const float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return ebb_hd_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

EBB_HD float ebb_hd_f16_at(const uint8_t *p) { return ebb_hd_f16(ebb_hd_u16(p)); }

/* ---------------------------------------------------- activation codes */

/* kernels/cpu/ops.h's act_inverse: scale = amax / qmax; the inverse qmax /
 * amax, 0 for a zero scale, capped at FLT_MAX. */
EBB_HD float ebb_hd_act_inverse(float amax, float qmax, float *scale)
{
    *scale = amax / qmax;
    if (*scale == 0) return 0;
    const float inv = qmax / amax;
    return inv < 3.40282347e38f ? inv : 3.40282347e38f;
}

/* One value's code: round(x * inv), halves away from zero. */
EBB_HD int ebb_hd_code(float x, float inv) { return (int)roundf(x * inv); }

/* A run of len values to codes under one scale (qmax 7 or 127): the scale
 * into *scale, the code sum returned (the Q8B32 block sum; ignored where the
 * form has none). */
EBB_HD int ebb_hd_quantize_run(const float *x, int len, float qmax, int8_t *q, float *scale)
{
    float amax = 0;
    for (int i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float inv = ebb_hd_act_inverse(amax, qmax, scale);
    int sum = 0;
    for (int i = 0; i < len; i++) sum += q[i] = (int8_t)ebb_hd_code(x[i], inv);
    return sum;
}

/* Q8K's super-block of 256: one scale (qmax 127), codes, the sum of every 16. */
EBB_HD void ebb_hd_quantize_q8k_block(const float *x, int8_t *q, float *scale, int16_t *sums16)
{
    float amax = 0;
    for (int i = 0; i < 256; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float inv = ebb_hd_act_inverse(amax, 127.0f, scale);
    for (int g = 0; g < 16; g++) {
        int sum = 0;
        for (int i = 16 * g; i < 16 * g + 16; i++) sum += q[i] = (int8_t)ebb_hd_code(x[i], inv);
        sums16[g] = (int16_t)sum;
    }
}

/* quantize_act's group g of a token with `groups` groups: the first n_hi
 * (clamped to [0, groups]) at 8 bits, the rest at 4. */
EBB_HD float ebb_hd_act_qmax(int g, int groups, int n_hi)
{
    if (n_hi < 0) n_hi = 0;
    if (n_hi > groups) n_hi = groups;
    return g < n_hi ? 127.0f : 7.0f;
}

/* A block's loudness (the largest |x|; NaN ignored) and whether block b of
 * `blocks` is among the n_hi loudest, ties to the lower index (backend.h's
 * quantize_q8b32_loudest): its rank below n_hi. */
EBB_HD float ebb_hd_block_amax(const float *x, int n)
{
    float m = 0;
    for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

EBB_HD int ebb_hd_is_loud(const float *amax, int blocks, int n_hi, int b)
{
    int rank = 0;
    for (int i = 0; i < blocks; i++) rank += amax[i] > amax[b] || (amax[i] == amax[b] && i < b);
    return rank < n_hi;
}

/* ---------------------------------------------------------- the rotation */

/* backend.h's hadamard64 on one block of 64, in place: stages h = 1 .. 32,
 * pairs (j, j + h) to (a + b, a - b), then the 1/8. */
EBB_HD void ebb_hd_hadamard64(float *x)
{
    for (int h = 1; h < 64; h <<= 1)
        for (int i = 0; i < 64; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                const float u = x[j], v = x[j + h];
                x[j] = u + v;
                x[j + h] = u - v;
            }
    for (int j = 0; j < 64; j++) x[j] *= 0.125f;
}

/* ---------------------------------------------------- weight products
 *
 * A row of a weight type is a sequence of blocks; block b's contribution is
 * a pair of exact integers (ints) and a float step that folds them into the
 * running output (step). A row's output is
 *     acc = 0; for b in order: acc = step(acc, ints(b))
 * and a kernel may compute the ints of many blocks at once on many lanes,
 * as long as one lane applies the steps in order. */

/* One token's activations in the form of the weight type (backend.h's
 * struct ebb_act, cut to one token): codes, the scale of each block (64 for
 * W4G64, 32 for the legacy types, 256 for the K-quants), code sums (per 32 or
 * per 16) where the form has them. */
struct ebb_hd_act {
    const int8_t *q;
    const float *d;
    const int16_t *sums;
};

struct ebb_hd_ints {
    int32_t a, b;
};

/* The types these functions multiply, and their blocks. */
EBB_HD int ebb_hd_type_has_product(int type)
{
    switch (type) {
    case EBB_TYPE_W4G64: case EBB_TYPE_Q4_0: case EBB_TYPE_Q4_1: case EBB_TYPE_Q5_0: case EBB_TYPE_Q5_1:
    case EBB_TYPE_Q8_0: case EBB_TYPE_Q2_K: case EBB_TYPE_Q3_K: case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K:
    case EBB_TYPE_Q6_K: case EBB_TYPE_W2G64:
        return 1;
    default:
        return 0;
    }
}

EBB_HD int ebb_hd_block_elems(int type)
{
    switch (type) {
    case EBB_TYPE_F32: case EBB_TYPE_F16: case EBB_TYPE_BF16: return 1;
    case EBB_TYPE_W4G64: case EBB_TYPE_W2G64: return 64;
    case EBB_TYPE_Q2_K: case EBB_TYPE_Q3_K: case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K: case EBB_TYPE_Q6_K: return 256;
    default: return 32;
    }
}

EBB_HD int ebb_hd_block_bytes(int type)
{
    switch (type) {
    case EBB_TYPE_F32: return 4;
    case EBB_TYPE_F16: case EBB_TYPE_BF16: return 2;
    case EBB_TYPE_W4G64: return 34;
    case EBB_TYPE_W2G64: return 20;
    case EBB_TYPE_Q4_0: return 18;
    case EBB_TYPE_Q4_1: return 20;
    case EBB_TYPE_Q5_0: return 22;
    case EBB_TYPE_Q5_1: return 24;
    case EBB_TYPE_Q8_0: return 34;
    case EBB_TYPE_Q2_K: return 84;
    case EBB_TYPE_Q3_K: return 110;
    case EBB_TYPE_Q4_K: return 144;
    case EBB_TYPE_Q5_K: return 176;
    case EBB_TYPE_Q6_K: return 210;
    default: return 0;
    }
}

/* Activations per code sum in the type's form: 32 (Q8B32), 16 (Q8K), none
 * (W4G64: 0). */
EBB_HD int ebb_hd_sum_elems(int type)
{
    if (type == EBB_TYPE_W4G64) return 0;
    return ebb_hd_block_elems(type) == 256 ? 16 : 32;
}

/* Activations per scale in the type's form: its block, except W2G64's
 * blocks of 64, which read Q8B32 (a scale per 32). */
EBB_HD int ebb_hd_scale_elems(int type) { return type == EBB_TYPE_W2G64 ? 32 : ebb_hd_block_elems(type); }

/* Token t's activations of an n-channel matmul of this type, from the
 * n_tok-row arrays backend.h's struct ebb_act holds. */
EBB_HD struct ebb_hd_act ebb_hd_act_of(int type, const int8_t *q, const float *d, const int16_t *sums, int n, int t)
{
    struct ebb_hd_act a;
    const int per_sum = ebb_hd_sum_elems(type);
    a.q = q + (size_t)t * n;
    a.d = d + (size_t)t * (size_t)(n / ebb_hd_scale_elems(type));
    a.sums = per_sum ? sums + (size_t)t * (size_t)(n / per_sum) : sums;
    return a;
}

/* One byte of a W4G64 block's codes against its two activation codes: the
 * low nibble is value j (against a_lo = q[j]), the high one value 32 + j. */
EBB_HD int32_t ebb_hd_w4g64_byte(int byte, int a_lo, int a_hi)
{
    return ((byte & 0x0f) - 8) * a_lo + ((byte >> 4) - 8) * a_hi;
}

/* The 4- and 5-bit legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1): where the 16
 * code bytes start, the fifth bits, the offset subtracted. Byte j holds
 * value j in its low nibble and value 16 + j in its high one; bits j and
 * 16 + j of qh are their fifth bits. */
struct ebb_hd_nibbles {
    const uint8_t *qs;
    uint32_t qh;
    int five, offset;
};

EBB_HD struct ebb_hd_nibbles ebb_hd_nibbles_of(int type, const uint8_t *block)
{
    struct ebb_hd_nibbles n;
    n.five = type == EBB_TYPE_Q5_0 || type == EBB_TYPE_Q5_1;
    n.offset = type == EBB_TYPE_Q4_0 ? 8 : type == EBB_TYPE_Q5_0 ? 16 : 0;
    const int qh_at = type == EBB_TYPE_Q5_1 ? 4 : 2, has_min = type == EBB_TYPE_Q4_1 || type == EBB_TYPE_Q5_1;
    n.qh = n.five ? ebb_hd_u32(block + qh_at) : 0;
    n.qs = block + 2 + 2 * has_min + 4 * n.five;
    return n;
}

/* Code byte j (< 16) of such a block against its two activation codes,
 * a[j] and a[16 + j] of the block's 32. */
EBB_HD int32_t ebb_hd_nibbles_byte(const struct ebb_hd_nibbles *n, int j, const int8_t *a)
{
    int lo = n->qs[j] & 0x0f, hi = n->qs[j] >> 4;
    if (n->five) {
        lo |= (int)((n->qh >> j) & 1u) << 4;
        hi |= (int)((n->qh >> (j + 16)) & 1u) << 4;
    }
    return (lo - n->offset) * a[j] + (hi - n->offset) * a[j + 16];
}

/* Q4_K/Q5_K's sub-block j scale and min from their 12 bytes (formats.c's
 * ebb_k4_scale_min). */
EBB_HD void ebb_hd_k4_scale_min(const uint8_t *s, int j, int *scale, int *min)
{
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q3_K's sub-block i scale (-32 .. 31) from its 12 bytes (formats.c's
 * ebb_q3_k_scales). */
EBB_HD int ebb_hd_q3_k_scale(const uint8_t *s, int i)
{
    const int lo = i < 8 ? (s[i] & 0x0f) : (s[i - 8] >> 4);
    const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* Q4_K and Q5_K: block b's sumi (scales times sub-block sums) and summ (mins
 * times activation sums of the sub-block's two 16s). */
EBB_HD struct ebb_hd_ints ebb_hd_ints_q45_k(const uint8_t *w, const struct ebb_hd_act *x, int five)
{
    const uint8_t *scales = w + 4, *qh = w + 16, *qs = w + (five ? 48 : 16);
    struct ebb_hd_ints r = {0, 0};
    for (int j = 0; j < 8; j++) {
        int sc, m;
        ebb_hd_k4_scale_min(scales, j, &sc, &m);
        const uint8_t *nib = qs + 32 * (j / 2);
        const int shift = (j & 1) * 4;
        int32_t isum = 0;
        for (int l = 0; l < 32; l++) {
            int v = (nib[l] >> shift) & 0x0f;
            if (five) v |= ((qh[l] >> j) & 1) << 4;
            isum += v * x->q[32 * j + l];
        }
        r.a += sc * isum;
        r.b += m * (x->sums[2 * j] + x->sums[2 * j + 1]);
    }
    return r;
}

EBB_HD int32_t ebb_hd_sumi_q6_k(const uint8_t *w, const int8_t *q)
{
    const int8_t *sc = (const int8_t *)(w + 192);
    int32_t sumi = 0;
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = w + 64 * half, *qh = w + 128 + 32 * half;
        for (int run = 0; run < 4; run++) {
            int32_t isum0 = 0, isum1 = 0;
            for (int l = 0; l < 32; l++) {
                const int low = run & 1 ? ql[l + 32] : ql[l];
                const int v = ((run < 2 ? low & 0x0f : low >> 4) | (((qh[l] >> (2 * run)) & 3) << 4)) - 32;
                if (l < 16) isum0 += v * q[128 * half + 32 * run + l];
                else isum1 += v * q[128 * half + 32 * run + l];
            }
            const int j = 8 * half + 2 * run;
            sumi += sc[j] * isum0 + sc[j + 1] * isum1;
        }
    }
    return sumi;
}

/* Q2_K (hmask NULL) and Q3_K: 2-bit codes, 32 bytes per 128 values at shifts
 * 0, 2, 4, 6; Q3_K subtracts 4 where the high mask bit is clear. scale[j] is
 * the sub-block's scale (Q2_K: low nibble; Q3_K: decoded, signed). */
EBB_HD int32_t ebb_hd_sumi_2bit(const uint8_t *qs, const uint8_t *hmask, const int *scale, const int8_t *q)
{
    int32_t sumi = 0;
    for (int half = 0; half < 2; half++)
        for (int run = 0; run < 4; run++)
            for (int sub = 0; sub < 2; sub++) {
                const int j = 8 * half + 2 * run + sub, bit = 4 * half + run;
                int32_t isum = 0;
                for (int l = 16 * sub; l < 16 * sub + 16; l++) {
                    int v = (qs[32 * half + l] >> (2 * run)) & 3;
                    if (hmask && !((hmask[l] >> bit) & 1)) v -= 4;
                    isum += v * q[128 * half + 32 * run + l];
                }
                sumi += scale[j] * isum;
            }
    return sumi;
}

/* The integers of block b of a row (w_row: the row's first byte). */
EBB_HD struct ebb_hd_ints ebb_hd_block_ints(int type, const uint8_t *w_row, const struct ebb_hd_act *x, int b)
{
    const uint8_t *w = w_row + (size_t)b * (size_t)ebb_hd_block_bytes(type);
    const int8_t *q = x->q + (size_t)b * (size_t)ebb_hd_block_elems(type);
    struct ebb_hd_ints r = {0, 0};
    switch (type) {
    case EBB_TYPE_W4G64:
        for (int j = 0; j < 32; j++) r.a += ebb_hd_w4g64_byte(w[2 + j], q[j], q[j + 32]);
        break;
    case EBB_TYPE_Q4_0: case EBB_TYPE_Q4_1: case EBB_TYPE_Q5_0: case EBB_TYPE_Q5_1: {
        const struct ebb_hd_nibbles n = ebb_hd_nibbles_of(type, w);
        for (int j = 0; j < 16; j++) r.a += ebb_hd_nibbles_byte(&n, j, q);
        break;
    }
    case EBB_TYPE_Q8_0:
        for (int j = 0; j < 32; j++) r.a += (int8_t)w[2 + j] * q[j];
        break;
    case EBB_TYPE_Q2_K: {
        int scale[16];
        for (int j = 0; j < 16; j++) {
            scale[j] = w[j] & 0x0f;
            r.b += (w[j] >> 4) * x->sums[16 * b + j];
        }
        r.a = ebb_hd_sumi_2bit(w + 16, NULL, scale, q);
        break;
    }
    case EBB_TYPE_Q3_K: {
        int scale[16];
        for (int i = 0; i < 16; i++) scale[i] = ebb_hd_q3_k_scale(w + 96, i);
        r.a = ebb_hd_sumi_2bit(w + 32, w, scale, q);
        break;
    }
    case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K: {
        struct ebb_hd_act sub = *x;
        sub.q = q;
        sub.sums = x->sums + 16 * (size_t)b;
        r = ebb_hd_ints_q45_k(w, &sub, type == EBB_TYPE_Q5_K);
        break;
    }
    case EBB_TYPE_Q6_K: r.a = ebb_hd_sumi_q6_k(w, q); break;
    case EBB_TYPE_W2G64:   /* a: the first activation block's sum, b: the second's */
        for (int j = 0; j < 16; j++) {
            r.a += (w[4 + j] & 3) * q[j] + ((w[4 + j] >> 2) & 3) * q[16 + j];
            r.b += ((w[4 + j] >> 4) & 3) * q[32 + j] + (w[4 + j] >> 6) * q[48 + j];
        }
        break;
    default: break;
    }
    return r;
}

/* Folds block b's integers into acc: native.h's float steps (W4G64: ops.h's). */
EBB_HD float ebb_hd_block_step(int type, float acc, const uint8_t *w_row, const struct ebb_hd_act *x, int b,
                               struct ebb_hd_ints r)
{
    const uint8_t *w = w_row + (size_t)b * (size_t)ebb_hd_block_bytes(type);
    const float da = x->d[b];
    switch (type) {
    case EBB_TYPE_W4G64: case EBB_TYPE_Q4_0: case EBB_TYPE_Q5_0: case EBB_TYPE_Q8_0:
        return fmaf((float)r.a, ebb_hd_f16_at(w) * da, acc);
    case EBB_TYPE_Q4_1: case EBB_TYPE_Q5_1:
        acc = fmaf((float)r.a, ebb_hd_f16_at(w) * da, acc);
        return fmaf((float)x->sums[b], ebb_hd_f16_at(w + 2) * da, acc);
    case EBB_TYPE_Q2_K:
        acc = fmaf((float)r.a, ebb_hd_f16_at(w + 80) * da, acc);
        return fmaf(-(float)r.b, ebb_hd_f16_at(w + 82) * da, acc);
    case EBB_TYPE_Q3_K: return fmaf((float)r.a, ebb_hd_f16_at(w + 108) * da, acc);
    case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K:
        acc = fmaf((float)r.a, ebb_hd_f16_at(w) * da, acc);
        return fmaf(-(float)r.b, ebb_hd_f16_at(w + 2) * da, acc);
    case EBB_TYPE_Q6_K: return fmaf((float)r.a, ebb_hd_f16_at(w + 208) * da, acc);
    case EBB_TYPE_W2G64: {   /* two activation blocks, 2b and 2b + 1 */
        const float d = ebb_hd_f16_at(w), m = ebb_hd_f16_at(w + 2), d0 = x->d[2 * b], d1 = x->d[2 * b + 1];
        acc = fmaf((float)r.a, d * d0, acc);
        acc = fmaf((float)x->sums[2 * b], m * d0, acc);
        acc = fmaf((float)r.b, d * d1, acc);
        return fmaf((float)x->sums[2 * b + 1], m * d1, acc);
    }
    default: return acc;
    }
}

/* Decode (a few tokens): a warp reads a row's blocks side by side, each
 * block's code bytes spread over `lanes` lanes (W4G64 and Q8_0: 32, so one
 * block a step; the 4/5-bit legacy types: 16, two blocks a step). Lane
 * `lane` of the step starting at block `base` computes its part of its
 * block's integer sum: the parts of a block's lanes add up to its ints.a. */
/* The types whose exact sums come a block of 32 or 64 inputs at a time:
 * the ones the decode warps below and the tensor-core tiles take. */
#define EBB_HD_TILED_TYPES(X) \
    X(EBB_TYPE_W4G64) X(EBB_TYPE_Q4_0) X(EBB_TYPE_Q4_1) X(EBB_TYPE_Q5_0) X(EBB_TYPE_Q5_1) X(EBB_TYPE_Q8_0)

EBB_HD int ebb_hd_tiled_type(int type)
{
#define EBB_HD_IS_TYPE(t) type == t ||
    return EBB_HD_TILED_TYPES(EBB_HD_IS_TYPE) 0;
#undef EBB_HD_IS_TYPE
}

EBB_HD int ebb_hd_gemv_lanes(int type) { return type == EBB_TYPE_W4G64 || type == EBB_TYPE_Q8_0 ? 32 : 16; }

EBB_HD int32_t ebb_hd_gemv_part(int type, const uint8_t *row, const int8_t *q, int blocks, int base, int lane)
{
    const int lanes = ebb_hd_gemv_lanes(type), b = base + lane / lanes, j = lane % lanes;
    if (b >= blocks) return 0;
    const uint8_t *blk = row + (size_t)b * (size_t)ebb_hd_block_bytes(type);
    const int8_t *a = q + (size_t)b * (size_t)ebb_hd_block_elems(type);
    if (type == EBB_TYPE_W4G64) return ebb_hd_w4g64_byte(blk[2 + j], a[j], a[j + 32]);
    if (type == EBB_TYPE_Q8_0) return (int8_t)blk[2 + j] * a[j];
    const struct ebb_hd_nibbles n = ebb_hd_nibbles_of(type, blk);
    return ebb_hd_nibbles_byte(&n, j, a);
}

/* ------------------------------------------------------- dequantization */

/* Value i of one block of a type (i < ebb_hd_block_elems), the float
 * formats.c's to_f32 gives: the same products in the same order. */
EBB_HD float ebb_hd_dequant(int type, const uint8_t *b, int i)
{
    switch (type) {
    case EBB_TYPE_F32: return ebb_hd_bits_f32(ebb_hd_u32(b));
    case EBB_TYPE_F16: return ebb_hd_f16_at(b);
    case EBB_TYPE_BF16: return ebb_hd_bits_f32(ebb_hd_u16(b) << 16);
    case EBB_TYPE_Q4_0: case EBB_TYPE_W4G64: {
        const int half = type == EBB_TYPE_Q4_0 ? 16 : 32;
        const int q = i < half ? b[2 + i] & 0x0f : b[2 + i - half] >> 4;
        return ebb_hd_f16_at(b) * (float)(q - 8);
    }
    case EBB_TYPE_Q4_1: {
        const int q = i < 16 ? b[4 + i] & 0x0f : b[4 + i - 16] >> 4;
        return ebb_hd_f16_at(b) * (float)q + ebb_hd_f16_at(b + 2);
    }
    case EBB_TYPE_Q5_0: case EBB_TYPE_Q5_1: {
        const int one = type == EBB_TYPE_Q5_1;
        const uint8_t *qs = b + (one ? 8 : 6);
        const uint32_t qh = ebb_hd_u32(b + (one ? 4 : 2));
        const int q = (i < 16 ? qs[i] & 0x0f : qs[i - 16] >> 4) | (int)(((qh >> i) & 1u) << 4);
        return one ? ebb_hd_f16_at(b) * (float)q + ebb_hd_f16_at(b + 2) : ebb_hd_f16_at(b) * (float)(q - 16);
    }
    case EBB_TYPE_Q8_0: return ebb_hd_f16_at(b) * (float)(int8_t)b[2 + i];
    case EBB_TYPE_W2G64:
        return ebb_hd_f16_at(b) * (float)((b[4 + i % 16] >> (2 * (i / 16))) & 3) + ebb_hd_f16_at(b + 2);
    case EBB_TYPE_Q2_K: {
        const int half = i / 128, r = i % 128, run = r / 32, sub = (r % 32) / 16, l = r % 16;
        const int group = 8 * half + 2 * run + sub;
        const float dl = ebb_hd_f16_at(b + 80) * (float)(b[group] & 0x0f);
        const float ml = ebb_hd_f16_at(b + 82) * (float)(b[group] >> 4);
        return dl * (float)((b[16 + 32 * half + 16 * sub + l] >> (2 * run)) & 3) - ml;
    }
    case EBB_TYPE_Q3_K: {
        const int half = i / 128, r = i % 128, run = r / 32, sub = (r % 32) / 16, l = 16 * sub + r % 16;
        const int group = 8 * half + 2 * run + sub, bit = 4 * half + run;
        int q = (b[32 + 32 * half + l] >> (2 * run)) & 3;
        if (!((b[l] >> bit) & 1)) q -= 4;
        return ebb_hd_f16_at(b + 108) * (float)ebb_hd_q3_k_scale(b + 96, group) * (float)q;
    }
    case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K: {
        const int five = type == EBB_TYPE_Q5_K, step = i / 64, high = (i % 64) >= 32, l = i % 32;
        const int j = 2 * step + high;
        int sc, m;
        ebb_hd_k4_scale_min(b + 4, j, &sc, &m);
        const uint8_t *qs = b + (five ? 48 : 16) + 32 * step;
        int q = high ? qs[l] >> 4 : qs[l] & 0x0f;
        if (five) q |= ((b[16 + l] >> j) & 1) << 4;
        const float d = ebb_hd_f16_at(b) * (float)sc, o = ebb_hd_f16_at(b + 2) * (float)m;
        return d * (float)q - o;
    }
    case EBB_TYPE_Q6_K: {
        const int half = i / 128, r = i % 128, run = r / 32, l = r % 32;
        const uint8_t *ql = b + 64 * half, *qh = b + 128 + 32 * half;
        const int8_t *sc = (const int8_t *)(b + 192 + 8 * half);
        const int low = run & 1 ? ql[l + 32] : ql[l];
        const int q = ((run < 2 ? low & 0x0f : low >> 4) | (((qh[l] >> (2 * run)) & 3) << 4)) - 32;
        return ebb_hd_f16_at(b + 208) * (float)sc[l / 16 + 2 * run] * (float)q;
    }
    default: return 0;
    }
}

/* Value i of a row of a type. */
EBB_HD float ebb_hd_row_value(int type, const uint8_t *row, int i)
{
    const int elems = ebb_hd_block_elems(type);
    return ebb_hd_dequant(type, row + (size_t)(i / elems) * (size_t)ebb_hd_block_bytes(type), i % elems);
}

/* ------------------------------------------------------------------- RoPE */

/* Pair i of a head turned by (c, s): backend.h's rope_f32, one pair. */
EBB_HD void ebb_hd_rope_pair(float *head, int i, int half, int neox, float c, float s)
{
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = head[a], x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x0 * s + x1 * c;
}

/* -------------------------------------------------------------- attention */

/* backend.h's dot8: eight fma chains over i = k, k + 8, ..., then a fixed tree. */
EBB_HD float ebb_hd_dot8(const float *a, const float *b, int n)
{
    /* lane indices constant after unrolling, so the lanes stay in registers */
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) l[k] = fmaf(a[i + k], b[i + k], l[k]);
    for (int k = 0; k < 8; k++)
        if (i + k < n) l[k] = fmaf(a[i + k], b[i + k], l[k]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* Code i of a KV group (bits 8, 4 or 2; formats.h's packing: byte i % B at
 * shift bits * (i / B), B = group * bits / 8). */
EBB_HD int ebb_hd_kv_code(const uint8_t *group_codes, int bits, int group, int i)
{
    const int B = group * bits / 8;
    return (group_codes[i % B] >> (bits * (i / B))) & ((1 << bits) - 1);
}

/* Value i of a KV8/KV4/KV2 row: codes and (d, m) pairs of the row (read
 * byte by byte: a row's pairs need not be 2-byte aligned). */
EBB_HD float ebb_hd_kv_value(const uint8_t *codes, const void *dm, int bits, int group, int i)
{
    const int g = i / group;
    const int code = ebb_hd_kv_code(codes + (size_t)g * (size_t)(group * bits / 8), bits, group, i % group);
    const uint8_t *pair = (const uint8_t *)dm + 4 * (size_t)g;
    return fmaf(ebb_hd_f16_at(pair), (float)code, ebb_hd_f16_at(pair + 2));
}

/* Value i of a row of per-channel codes: the channel's own (d, m). */
EBB_HD float ebb_hd_kv_value_channel(const uint8_t *codes, const void *dm, int bits, int group, int i)
{
    const int code = ebb_hd_kv_code(codes + (size_t)(i / group) * (size_t)(group * bits / 8), bits, group, i % group);
    const uint8_t *pair = (const uint8_t *)dm + 4 * (size_t)i;
    return fmaf(ebb_hd_f16_at(pair), (float)code, ebb_hd_f16_at(pair + 2));
}

/* ebb_f32_to_f16's rule: round to nearest even, overflow to infinity,
 * subnormal halves rounded by the FPU (its default mode is nearest even). */
EBB_HD uint32_t ebb_hd_f32_bits(float f)
{
    union { float f; uint32_t u; } v;
    v.f = f;
    return v.u;
}

EBB_HD uint16_t ebb_hd_to_f16(float f)
{
    const uint32_t u = ebb_hd_f32_bits(f), abs = u & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((abs >> 13) & 0x3ff));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);
    if (abs < 0x38800000u) return (uint16_t)(sign | (uint16_t)nearbyintf(ebb_hd_bits_f32(abs) * 0x1p24f));
    const uint32_t rebased = abs - ((uint32_t)(127 - 15) << 23);
    return (uint16_t)(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13));
}

/* formats.h's ebb_f16_saturate, for device code. */
EBB_HD float ebb_hd_clamp_f16_range(float v) { return v > EBB_F16_MAX ? EBB_F16_MAX : v < -EBB_F16_MAX ? -EBB_F16_MAX : v; }

/* The largest half <= x and the smallest half >= x (formats.c's f16_down
 * and f16_up). */
EBB_HD uint16_t ebb_hd_f16_down(float x)
{
    const uint16_t h = ebb_hd_to_f16(x);
    if (ebb_hd_f16(h) <= x) return h;
    if ((h & 0x7fff) == 0) return 0x8001;
    return (h & 0x8000) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}

EBB_HD uint16_t ebb_hd_f16_up(float x)
{
    const uint16_t h = ebb_hd_to_f16(x);
    if (ebb_hd_f16(h) >= x) return h;
    if ((h & 0x7fff) == 0) return 0x0001;
    return (h & 0x8000) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}

/* One KV8/KV4 group of a row as ebb_kvq_quantize_row makes it: the span
 * (clamped, NaN skipped), m rounded down and d rounded up to halves, each
 * value's nearest code; the pair written byte by byte (a row's pairs need
 * not be 2-byte aligned). */
EBB_HD void ebb_hd_kv_quantize_group(int bits, const float *x, int group, uint8_t *codes, uint8_t *pair)
{
    float lo = EBB_F16_MAX, hi = -EBB_F16_MAX;
    for (int i = 0; i < group; i++) {
        lo = fminf(lo, ebb_hd_clamp_f16_range(x[i]));
        hi = fmaxf(hi, ebb_hd_clamp_f16_range(x[i]));
    }
    if (lo > hi) lo = hi = 0;
    const int qmax = (1 << bits) - 1, B = group * bits / 8;
    const uint16_t mh = ebb_hd_f16_down(lo);
    const float m = ebb_hd_f16(mh);
    const uint16_t dh = ebb_hd_f16_up((hi - m) / (float)qmax);
    const float d = ebb_hd_f16(dh), inv = d > 0 ? 1.0f / d : 0.0f;
    for (int i = 0; i < B; i++) codes[i] = 0;
    for (int i = 0; i < group; i++) {
        const float t = (ebb_hd_clamp_f16_range(x[i]) - m) * inv + 0.5f;
        const int code = t >= 1.0f ? (t >= (float)qmax ? qmax : (int)t) : 0;
        codes[i % B] = (uint8_t)(codes[i % B] | (code << (bits * (i / B))));
    }
    pair[0] = (uint8_t)dh;
    pair[1] = (uint8_t)(dh >> 8);
    pair[2] = (uint8_t)mh;
    pair[3] = (uint8_t)(mh >> 8);
}

/* Group g of kv_store_row at 8 or 4 bits: its values (rotated by H64 first
 * when the row is), quantized into its codes and pair. */
EBB_HD void ebb_hd_kv_store_group(uint8_t *row, const float *x, int n, int bits, int group, int rotate, int g)
{
    float block[64];
    for (int i = 0; i < group; i++) block[i] = x[(size_t)g * group + i];
    if (rotate) ebb_hd_hadamard64(block);
    ebb_hd_kv_quantize_group(bits, block, group, row + (size_t)g * (size_t)(group * bits / 8),
                             row + (size_t)n * bits / 8 + 4 * (size_t)g);
}

/* ------------------------------------------------- int8 tensor-core tiles
 *
 * Prefill on tensor cores (sm_80 and later) for the types whose integer
 * sums are one per block of 32 or 64 inputs: W4G64 against Q8G64 codes and
 * the legacy GGUF types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8B32 codes.
 * Per 32 inputs, one m16n8k32 int8 MMA adds a 16-token x 8-row tile of
 * integer products (a W4G64 group takes two); each block's exact sum is
 * then folded into its outputs by ebb_hd_block_step, in block order, as
 * every path does -- so the tiles give the scalar path's bits, and an
 * output still depends on its own token and row only. A block's weights
 * enter the MMA as the integers the CPU multiplies the codes by (code - 8
 * for Q4_0 and W4G64, code - 16 for Q5_0, the bare code for Q4_1 and Q5_1,
 * whose minimum the fold adds from the activation sums; Q8_0's bytes). The
 * MMA's operand layout is the PTX ISA's (mma.m16n8k32 with .s8 operands);
 * lane l has group g = l >> 2 and t = l & 3:
 *   A (16 tokens x 32 inputs): register r holds the 4 inputs from 4t + 16 *
 *     (r >> 1) of token g + 8 * (r & 1);
 *   B (32 inputs x 8 rows): register r holds the 4 inputs from 4t + 16r of
 *     row g;
 *   C (16 x 8 sums): element e is token g + 8 * (e >> 1), row 2t + (e & 1).
 * Four int8 values go in a register lowest byte first. test_cuda_math
 * runs a warp's loads through an emulated MMA built from this table. */
EBB_HD int ebb_hd_mma_a_tok(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
EBB_HD int ebb_hd_mma_a_in(int lane, int r) { return 4 * (lane & 3) + 16 * (r >> 1); }
EBB_HD int ebb_hd_mma_b_row(int lane) { return lane >> 2; }
EBB_HD int ebb_hd_mma_b_in(int lane, int r) { return 4 * (lane & 3) + 16 * r; }
EBB_HD int ebb_hd_mma_c_tok(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
EBB_HD int ebb_hd_mma_c_row(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

EBB_HD uint32_t ebb_hd_pack4(int v0, int v1, int v2, int v3)
{
    return (uint32_t)(uint8_t)v0 | (uint32_t)(uint8_t)v1 << 8 | (uint32_t)(uint8_t)v2 << 16 | (uint32_t)(uint8_t)v3 << 24;
}

/* Four activation codes from input i (a multiple of 4) of a token's row. */
EBB_HD uint32_t ebb_hd_codes4(const int8_t *row, int i) { return ebb_hd_pack4(row[i], row[i + 1], row[i + 2], row[i + 3]); }

/* Weight k of a block (k < its elems) as the integer the CPU's sum
 * multiplies activation code k by. */
EBB_HD int ebb_hd_mma_weight(int type, const uint8_t *block, int k)
{
    if (type == EBB_TYPE_W4G64) return ((k < 32 ? block[2 + k] & 15 : block[2 + k - 32] >> 4)) - 8;
    if (type == EBB_TYPE_Q8_0) return (int8_t)block[2 + k];
    const struct ebb_hd_nibbles n = ebb_hd_nibbles_of(type, block);
    int v = k < 16 ? n.qs[k] & 0x0f : n.qs[k - 16] >> 4;
    if (n.five) v |= (int)((n.qh >> k) & 1u) << 4;
    return v - n.offset;
}

/* Four weights from input k (a multiple of 4) of a block. */
EBB_HD uint32_t ebb_hd_mma_weights4(int type, const uint8_t *block, int k)
{
    return ebb_hd_pack4(ebb_hd_mma_weight(type, block, k), ebb_hd_mma_weight(type, block, k + 1),
                        ebb_hd_mma_weight(type, block, k + 2), ebb_hd_mma_weight(type, block, k + 3));
}

/* D = A * B + C of one warp-wide m16n8k32 int8 MMA, on the CPU, from the
 * lanes' registers as the layout above places them. */
EBB_HD void ebb_hd_mma_emulate(const uint32_t a[32][4], const uint32_t b[32][2], int32_t c[32][4])
{
    int8_t A[16][32], B[32][8];
    for (int lane = 0; lane < 32; lane++) {
        for (int r = 0; r < 4; r++)
            for (int k = 0; k < 4; k++)
                A[ebb_hd_mma_a_tok(lane, r)][ebb_hd_mma_a_in(lane, r) + k] = (int8_t)(a[lane][r] >> (8 * k));
        for (int r = 0; r < 2; r++)
            for (int k = 0; k < 4; k++)
                B[ebb_hd_mma_b_in(lane, r) + k][ebb_hd_mma_b_row(lane)] = (int8_t)(b[lane][r] >> (8 * k));
    }
    for (int lane = 0; lane < 32; lane++)
        for (int e = 0; e < 4; e++) {
            int32_t sum = c[lane][e];
            for (int k = 0; k < 32; k++) sum += (int32_t)A[ebb_hd_mma_c_tok(lane, e)][k] * B[k][ebb_hd_mma_c_row(lane, e)];
            c[lane][e] = sum;
        }
}

/* A warp's work on a tile of 16 tokens (from t0) x 8 rows (from o0), per
 * lane: its A registers for inputs [k0, k0 + 32) of the activation codes
 * (zero past the last token), its B registers for inputs [32 kh, 32 kh +
 * 32) of block blk of each row (zero past the last row), and the fold of
 * its four sums of that block into its four outputs (the block's step of
 * backend.h's contract: d and sums are the activations' scales and code
 * sums in the type's form). */
EBB_HD void ebb_hd_mma_load_a(uint32_t a[4], const int8_t *q, int n_in, int n_tok, int t0, int k0, int lane)
{
    for (int r = 0; r < 4; r++) {
        const int t = t0 + ebb_hd_mma_a_tok(lane, r);
        a[r] = t < n_tok ? ebb_hd_codes4(q + (size_t)t * n_in, k0 + ebb_hd_mma_a_in(lane, r)) : 0;
    }
}

EBB_HD void ebb_hd_mma_load_b(int type, uint32_t b[2], const uint8_t *w, size_t row_bytes, int n_out, int o0, int blk,
                              int kh, int lane)
{
    const int o = o0 + ebb_hd_mma_b_row(lane);
    const uint8_t *block = w + (size_t)o * row_bytes + (size_t)blk * (size_t)ebb_hd_block_bytes(type);
    for (int r = 0; r < 2; r++) b[r] = o < n_out ? ebb_hd_mma_weights4(type, block, 32 * kh + ebb_hd_mma_b_in(lane, r)) : 0;
}

EBB_HD void ebb_hd_mma_fold(int type, float acc[4], const int32_t c[4], const uint8_t *w, size_t row_bytes,
                            const int8_t *q, const float *d, const int16_t *sums, int n_tok, int n_in, int n_out, int t0,
                            int o0, int blk, int lane)
{
    for (int e = 0; e < 4; e++) {
        const int t = t0 + ebb_hd_mma_c_tok(lane, e), o = o0 + ebb_hd_mma_c_row(lane, e);
        if (t >= n_tok || o >= n_out) continue;
        const struct ebb_hd_act x = ebb_hd_act_of(type, q, d, sums, n_in, t);
        struct ebb_hd_ints r;
        r.a = c[e];
        r.b = 0;
        acc[e] = ebb_hd_block_step(type, acc[e], w + (size_t)o * row_bytes, &x, blk, r);
    }
}

/* ------------------------------------------------------ fused attention
 *
 * backend.h's `attend`, element by element, over struct ebb_kv_pages. The
 * sinks' rotated rows (4 positions, keys and values) are made once per
 * query by the caller (ebb_hd_attend_sinks), since H64's butterfly must
 * see a whole block. */

/* Whether a query at pos reads page `page` converted from the body. */
EBB_HD int ebb_hd_kv_reads_body(int bits, int page, int pos)
{
    if (bits == 32) return 0;
    if (bits == 16) return 1;
    return page < pos / EBB_KV_PAGE_TOKENS - 1;
}

EBB_HD const uint8_t *ebb_hd_kv_body_row(const struct ebb_kv_pages *v, int layer, int kind, int p)
{
    const size_t row = ((size_t)layer * 2 + (size_t)kind) * EBB_KV_PAGE_TOKENS + (size_t)(p % EBB_KV_PAGE_TOKENS);
    return v->body[p / EBB_KV_PAGE_TOKENS] + row * v->row_bytes;
}

/* Value i of KV head kvh's row at position p, as a query at pos reads it;
 * sink_rot: the rotated sink rows [EBB_KV_SINK_TOKENS][head_dim] of this
 * layer, kind and head (rotating caches). */
EBB_HD float ebb_hd_kv_elem(const struct ebb_kv_pages *v, int layer, int kind, int kvh, int p, int pos, int i,
                            const float *sink_rot)
{
    const int hd = v->head_dim, page = p / EBB_KV_PAGE_TOKENS;
    const size_t at = (size_t)kvh * hd + (size_t)i;
    const size_t row = ((size_t)layer * 2 + (size_t)kind) * EBB_KV_PAGE_TOKENS + (size_t)(p % EBB_KV_PAGE_TOKENS);
    if (!ebb_hd_kv_reads_body(v->bits, page, pos)) {
        if (v->bits == 32) return ((const float *)(const void *)(v->body[page] + row * v->row_bytes))[at];
        return v->window[page][row * (size_t)v->kv_dim + at];
    }
    const uint8_t *r = v->body[page] + row * v->row_bytes;
    if (v->bits == 16) return ebb_hd_f16_at(r + 2 * at);
    if (p < EBB_KV_SINK_TOKENS) {
        if (v->rotate) return sink_rot[(size_t)p * hd + i];
        return v->sink[(((size_t)layer * 2 + (size_t)kind) * EBB_KV_SINK_TOKENS + (size_t)p) * (size_t)v->kv_dim + at];
    }
    return ebb_hd_kv_value(r + (size_t)kvh * hd * v->bits / 8, r + v->code_bytes + (size_t)kvh * (hd / v->group) * 4,
                           v->bits, v->group, i);
}

/* A position's score: dot8 of the query (rotated for rotated body rows)
 * with its key, in backend.h's lane order. */
EBB_HD float ebb_hd_attend_score(const struct ebb_kv_pages *v, int layer, int kvh, const float *qs, const float *qr,
                                 int p, int pos, const float *sink_rot_k)
{
    const int n = v->head_dim;
    const float *a = v->rotate && ebb_hd_kv_reads_body(v->bits, p / EBB_KV_PAGE_TOKENS, pos) ? qr : qs;
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) l[k] = fmaf(a[i + k], ebb_hd_kv_elem(v, layer, 0, kvh, p, pos, i + k, sink_rot_k), l[k]);
    for (int k = 0; k < 8; k++)
        if (i + k < n) l[k] = fmaf(a[i + k], ebb_hd_kv_elem(v, layer, 0, kvh, p, pos, i + k, sink_rot_k), l[k]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* The sinks of a layer's head, keys (kind 0) or values, times H64: what a
 * rotating cache's body view holds for positions < EBB_KV_SINK_TOKENS. */
EBB_HD void ebb_hd_attend_sinks(const struct ebb_kv_pages *v, int layer, int kind, int kvh, float *out)
{
    const int hd = v->head_dim;
    for (int p = 0; p < EBB_KV_SINK_TOKENS; p++) {
        const float *src = v->sink + (((size_t)layer * 2 + (size_t)kind) * EBB_KV_SINK_TOKENS + (size_t)p) *
                                         (size_t)v->kv_dim + (size_t)kvh * hd;
        for (int i = 0; i < hd; i++) out[(size_t)p * hd + i] = src[i];
        for (int b = 0; b < hd / 64; b++) ebb_hd_hadamard64(out + (size_t)p * hd + 64 * b);
    }
}

/* backend.h's softmax_f32 as the scalar path computes it, in order. */
EBB_HD void ebb_hd_softmax_serial(float *x, int n)
{
    if (n <= 0) return;
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* Channel i's two chains over positions [lo, hi] of a query at pos, from
 * weights e[p] (exp(s_p - m) or the softmax). */
EBB_HD void ebb_hd_attend_chains(const struct ebb_kv_pages *v, int layer, int kvh, const float *e,
                                 const float *sink_rot_v, int pos, int lo, int hi, int i, float *acc, float *accr)
{
    float a = 0, ar = 0;
    for (int p = lo; p <= hi; p++) {
        const float x = ebb_hd_kv_elem(v, layer, 1, kvh, p, pos, i, sink_rot_v);
        if (v->rotate && ebb_hd_kv_reads_body(v->bits, p / EBB_KV_PAGE_TOKENS, pos)) ar = fmaf(e[p], x, ar);
        else a = fmaf(e[p], x, a);
    }
    *acc = a;
    *accr = ar;
}

/* A serial query's work: qs, qr, acc, accr (head_dim each), then the sinks'
 * rotated keys and values (EBB_KV_SINK_TOKENS rows each). Fills qs, qr and,
 * when the body is read rotated, the sinks; returns whether it is. */
EBB_HD int ebb_hd_attend_prepare(const struct ebb_kv_pages *v, int layer, int kvh, const float *q, int pos, float scale,
                                 float *work)
{
    const int hd = v->head_dim;
    float *qs = work, *qr = qs + hd, *sink_k = qr + 3 * hd, *sink_v = sink_k + (size_t)EBB_KV_SINK_TOKENS * hd;
    for (int i = 0; i < hd; i++) qr[i] = qs[i] = q[i] * scale;
    const int body_rotated = v->rotate && ebb_hd_kv_reads_body(v->bits, 0, pos);
    if (v->rotate) {
        for (int b = 0; b < hd / 64; b++) ebb_hd_hadamard64(qr + 64 * b);
        if (body_rotated) {
            ebb_hd_attend_sinks(v, layer, 0, kvh, sink_k);
            ebb_hd_attend_sinks(v, layer, 1, kvh, sink_v);
        }
    }
    return body_rotated;
}

/* out = acc, or acc + H64(accr) when the body was read rotated. */
EBB_HD void ebb_hd_attend_finish(int hd, int body_rotated, const float *acc, float *accr, float *out)
{
    if (body_rotated)
        for (int b = 0; b < hd / 64; b++) ebb_hd_hadamard64(accr + 64 * b);
    for (int i = 0; i < hd; i++) out[i] = body_rotated ? acc[i] + accr[i] : acc[i];
}

/* One query of `attend`, serially (the CPU's and the emulated device's):
 * q and out its head's head_dim values, s its pos + 1 scores, work 4 *
 * head_dim + 2 * EBB_KV_SINK_TOKENS * head_dim floats. */
EBB_HD void ebb_hd_attend_query(const struct ebb_kv_pages *v, int layer, int kvh, const float *q, float *out, int pos,
                                float scale, float *s, float *work)
{
    const int hd = v->head_dim;
    float *qs = work, *qr = qs + hd, *acc = qr + hd, *accr = acc + hd;
    float *sink_k = accr + hd, *sink_v = sink_k + (size_t)EBB_KV_SINK_TOKENS * hd;
    const int body_rotated = ebb_hd_attend_prepare(v, layer, kvh, q, pos, scale, work);
    for (int p = 0; p <= pos; p++) s[p] = ebb_hd_attend_score(v, layer, kvh, qs, qr, p, pos, sink_k);
    ebb_hd_softmax_serial(s, pos + 1);
    for (int i = 0; i < hd; i++) ebb_hd_attend_chains(v, layer, kvh, s, sink_v, pos, 0, pos, i, &acc[i], &accr[i]);
    ebb_hd_attend_finish(hd, body_rotated, acc, accr, out);
}

/* Long contexts, split over the sequence (flash-decoding; the CUDA kernel's
 * choice, which depends on the query's own position only): a query at
 * position EBB_HD_ATTEND_SPLIT_FROM or later is computed in chunks of
 * EBB_HD_ATTEND_CHUNK positions, [c * CHUNK, (c + 1) * CHUNK) up to pos,
 * each giving its part -- part[0] its largest score m, part[1] the sum of
 * exp(s - m), then the two value chains of exp(s_p - m) v_p (rows in place,
 * then rows read rotated), head_dim each -- and the parts merged in chunk
 * order, each weighted exp(m_c - M) / L. Within float error of the one
 * softmax, not its bits. */
#define EBB_HD_ATTEND_SPLIT_FROM 1024
#define EBB_HD_ATTEND_CHUNK 256
#define EBB_HD_ATTEND_PART(hd) (2 * (size_t)(hd) + 2)

/* The last position of chunk c for a query at pos. */
EBB_HD int ebb_hd_attend_chunk_last(int c, int pos)
{
    const int last = (c + 1) * EBB_HD_ATTEND_CHUNK - 1;
    return last < pos ? last : pos;
}

/* M, the largest of the parts' maxima, and 1 / L, L the sum of their sums
 * each scaled by exp(m_c - M) (empty parts, sum 0, count nothing). */
EBB_HD void ebb_hd_attend_merge_scale(const float *parts, int n_chunks, int hd, float *big, float *inv)
{
    float m = -INFINITY, total = 0;
    for (int c = 0; c < n_chunks; c++) m = fmaxf(m, parts[c * EBB_HD_ATTEND_PART(hd)]);
    for (int c = 0; c < n_chunks; c++) {
        const float *pc = parts + c * EBB_HD_ATTEND_PART(hd);
        if (pc[1] > 0) total = fmaf(pc[1], expf(pc[0] - m), total);
    }
    *big = m;
    *inv = 1.0f / total;
}

/* Channel i of the merged chains. */
EBB_HD void ebb_hd_attend_merge_elem(const float *parts, int n_chunks, int hd, int i, float big, float inv,
                                     float *acc, float *accr)
{
    float a = 0, ar = 0;
    for (int c = 0; c < n_chunks; c++) {
        const float *pc = parts + c * EBB_HD_ATTEND_PART(hd);
        if (!(pc[1] > 0)) continue;
        const float w = expf(pc[0] - big) * inv;
        a = fmaf(w, pc[2 + i], a);
        ar = fmaf(w, pc[2 + hd + i], ar);
    }
    *acc = a;
    *accr = ar;
}

/* One query of `attend` split as above, serially (the kernels spread each
 * chunk's scores and sums over a thread block): the same arguments as
 * ebb_hd_attend_query, and parts of (pos / CHUNK + 1) * PART(head_dim). */
EBB_HD void ebb_hd_attend_query_split(const struct ebb_kv_pages *v, int layer, int kvh, const float *q, float *out,
                                      int pos, float scale, float *s, float *work, float *parts)
{
    const int hd = v->head_dim, n_chunks = pos / EBB_HD_ATTEND_CHUNK + 1;
    float *qs = work, *qr = qs + hd, *acc = qr + hd, *accr = acc + hd;
    float *sink_k = accr + hd, *sink_v = sink_k + (size_t)EBB_KV_SINK_TOKENS * hd;
    const int body_rotated = ebb_hd_attend_prepare(v, layer, kvh, q, pos, scale, work);
    for (int c = 0; c < n_chunks; c++) {
        float *part = parts + c * EBB_HD_ATTEND_PART(hd);
        const int lo = c * EBB_HD_ATTEND_CHUNK, hi = ebb_hd_attend_chunk_last(c, pos);
        float m = -INFINITY, sum = 0;
        for (int p = lo; p <= hi; p++) m = fmaxf(m, s[p] = ebb_hd_attend_score(v, layer, kvh, qs, qr, p, pos, sink_k));
        for (int p = lo; p <= hi; p++) sum += s[p] = expf(s[p] - m);
        part[0] = m;
        part[1] = sum;
        for (int i = 0; i < hd; i++) ebb_hd_attend_chains(v, layer, kvh, s, sink_v, pos, lo, hi, i, &part[2 + i],
                                                          &part[2 + hd + i]);
    }
    float big, inv;
    ebb_hd_attend_merge_scale(parts, n_chunks, hd, &big, &inv);
    for (int i = 0; i < hd; i++) ebb_hd_attend_merge_elem(parts, n_chunks, hd, i, big, inv, &acc[i], &accr[i]);
    ebb_hd_attend_finish(hd, body_rotated, acc, accr, out);
}

/* ------------------------------------------------------------- BitStack */

/* One sign row of n (bit i of byte i/8 set: negative) against n codes. */
EBB_HD int32_t ebb_hd_sign_isum(const uint8_t *signs, const int8_t *t, int n)
{
    int32_t sum = 0;
    for (int i = 0; i < n; i++) sum += (signs[i >> 3] >> (i & 7)) & 1 ? -t[i] : t[i];
    return sum;
}

/* bitstack_scale_add's chain for row o and token t, from acc = 0. */
EBB_HD float ebb_hd_bitstack_scaled(const int32_t *isum_row_tok, const float *u_row, const float *ts_tok, int rank)
{
    float acc = 0;
    for (int j = 0; j < rank; j++) acc = fmaf((float)isum_row_tok[j], u_row[j] * ts_tok[j], acc);
    return acc;
}
#endif
