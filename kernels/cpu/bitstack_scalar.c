/* BitStack's sign product, the scalar reference (backend.h defines it):
 * every other path gives these bits. */
#include "kernels/cpu/ops.h"

#include <math.h>

void ebb_cpu_bitstack_signs_scalar(float *out, const uint8_t *signs, const uint16_t *u, int rank, const int8_t *t,
                                   const float *ts, int n, int n_rows) {
    const size_t row_bytes = (size_t)n / 8;
    for (int o = 0; o < n_rows; o++) {
        const uint8_t *s = signs + (size_t)o * row_bytes;
        float acc = 0;
        for (int j = 0; j < rank; j++) {
            const int8_t *tj = t + (size_t)j * n;
            int32_t isum = 0;
            for (int i = 0; i < n; i++) isum += (s[i >> 3] >> (i & 7)) & 1 ? -tj[i] : tj[i];
            acc = fmaf((float)isum, ebb_f16_to_f32(u[(size_t)o * rank + j]) * ts[j], acc);
        }
        out[o] += acc;
    }
}
