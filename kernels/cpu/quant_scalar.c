/* Quantized ops, portable scalar version: the reference the SIMD paths must
 * match bit for bit, and the fallback for processors without AVX2.
 *
 * Each function is the definition of its op written out plainly (the float
 * steps are the ones ops.h spells out); speed is not a goal here beyond
 * keeping the tests quick. Integer dot products are exact in int32: a W4G64
 * group sums at most 64 * 8 * 127 = 65024 in magnitude.
 *
 * The output accumulation uses fmaf() explicitly rather than `acc += a * b`:
 * the SIMD paths fuse that multiply-add into one instruction, and spelling the
 * fusion out keeps this file right even if it is ever compiled with FMA
 * enabled (where the compiler could otherwise contract some expressions and
 * not others).
 */
#include "kernels/cpu/ops.h"
#include "kernels/formats.h"

#include <math.h>


static float block_scale(const uint8_t *b) { return ebb_f16_to_f32((uint16_t)(b[0] | (b[1] << 8))); }

/* ------------------------------------------------------- activation quant */

static void quantize_group(const float *x, float qmax, int8_t *q, float *s)
{
    float amax = 0;
    for (int i = 0; i < EBB_ACT_GROUP; i++) if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
    float inv = act_inverse(amax, qmax, s);
    for (int i = 0; i < EBB_ACT_GROUP; i++) {
        float r = roundf(x[i] * inv);
        r = r > qmax ? qmax : r < -qmax ? -qmax : r;     /* cannot trigger; kept as in SIMD */
        q[i] = (int8_t)r;
    }
}

void ebb_cpu_quantize_act_scalar(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{
    act_each_group(x, n_tok, n, n_hi, q, s, quantize_group);
}

/* ---------------------------------------------------------------- matmuls */

/* One output: weight row w against one token's codes q and group scales s. */
typedef float (*row_dot_fn)(const uint8_t *w, const int8_t *q, const float *s, int n_in);

static float row_w4g64(const uint8_t *w, const int8_t *q, const float *s, int n_in)
{
    float acc = 0;
    for (int g = 0; g < n_in / EBB_W4G64_GROUP; g++, w += EBB_W4G64_BLOCK_BYTES, q += EBB_W4G64_GROUP) {
        const uint8_t *qs = w + 2;
        int32_t isum = 0;
        for (int j = 0; j < EBB_W4G64_GROUP / 2; j++)
            isum += ((qs[j] & 0x0f) - 8) * q[j] + ((qs[j] >> 4) - 8) * q[j + EBB_W4G64_GROUP / 2];
        acc = fmaf((float)isum, block_scale(w) * s[g], acc);
    }
    return acc;
}

/* Every output of the rectangle, one row_dot each. */
static inline void each_output(const struct matmul_args *a, int t0, int t1, int o0, int o1, row_dot_fn dot)
{
    int groups = a->n_in / EBB_ACT_GROUP;
    for (int t = t0; t < t1; t++)
        for (int o = o0; o < o1; o++)
            a->out[(size_t)t * a->n_out + o] = dot(weight_row(a, o), a->x.q + (size_t)t * a->n_in,
                                                   a->x.s + (size_t)t * groups, a->n_in);
}

static void block_w4g64(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    each_output(a, t0, t1, o0, o1, row_w4g64);
}

EBB_CPU_MATMUL(ebb_cpu_matmul_w4g64_scalar, EBB_TYPE_W4G64, block_w4g64, 1, 1)

/* -------------------------------------------------------------- hadamard64 */

/* The butterfly order every path follows: stages h = 1, 2, 4, ..., 32; in a
 * stage, each pair (j, j + h) with bit h of j clear becomes (a + b, a - b).
 * Each stage's values are fixed functions of the previous stage's, so any
 * implementation that runs the same stages in the same order gets the same
 * bits. The 1/8 comes last (a power of two: exact unless a result is
 * subnormal). The result is x times the Sylvester Hadamard matrix H[i][j] =
 * (-1)^popcount(i & j), over 8. */
void ebb_cpu_hadamard64_scalar(float *x, int n)
{
    for (int b = 0; b + 64 <= n; b += 64, x += 64) {
        for (int h = 1; h < 64; h <<= 1)
            for (int i = 0; i < 64; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float u = x[j], v = x[j + h];
                    x[j] = u + v;
                    x[j + h] = u - v;
                }
        for (int j = 0; j < 64; j++) x[j] *= 0.125f;
    }
}
