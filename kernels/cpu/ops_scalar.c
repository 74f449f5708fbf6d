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
        const float *xt = a->x.f + (size_t)t * a->n_in;
        float *ot = a->out + (size_t)t * a->n_out;
        for (int o = o0; o < o1; o++)
            ot[o] = dot_scalar(xt, (const float *)(const void *)weight_row(a, o), a->n_in);
    }
}

EBB_CPU_MATMUL(ebb_cpu_matmul_f32_scalar, EBB_TYPE_F32, matmul_block_scalar, 1, 3)

void ebb_cpu_add_scalar(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += x[i];
}

void ebb_cpu_rmsnorm_scalar(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = dot_scalar(x, x, n);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * g[i];
}

void ebb_cpu_softmax_scalar(float *x, int n)
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

void ebb_cpu_swiglu_scalar(float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
