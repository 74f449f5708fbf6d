/* BitStack's sign products, the scalar reference (backend.h defines them):
 * integer sums, so every other path gives exactly these. */
#include "kernels/cpu/ops.h"

#include <math.h>

void ebb_cpu_bitstack_isums_scalar(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec,
                                   int n) {
    const size_t row_bytes = (size_t)n / 8;
    for (int o = 0; o < n_rows; o++) {
        const uint8_t *s = signs + (size_t)o * row_bytes;
        for (int v = 0; v < n_vec; v++) {
            const int8_t *tv = t + (size_t)v * n;
            int32_t sum = 0;
            for (int i = 0; i < n; i++) sum += (s[i >> 3] >> (i & 7)) & 1 ? -tv[i] : tv[i];
            isum[(size_t)o * n_vec + v] = sum;
        }
    }
}

void ebb_cpu_bitstack_codes_scalar(const float *x, const float *v, int n, int8_t *q, float *scale) {
    float amax = 0;
    for (int i = 0; i < n; i++) {
        const float y = fabsf(v[i] * x[i]);
        amax = y > amax ? y : amax;
    }
    const float inv = act_inverse(amax, 127.0f, scale);
    for (int i = 0; i < n; i++) {
        const float y = v[i] * x[i];
        q[i] = (int8_t)roundf(y * inv);
    }
}

void ebb_cpu_bitstack_scale_add_scalar(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok,
                                   int rank, const float *u, const float *ts) {
    bitstack_scale_add_body(out, out_stride, isum, n_rows, n_tok, rank, u, ts);
}
