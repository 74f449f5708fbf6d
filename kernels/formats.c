/* Tensor storage formats: the type table, half-precision conversions and the
 * row dequantizers for the GGUF block layouts ebb reads.
 *
 * Design. One table indexed by the GGUF type number gives every type's name,
 * block geometry and dequantizer; nothing else in the tree knows a layout.
 * Block structs are never overlaid on the file bytes: each dequantizer reads
 * the block byte by byte at documented offsets (little-endian fields read
 * with explicit shifts), so mapped data of any alignment is safe and the code
 * documents the layout as it goes.
 *
 * Trade-off: these are the clear, portable reference conversions (used when a
 * whole tensor is turned into f32 at load time, and by `ebb inspect`); hot
 * paths that compute directly on quantized weights belong to the kernels and
 * are checked against these.
 *
 * Layout notes (QK = 32 for the legacy quants, QK_K = 256 for the K-quants;
 * "f16" = IEEE half, little-endian; offsets in bytes):
 *   Q4_0  18 B: d f16 | 16 B nibbles. Value j (j < 16) is the low nibble of
 *         byte j, value j+16 its high nibble; x = d * (q - 8).
 *   Q4_1  20 B: d f16 | m f16 | 16 B nibbles as Q4_0; x = d * q + m.
 *   Q5_0  22 B: d f16 | qh u32 | 16 B nibbles. Bit j of qh is bit 4 of
 *         value j; x = d * (q - 16).
 *   Q5_1  24 B: d f16 | m f16 | qh u32 | 16 B nibbles; x = d * q + m.
 *   Q8_0  34 B: d f16 | 32 int8; x = d * q.
 *   Q2_K  84 B: 16 B scales (low nibble scale, high nibble min, one per 16
 *         values) | 64 B 2-bit quants | d f16 | dmin f16.
 *   Q3_K 110 B: 32 B high-bit mask | 64 B 2-bit low quants | 12 B of sixteen
 *         6-bit scales (offset by 32) | d f16. A CLEAR mask bit subtracts 4.
 *   Q4_K 144 B: d f16 | dmin f16 | 12 B of eight 6-bit scales and eight 6-bit
 *         mins | 128 B nibbles (per 64 values: 32 low nibbles, 32 high).
 *   Q5_K 176 B: as Q4_K with 32 B of fifth bits between scales and nibbles.
 *   Q6_K 210 B: 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales |
 *         d f16; x = d * scale * (q - 32).
 *   W4G64 34 B (ebb's own, 64 values): d f16 | 32 B nibbles. Value j (j < 32)
 *         is the low nibble of byte j, value j+32 its high nibble;
 *         x = d * (q - 8).
 *   W2G64 20 B (ebb's own, 64 values): d f16 | m f16 | 16 B of 2-bit codes.
 *         Value j (j < 64) is bits 2 * (j / 16) of byte j % 16; x = d * q + m.
 *
 * Quantizers (the other direction) exist only for the formats ebb writes:
 * W4G64 by round-to-nearest, W2G64 and Q8_0 (used by the packer and tests), and the
 * KV cache's KV8/KV4 rows (described in formats.h).
 */
#include "kernels/formats.h"

#include <math.h>
#include <string.h>

#define QK 32
#define QK_K 256

/* Block sizes, each checked against the sum of its fields (layout notes above;
 * 2 = one f16). */
#define Q4_0_BYTES 18
#define Q4_1_BYTES 20
#define Q5_0_BYTES 22
#define Q5_1_BYTES 24
#define Q2_K_BYTES 84
#define Q3_K_BYTES 110
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176
#define Q6_K_BYTES 210
_Static_assert(Q4_0_BYTES == 2 + QK / 2, "Q4_0: d | nibbles");
_Static_assert(Q4_1_BYTES == 2 + 2 + QK / 2, "Q4_1: d | m | nibbles");
_Static_assert(Q5_0_BYTES == 2 + 4 + QK / 2, "Q5_0: d | qh | nibbles");
_Static_assert(Q5_1_BYTES == 2 + 2 + 4 + QK / 2, "Q5_1: d | m | qh | nibbles");
_Static_assert(EBB_Q8_0_BLOCK_BYTES == 2 + QK && EBB_Q8_0_GROUP == QK, "Q8_0: d | int8");
_Static_assert(Q2_K_BYTES == QK_K / 16 + QK_K / 4 + 2 + 2, "Q2_K: scales | 2-bit quants | d | dmin");
_Static_assert(Q3_K_BYTES == QK_K / 8 + QK_K / 4 + 12 + 2, "Q3_K: hmask | 2-bit quants | scales | d");
_Static_assert(Q4_K_BYTES == 2 + 2 + 12 + QK_K / 2, "Q4_K: d | dmin | scales | nibbles");
_Static_assert(Q5_K_BYTES == 2 + 2 + 12 + QK_K / 8 + QK_K / 2, "Q5_K: d | dmin | scales | fifth bits | nibbles");
_Static_assert(Q6_K_BYTES == QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, "Q6_K: low nibbles | high pairs | scales | d");
_Static_assert(EBB_W4G64_BLOCK_BYTES == 2 + EBB_W4G64_GROUP / 2, "W4G64: d | nibbles");

/* ---------------------------------------------------------------- halves */

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float ebb_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f)                                   /* inf or nan; keep payload */
        return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);           /* signed zero */
        /* Subnormal: man * 2^-24 is exact in f32. */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t ebb_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) {                           /* nan: quiet, keep top payload bits */
        return (uint16_t)(sign | 0x7e00 | ((abs >> 13) & 0x3ff));
    }
    if (abs >= 0x477ff000u)                            /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00);
    if (abs < 0x38800000u) {                           /* below the smallest normal half */
        /* Subnormal half: value / 2^-24, rounded to nearest even. The
         * float arithmetic is exact except for this one rounding, which
         * the FPU does in round-to-nearest-even mode. */
        float v = bits_f32(abs) * 0x1p24f;
        float r = nearbyintf(v);
        return (uint16_t)(sign | (uint16_t)r);         /* r <= 1024: may become the smallest normal */
    }
    /* Normal: rebias the exponent, round the 23-bit mantissa to 10 bits to
     * nearest even; a carry out of the mantissa correctly bumps the exponent. */
    uint32_t rebased = abs - ((uint32_t)(127 - 15) << 23);
    uint32_t round = 0xfffu + ((rebased >> 13) & 1u);
    return (uint16_t)(sign | ((rebased + round) >> 13));
}

float ebb_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static float rd_f16(const uint8_t *p) { return ebb_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

static uint32_t rd_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* ------------------------------------------------------- plain scalar rows */

static void f32_to_f32(const void *src, float *dst, size_t n) { memcpy(dst, src, n * sizeof(float)); }

static void f16_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *p = src;
    for (size_t i = 0; i < n; i++) dst[i] = rd_f16(p + 2 * i);
}

static void bf16_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *p = src;
    for (size_t i = 0; i < n; i++) dst[i] = ebb_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
}

/* ---------------------------------------------------------- legacy quants */

/* Blocks of `group` values as f16 d | group/2 bytes of nibbles, value j in
 * the low nibble of byte j and value j + group/2 in its high nibble,
 * x = d * (q - 8): Q4_0 (32 values) and W4G64 (64). */
static void nibbles_to_f32(const uint8_t *b, float *dst, size_t n, int group)
{
    const int half = group / 2;
    for (size_t blk = 0; blk < n / (size_t)group; blk++, b += 2 + half, dst += group) {
        float d = rd_f16(b);
        const uint8_t *qs = b + 2;
        for (int j = 0; j < half; j++) {
            dst[j] = d * (float)((qs[j] & 0x0f) - 8);
            dst[j + half] = d * (float)((qs[j] >> 4) - 8);
        }
    }
}

static void q4_0_to_f32(const void *src, float *dst, size_t n) { nibbles_to_f32(src, dst, n, QK); }

static void q4_1_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK; blk++, b += Q4_1_BYTES, dst += QK) {
        float d = rd_f16(b), m = rd_f16(b + 2);
        const uint8_t *qs = b + 4;
        for (int j = 0; j < QK / 2; j++) {
            dst[j] = d * (float)(qs[j] & 0x0f) + m;
            dst[j + QK / 2] = d * (float)(qs[j] >> 4) + m;
        }
    }
}

/* The 5-bit quants of one 32-value block: nibbles plus one bit from qh. */
static void unpack_q5(const uint8_t *qs, uint32_t qh, int q[QK])
{
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
    }
}

static void q5_0_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    int q[QK];
    for (size_t blk = 0; blk < n / QK; blk++, b += Q5_0_BYTES, dst += QK) {
        float d = rd_f16(b);
        unpack_q5(b + 6, rd_u32(b + 2), q);
        for (int j = 0; j < QK; j++) dst[j] = d * (float)(q[j] - 16);
    }
}

static void q5_1_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    int q[QK];
    for (size_t blk = 0; blk < n / QK; blk++, b += Q5_1_BYTES, dst += QK) {
        float d = rd_f16(b), m = rd_f16(b + 2);
        unpack_q5(b + 8, rd_u32(b + 4), q);
        for (int j = 0; j < QK; j++) dst[j] = d * (float)q[j] + m;
    }
}

static void q8_0_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK; blk++, b += EBB_Q8_0_BLOCK_BYTES, dst += QK) {
        float d = rd_f16(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < QK; j++) dst[j] = d * (float)qs[j];
    }
}

/* ------------------------------------------------------------------ W4G64 */

#define W4G64 EBB_W4G64_GROUP

static void w4g64_to_f32(const void *src, float *dst, size_t n) { nibbles_to_f32(src, dst, n, W4G64); }

static void wr_f16(uint8_t *p, uint16_t h) { p[0] = (uint8_t)(h & 0xff); p[1] = (uint8_t)(h >> 8); }

/* The f16 step d for a group whose largest magnitude is amax: absmax / 7,
 * rounded, then raised while 7.5 * d < amax. Rounding to f16 can leave d up to
 * half a step (2^-11 relative, far more for subnormal halves) below amax / 7,
 * and then amax / d would exceed 7.5 and amax itself would be clamped to code
 * 7 with an error above d/2. d * 7.5 is exact in float (11 + 4 bits). */
static uint16_t w4_scale(float amax)
{
    if (amax == 0) return 0;
    uint16_t h = ebb_f32_to_f16(amax / 7.0f);
    if (h >= 0x7c00) return 0x7bff;            /* beyond f16: largest finite, codes saturate */
    while (h < 0x7bff && ebb_f16_to_f32(h) * 7.5f < amax) h++;
    return h;
}

void ebb_quantize_w4g64_rtn(const float *src, void *dst, size_t n)
{
    uint8_t *b = dst;
    for (size_t blk = 0; blk < n / W4G64; blk++, src += W4G64, b += EBB_W4G64_BLOCK_BYTES) {
        float amax = 0;
        for (int j = 0; j < W4G64; j++) if (fabsf(src[j]) > amax) amax = fabsf(src[j]);
        uint16_t h = w4_scale(amax);
        float d = ebb_f16_to_f32(h);
        wr_f16(b, h);
        for (int j = 0; j < W4G64 / 2; j++) {
            int lo = 0, hi = 0;                  /* code - 8 */
            if (d > 0) {
                lo = (int)roundf(src[j] / d);
                hi = (int)roundf(src[j + W4G64 / 2] / d);
                lo = lo < -8 ? -8 : lo > 7 ? 7 : lo;
                hi = hi < -8 ? -8 : hi > 7 ? 7 : hi;
            }
            b[2 + j] = (uint8_t)((lo + 8) | ((hi + 8) << 4));
        }
    }
}

/* ------------------------------------------------------------------ W2G64 */

#define W2G64 EBB_W2G64_GROUP
#define W2G64_CODE_BYTES (W2G64 / 4)

static int w2_code(const uint8_t *qs, int j) { return (qs[j % W2G64_CODE_BYTES] >> (2 * (j / W2G64_CODE_BYTES))) & 3; }

static void w2g64_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / W2G64; blk++, b += EBB_W2G64_BLOCK_BYTES, dst += W2G64) {
        const float d = rd_f16(b), m = rd_f16(b + 2);
        for (int j = 0; j < W2G64; j++) dst[j] = d * (float)w2_code(b + 4, j) + m;
    }
}

void ebb_w2g64_block(void *block, uint16_t d_f16, uint16_t m_f16, const int8_t *codes)
{
    uint8_t *b = block;
    wr_f16(b, d_f16);
    wr_f16(b + 2, m_f16);
    memset(b + 4, 0, W2G64_CODE_BYTES);
    for (int j = 0; j < W2G64; j++) b[4 + j % W2G64_CODE_BYTES] |= (uint8_t)(codes[j] << (2 * (j / W2G64_CODE_BYTES)));
}

/* Codes of x against (d, m): nearest level, clamped to [0, 3]. */
static void w2_codes(const float *x, float d, float m, int8_t *q)
{
    for (int j = 0; j < W2G64; j++) {
        const int c = d > 0 ? (int)roundf((x[j] - m) / d) : 0;
        q[j] = (int8_t)(c < 0 ? 0 : c > 3 ? 3 : c);
    }
}

/* The least-squares (d, m) for fixed codes, each value's square error
 * weighted by wt (NULL: all 1), and the weighted squared error it leaves.
 * All codes equal: d = 0, m the weighted mean. */
static double w2_fit(const float *x, const float *wt, const int8_t *q, double *d, double *m)
{
    double sw = 0, sq = 0, sx = 0, sqq = 0, sqx = 0;
    for (int j = 0; j < W2G64; j++) {
        const double w = wt ? wt[j] : 1.0;
        sw += w, sq += w * q[j], sx += w * x[j], sqq += w * q[j] * q[j], sqx += w * q[j] * x[j];
    }
    const double det = sw * sqq - sq * sq;
    if (det > 1e-12 * sw * sqq) {
        *d = (sw * sqx - sq * sx) / det;
        *m = (sx - *d * sq) / sw;
    } else {
        *d = 0, *m = sw > 0 ? sx / sw : 0;
    }
    double err = 0;
    for (int j = 0; j < W2G64; j++) {
        const double e = x[j] - (*d * q[j] + *m);
        err += (wt ? wt[j] : 1.0) * e * e;
    }
    return err;
}

void ebb_quantize_w2g64_weighted(const float *src, const float *weight, void *dst, size_t n)
{
    uint8_t *b = dst;
    for (size_t blk = 0; blk < n / W2G64; blk++, src += W2G64, b += EBB_W2G64_BLOCK_BYTES) {
        const float *wt = weight ? weight + blk * W2G64 : NULL;
        float lo = src[0], hi = src[0];
        for (int j = 1; j < W2G64; j++) lo = src[j] < lo ? src[j] : lo, hi = src[j] > hi ? src[j] : hi;
        int8_t q[W2G64];
        double best = INFINITY, best_d = 0, best_m = lo;
        for (int a = 0; a <= 5 && hi > lo; a++)
            for (int z = 0; z <= 5; z++) {
                const float l = lo + (hi - lo) * 0.05f * (float)a, h = hi - (hi - lo) * 0.05f * (float)z;
                double d, m;
                w2_codes(src, (h - l) / 3, l, q);
                const double err = w2_fit(src, wt, q, &d, &m);
                /* a negative step would turn the levels around: keep only real fits */
                if (d >= 0 && err < best) best = err, best_d = d, best_m = m;
            }
        const uint16_t hd = ebb_f32_to_f16((float)best_d), hm = ebb_f32_to_f16((float)best_m);
        w2_codes(src, ebb_f16_to_f32(hd), ebb_f16_to_f32(hm), q);
        ebb_w2g64_block(b, hd, hm, q);
    }
}

void ebb_quantize_w2g64(const float *src, void *dst, size_t n) { ebb_quantize_w2g64_weighted(src, NULL, dst, n); }

void ebb_quantize_q8_0(const float *src, void *dst, size_t n)
{
    uint8_t *b = dst;
    for (size_t blk = 0; blk < n / QK; blk++, src += QK, b += EBB_Q8_0_BLOCK_BYTES) {
        float amax = 0;
        for (int j = 0; j < QK; j++) if (fabsf(src[j]) > amax) amax = fabsf(src[j]);
        float d = amax / 127.0f;
        float id = d != 0 ? 1.0f / d : 0.0f;
        wr_f16(b, ebb_f32_to_f16(d));
        for (int j = 0; j < QK; j++) b[2 + j] = (uint8_t)(int8_t)roundf(src[j] * id);
    }
}

/* ----------------------------------------------------------------- K-quants */

/* Q2_K: each 128 values use 32 quant bytes four times (shifts 0, 2, 4, 6);
 * each shift yields 32 values in two groups of 16 with their own scale. */
static void q2_k_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK_K; blk++, b += Q2_K_BYTES) {
        const uint8_t *scales = b, *qs = b + 16;
        float d = rd_f16(b + 80), dmin = rd_f16(b + 82);
        int group = 0;
        for (int half = 0; half < 2; half++, qs += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int sub = 0; sub < 2; sub++, group++) {
                    float dl = d * (float)(scales[group] & 0x0f);
                    float ml = dmin * (float)(scales[group] >> 4);
                    for (int l = 0; l < 16; l++)
                        *dst++ = dl * (float)((qs[sub * 16 + l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

/* Q3_K's sixteen 6-bit scales: the low 4 bits are the nibbles of bytes 0..7
 * (low nibbles first), the high 2 bits come from bytes 8..11, two bits per
 * scale, scale i using byte 8 + i%4 at bit 2*(i/4). */
void ebb_q3_k_scales(const uint8_t *s, int out[16])
{
    for (int i = 0; i < 16; i++) {
        int lo = i < 8 ? (s[i] & 0x0f) : (s[i - 8] >> 4);
        int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        out[i] = (lo | (hi << 4)) - 32;
    }
}

static void q3_k_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    int sc[16];
    for (size_t blk = 0; blk < n / QK_K; blk++, b += Q3_K_BYTES) {
        const uint8_t *hmask = b, *qs = b + 32;
        ebb_q3_k_scales(b + 96, sc);
        float d = rd_f16(b + 108);
        int group = 0, bit = 0;                      /* bit: which hmask bit, 0..7 */
        for (int half = 0; half < 2; half++, qs += 32) {
            for (int shift = 0; shift < 8; shift += 2, bit++) {
                for (int sub = 0; sub < 2; sub++, group++) {
                    float dl = d * (float)sc[group];
                    for (int l = sub * 16; l < sub * 16 + 16; l++) {
                        int q = (qs[l] >> shift) & 3;
                        if (!((hmask[l] >> bit) & 1)) q -= 4;
                        *dst++ = dl * (float)q;
                    }
                }
            }
        }
    }
}

/* Q4_K/Q5_K's eight 6-bit scales and mins in 12 bytes: entries 0..3 are the
 * low 6 bits of bytes 0..3 (scales) and 4..7 (mins); entries 4..7 take their
 * low 4 bits from the nibbles of bytes 8..11 and their top 2 bits from the
 * spare top bits of bytes 0..3 (scales) and 4..7 (mins). */
void ebb_k4_scale_min(const uint8_t *s, int j, int *scale, int *min)
{
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void q4_k_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK_K; blk++, b += Q4_K_BYTES) {
        float d = rd_f16(b), dmin = rd_f16(b + 2);
        const uint8_t *scales = b + 4, *qs = b + 16;
        for (int j = 0; j < 8; j += 2, qs += 32) {     /* 64 values per step */
            int s0, m0, s1, m1;
            ebb_k4_scale_min(scales, j, &s0, &m0);
            ebb_k4_scale_min(scales, j + 1, &s1, &m1);
            float d0 = d * (float)s0, o0 = dmin * (float)m0;
            float d1 = d * (float)s1, o1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++) *dst++ = d0 * (float)(qs[l] & 0x0f) - o0;
            for (int l = 0; l < 32; l++) *dst++ = d1 * (float)(qs[l] >> 4) - o1;
        }
    }
}

static void q5_k_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK_K; blk++, b += Q5_K_BYTES) {
        float d = rd_f16(b), dmin = rd_f16(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
        int bit = 0;                                 /* qh bit for the low-nibble group */
        for (int j = 0; j < 8; j += 2, qs += 32, bit += 2) {
            int s0, m0, s1, m1;
            ebb_k4_scale_min(scales, j, &s0, &m0);
            ebb_k4_scale_min(scales, j + 1, &s1, &m1);
            float d0 = d * (float)s0, o0 = dmin * (float)m0;
            float d1 = d * (float)s1, o1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++)
                *dst++ = d0 * (float)((qs[l] & 0x0f) | (((qh[l] >> bit) & 1) << 4)) - o0;
            for (int l = 0; l < 32; l++)
                *dst++ = d1 * (float)((qs[l] >> 4) | (((qh[l] >> (bit + 1)) & 1) << 4)) - o1;
        }
    }
}

/* Q6_K: per 128 values, 64 low-nibble bytes and 32 high-bit bytes make four
 * runs of 32 values; scale index = value index / 16. */
static void q6_k_to_f32(const void *src, float *dst, size_t n)
{
    const uint8_t *b = src;
    for (size_t blk = 0; blk < n / QK_K; blk++, b += Q6_K_BYTES) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = rd_f16(b + 208);
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, dst += 128) {
            for (int l = 0; l < 32; l++) {
                int q0 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q1 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                int s = l / 16;
                dst[l] = d * (float)sc[s] * (float)q0;
                dst[l + 32] = d * (float)sc[s + 2] * (float)q1;
                dst[l + 64] = d * (float)sc[s + 4] * (float)q2;
                dst[l + 96] = d * (float)sc[s + 6] * (float)q3;
            }
        }
    }
}

/* ----------------------------------------------------- KV8 / KV4 / KV2 rows */


/* The largest half <= x and the smallest half >= x (|x| <= 65504). */
static uint16_t f16_down(float x)
{
    uint16_t h = ebb_f32_to_f16(x);
    if (ebb_f16_to_f32(h) <= x) return h;
    if ((h & 0x7fff) == 0) return 0x8001;            /* +-0 -> smallest negative */
    return (h & 0x8000) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}

static uint16_t f16_up(float x)
{
    uint16_t h = ebb_f32_to_f16(x);
    if (ebb_f16_to_f32(h) >= x) return h;
    if ((h & 0x7fff) == 0) return 0x0001;
    return (h & 0x8000) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}

/* The pair for values in [lo, hi] (clamped, lo <= hi): m is lo rounded down
 * to a half and d the step rounded up, so [m, m + qmax * d] covers every
 * value and rounding to the nearest code is off by at most d/2, whatever f16
 * did to d and m. Sets dm[0] = d, dm[1] = m and returns m and 1/d (0 when
 * d is 0, a constant group) for kvq_code. */
static void kvq_pair(int bits, float lo, float hi, uint16_t dm[2], float *m, float *inv)
{
    const uint16_t mh = f16_down(lo);
    *m = ebb_f16_to_f32(mh);
    const uint16_t dh = f16_up((hi - *m) / (float)((1 << bits) - 1));
    const float d = ebb_f16_to_f32(dh);
    *inv = d > 0 ? 1.0f / d : 0.0f;
    dm[0] = dh;
    dm[1] = mh;
}

/* x's nearest code under the pair kvq_pair made. */
static int kvq_code(int bits, float x, float m, float inv)
{
    const int qmax = (1 << bits) - 1;
    const float t = (ebb_f16_saturate(x) - m) * inv + 0.5f;
    return t >= 1.0f ? (t >= (float)qmax ? qmax : (int)t) : 0;   /* NaN -> 0 */
}

/* Code i of a group at c, by the packing rule (formats.h): byte i % B, shift
 * bits * (i / B). Putting clears the code's bits first, so the bytes need
 * no zeroing and codes can be written in any order. */
static void kvq_put(uint8_t *c, int bits, int group, int i, int code)
{
    const int B = group * bits / 8, shift = bits * (i / B), mask = (1 << bits) - 1;
    c[i % B] = (uint8_t)((c[i % B] & ~(mask << shift)) | (code << shift));
}

static int kvq_get(const uint8_t *c, int bits, int group, int i)
{
    const int B = group * bits / 8;
    return (c[i % B] >> (bits * (i / B))) & ((1 << bits) - 1);
}

/* The span of values a pair must cover, clamped to f16's range; fminf and
 * fmaxf skip NaN, and an all-NaN set gets [0, 0]. */
static void kvq_span(float *lo, float *hi, float v)
{
    *lo = fminf(*lo, ebb_f16_saturate(v));
    *hi = fmaxf(*hi, ebb_f16_saturate(v));
}

static void kvq_group(int bits, const float *x, int group, uint8_t *codes, uint16_t *dm)
{
    float lo = EBB_F16_MAX, hi = -EBB_F16_MAX, m, inv;
    for (int i = 0; i < group; i++) kvq_span(&lo, &hi, x[i]);
    if (lo > hi) lo = hi = 0;
    kvq_pair(bits, lo, hi, dm, &m, &inv);
    for (int i = 0; i < group; i++) kvq_put(codes, bits, group, i, kvq_code(bits, x[i], m, inv));
}

void ebb_kvq_quantize_row(int bits, const float *x, int n, int group, uint8_t *codes, uint16_t *dm)
{
    for (int g = 0; g < n / group; g++)
        kvq_group(bits, x + g * group, group, codes + (size_t)g * group * bits / 8, dm + 2 * g);
}

void ebb_kvq_dequantize_row(int bits, const uint8_t *codes, const uint16_t *dm, int n, int group, float *out)
{
    for (int g = 0; g < n / group; g++) {
        const uint8_t *c = codes + (size_t)g * group * bits / 8;
        const float d = ebb_f16_to_f32(dm[2 * g]), m = ebb_f16_to_f32(dm[2 * g + 1]);
        for (int i = 0; i < group; i++) out[g * group + i] = m + d * (float)kvq_get(c, bits, group, i);
    }
}

/* Channel i's codes live in group i / group of each row, at index i % group. */
void ebb_kvq_quantize_channels(int bits, const float *x, int n_rows, int n, int group, uint8_t *codes, size_t stride,
                               uint16_t *dm)
{
    const size_t group_bytes = (size_t)group * bits / 8;
    for (int i = 0; i < n; i++) {
        float lo = EBB_F16_MAX, hi = -EBB_F16_MAX, m, inv;
        for (int r = 0; r < n_rows; r++) kvq_span(&lo, &hi, x[(size_t)r * n + i]);
        if (lo > hi) lo = hi = 0;
        kvq_pair(bits, lo, hi, dm + 2 * i, &m, &inv);
        for (int r = 0; r < n_rows; r++)
            kvq_put(codes + (size_t)r * stride + (size_t)(i / group) * group_bytes, bits, group, i % group,
                    kvq_code(bits, x[(size_t)r * n + i], m, inv));
    }
}

void ebb_kvq_dequantize_channels(int bits, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                                 int group, float *out)
{
    const size_t group_bytes = (size_t)group * bits / 8;
    for (int r = 0; r < n_rows; r++)
        for (int i = 0; i < n; i++) {
            const uint8_t *c = codes + (size_t)r * stride + (size_t)(i / group) * group_bytes;
            out[(size_t)r * n + i] =
                fmaf(ebb_f16_to_f32(dm[2 * i]), (float)kvq_get(c, bits, group, i % group), ebb_f16_to_f32(dm[2 * i + 1]));
        }
}

/* ------------------------------------------------------------------ table */

static const struct ebb_type_info type_table[EBB_TYPE_COUNT_] = {
    [EBB_TYPE_F32]  = { "F32",  1, 4, f32_to_f32, EBB_ACT_F32 },
    [EBB_TYPE_F16]  = { "F16",  1, 2, f16_to_f32, EBB_ACT_NONE },
    [EBB_TYPE_Q4_0] = { "Q4_0", QK, Q4_0_BYTES, q4_0_to_f32, EBB_ACT_Q8B32 },
    [EBB_TYPE_Q4_1] = { "Q4_1", QK, Q4_1_BYTES, q4_1_to_f32, EBB_ACT_Q8B32 },
    [EBB_TYPE_Q5_0] = { "Q5_0", QK, Q5_0_BYTES, q5_0_to_f32, EBB_ACT_Q8B32 },
    [EBB_TYPE_Q5_1] = { "Q5_1", QK, Q5_1_BYTES, q5_1_to_f32, EBB_ACT_Q8B32 },
    [EBB_TYPE_Q8_0] = { "Q8_0", QK, EBB_Q8_0_BLOCK_BYTES, q8_0_to_f32, EBB_ACT_Q8B32 },
    [EBB_TYPE_Q2_K] = { "Q2_K", QK_K, Q2_K_BYTES, q2_k_to_f32, EBB_ACT_Q8K },
    [EBB_TYPE_Q3_K] = { "Q3_K", QK_K, Q3_K_BYTES, q3_k_to_f32, EBB_ACT_Q8K },
    [EBB_TYPE_Q4_K] = { "Q4_K", QK_K, Q4_K_BYTES, q4_k_to_f32, EBB_ACT_Q8K },
    [EBB_TYPE_Q5_K] = { "Q5_K", QK_K, Q5_K_BYTES, q5_k_to_f32, EBB_ACT_Q8K },
    [EBB_TYPE_Q6_K] = { "Q6_K", QK_K, Q6_K_BYTES, q6_k_to_f32, EBB_ACT_Q8K },
    [EBB_TYPE_I8]   = { "I8",   1, 1, NULL, EBB_ACT_NONE },
    [EBB_TYPE_I16]  = { "I16",  1, 2, NULL, EBB_ACT_NONE },
    [EBB_TYPE_I32]  = { "I32",  1, 4, NULL, EBB_ACT_NONE },
    [EBB_TYPE_F64]  = { "F64",  1, 8, NULL, EBB_ACT_NONE },
    [EBB_TYPE_BF16] = { "BF16", 1, 2, bf16_to_f32, EBB_ACT_NONE },
    [EBB_TYPE_W4G64] = { "W4G64", W4G64, EBB_W4G64_BLOCK_BYTES, w4g64_to_f32, EBB_ACT_Q8G64 },
    [EBB_TYPE_W2G64] = { "W2G64", W2G64, EBB_W2G64_BLOCK_BYTES, w2g64_to_f32, EBB_ACT_Q8B32 },
};

const struct ebb_type_info *ebb_type_info(uint32_t type)
{
    if (type >= EBB_TYPE_COUNT_ || type_table[type].name == NULL) return NULL;
    return &type_table[type];
}

/* Types other GGUF writers use that ebb has no block layout or product for.
 * Knowing their names costs a table; guessing their sizes would be a lie. */
static const char *const foreign_type_names[] = {
    [4] = "Q4_2", [5] = "Q4_3", [9] = "Q8_1", [15] = "Q8_K", [16] = "IQ2_XXS", [17] = "IQ2_XS",
    [18] = "IQ3_XXS", [19] = "IQ1_S", [20] = "IQ4_NL", [21] = "IQ3_S", [22] = "IQ2_S", [23] = "IQ4_XS",
    [27] = "I64", [29] = "IQ1_M", [31] = "Q4_0_4_4", [32] = "Q4_0_4_8", [33] = "Q4_0_8_8",
    [34] = "TQ1_0", [35] = "TQ2_0", [36] = "IQ4_NL_4_4", [37] = "IQ4_NL_4_8", [38] = "IQ4_NL_8_8",
    [39] = "MXFP4",
};

const char *ebb_foreign_type_name(uint32_t type)
{
    return type < sizeof foreign_type_names / sizeof *foreign_type_names ? foreign_type_names[type] : NULL;
}

size_t ebb_row_bytes(uint32_t type, uint64_t n)
{
    const struct ebb_type_info *ti = ebb_type_info(type);
    if (!ti || n % ti->block_elems) return 0;
    uint64_t blocks = n / ti->block_elems;
    if (blocks > SIZE_MAX / ti->block_bytes) return 0;   /* would overflow size_t */
    return (size_t)(blocks * ti->block_bytes);
}
