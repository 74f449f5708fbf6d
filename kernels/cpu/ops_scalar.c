/* Portable scalar kernels: the reference every SIMD path is tested against,
 * and the fallback for processors without AVX2.
 *
 * Written for clarity over speed: each output is one plain dot product. Dot
 * products keep four partial sums (the same rounding behaviour class as the
 * SIMD paths, which also sum in lanes, and four times fewer dependent adds
 * than one running sum); everything else is the textbook formula with libm's
 * expf. The matmul still splits its work across the pool through the shared
 * driver, so threaded and unthreaded runs can be compared on every path.
 */
#include "kernels/cpu/ops.h"

#include <math.h>

static float dot_scalar(const float *a, const float *b, int n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void matmul_block_scalar(const struct matmul_args *a, int t0, int t1, int o0, int o1)
{
    for (int t = t0; t < t1; t++) {
        const float *xt = a->x + (size_t)t * a->n_in;
        float *ot = a->out + (size_t)t * a->n_out;
        for (int o = o0; o < o1; o++) ot[o] = dot_scalar(xt, a->w + (size_t)o * a->n_in, a->n_in);
    }
}

static void matmul_scalar(struct ebb_pool *pool, float *out, const float *x, const float *w,
                          int n_tok, int n_in, int n_out)
{
    ebb_cpu_matmul_drive(pool, matmul_block_scalar, 1, out, x, w, n_tok, n_in, n_out);
}

static void axpy_scalar(float *y, float alpha, const float *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += alpha * x[i];
}

static void add_scalar(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += x[i];
}

static void rmsnorm_scalar(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = dot_scalar(x, x, n);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * g[i];
}

static void softmax_scalar(float *x, int n)
{
    if (n <= 0) return;
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

static void swiglu_scalar(float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

const struct ebb_backend ebb_cpu_scalar = {
    .name = "scalar",
    .matmul_f32 = matmul_scalar,
    .dot_f32 = dot_scalar,
    .axpy_f32 = axpy_scalar,
    .rmsnorm_f32 = rmsnorm_scalar,
    .softmax_f32 = softmax_scalar,
    .swiglu_f32 = swiglu_scalar,
    .add_f32 = add_scalar,
    .quantize_act = ebb_cpu_quantize_act_scalar,         /* quant_scalar.c */
    .matmul_w4a8 = ebb_cpu_matmul_w4a8_scalar,
    .matmul_q8a8 = ebb_cpu_matmul_q8a8_scalar,
    .hadamard64 = ebb_cpu_hadamard64_scalar,
};
