/* Native GGUF products (kernels/cpu/native.h) against the dequantizers.
 *
 * The dequantizers of kernels/formats.c are checked against the gguf Python
 * package (tests/reference/test_dequant.py); here every native product must
 * equal the dot of the dequantized weight row with the dequantized
 * activations (q * d) up to float rounding, on random blocks of every byte
 * value. A misread layout (a wrong nibble, scale or bit) is off by whole
 * quantization steps, far beyond that tolerance. The activation quantizers
 * are checked for their rule: codes within [-127, 127], every value within
 * d/2 of d * code, the stored sums equal to the codes' sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kernels/cpu/native.h"
#include "kernels/formats.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static double uniform(void) { return next_u32() / 4294967296.0; }
static float gauss(void) {
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

/* Random bytes for n values of a type, with every f16 field (scales and
 * minimums) set to a finite half of moderate size so products stay finite. */
static void random_row(uint32_t type, uint8_t *w, int n) {
    const struct ebb_type_info *ti = ebb_type_info(type);
    const size_t bytes = ebb_row_bytes(type, (uint64_t)n);
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)next_u32();
    /* offsets of the f16 fields inside one block */
    int f16_at[2] = {-1, -1};
    switch (type) {
    case EBB_TYPE_Q4_0: case EBB_TYPE_Q5_0: case EBB_TYPE_Q8_0: f16_at[0] = 0; break;
    case EBB_TYPE_Q4_1: case EBB_TYPE_Q5_1: case EBB_TYPE_Q4_K: case EBB_TYPE_Q5_K: f16_at[0] = 0; f16_at[1] = 2; break;
    case EBB_TYPE_Q2_K: f16_at[0] = 80; f16_at[1] = 82; break;
    case EBB_TYPE_Q3_K: f16_at[0] = 108; break;
    case EBB_TYPE_Q6_K: f16_at[0] = 208; break;
    default: break;
    }
    for (size_t b = 0; b < bytes / ti->block_bytes; b++)
        for (int k = 0; k < 2; k++) {
            if (f16_at[k] < 0) continue;
            const float v = (float)(0.01 * gauss());
            const uint16_t h = ebb_f32_to_f16(v);
            w[b * ti->block_bytes + (size_t)f16_at[k]] = (uint8_t)(h & 0xff);
            w[b * ti->block_bytes + (size_t)f16_at[k] + 1] = (uint8_t)(h >> 8);
        }
}

struct act_buf {
    int8_t q[4096];
    float d[4096 / 32];
    int16_t sums[4096 / 16];
    float deq[4096];
};

static int is_k(uint32_t type) {
    return type == EBB_TYPE_Q2_K || type == EBB_TYPE_Q3_K || type == EBB_TYPE_Q4_K || type == EBB_TYPE_Q5_K ||
           type == EBB_TYPE_Q6_K;
}

static void quantize(uint32_t type, const float *x, int n, struct act_buf *a) {
    const int block = is_k(type) ? EBB_NATIVE_QK_K : EBB_NATIVE_QK;
    if (is_k(type)) ebb_native_quantize_q8k_scalar(x, n, a->q, a->d, a->sums);
    else ebb_native_quantize_q8b32_scalar(x, n, a->q, a->d, a->sums);
    for (int i = 0; i < n; i++) a->deq[i] = a->d[i / block] * (float)a->q[i];
}

static void test_quantizers(void) {
    float x[1024];
    struct act_buf a;
    int worst_ok = 1, sums_ok = 1;
    for (int rep = 0; rep < 50; rep++) {
        for (int i = 0; i < 1024; i++) x[i] = gauss() * (i % 37 == 5 ? 30.0f : 1.0f);
        for (int k = 0; k < 2; k++) {
            const int block = k ? EBB_NATIVE_QK_K : EBB_NATIVE_QK, per_sum = k ? 16 : 32;
            if (k) ebb_native_quantize_q8k_scalar(x, 1024, a.q, a.d, a.sums);
            else ebb_native_quantize_q8b32_scalar(x, 1024, a.q, a.d, a.sums);
            for (int i = 0; i < 1024; i++) {
                const float d = a.d[i / block];
                worst_ok &= a.q[i] >= -127;   /* int8 holds 127 at most; -128 must never appear */
                worst_ok &= fabsf(x[i] - d * (float)a.q[i]) <= d * 0.5f * (1 + 1e-6f) + 1e-30f;
            }
            for (int s = 0; s < 1024 / per_sum; s++) {
                int sum = 0;
                for (int i = 0; i < per_sum; i++) sum += a.q[s * per_sum + i];
                sums_ok &= sum == a.sums[s];
            }
        }
    }
    CHECK_MSG(worst_ok, "an activation code is out of range or off by more than half a step");
    CHECK_MSG(sums_ok, "a stored code sum differs from the codes");
    /* An all-zero block gets scale 0 and codes 0 (its neighbour is unaffected). */
    memset(x, 0, 32 * sizeof(float));
    x[40] = 3.0f;
    ebb_native_quantize_q8b32_scalar(x, 64, a.q, a.d, a.sums);
    CHECK(a.d[0] == 0 && a.q[0] == 0 && a.sums[0] == 0 && a.d[1] > 0 && a.q[40] != 0);
}

/* Every type, several widths, against the dequantized dot in double. */
static void test_products(void) {
    static const struct {
        uint32_t type;
        ebb_native_dot_fn dot;
    } types[] = {
        {EBB_TYPE_Q4_0, ebb_native_dot_q4_0_scalar}, {EBB_TYPE_Q4_1, ebb_native_dot_q4_1_scalar},
        {EBB_TYPE_Q5_0, ebb_native_dot_q5_0_scalar}, {EBB_TYPE_Q5_1, ebb_native_dot_q5_1_scalar},
        {EBB_TYPE_Q8_0, ebb_native_dot_q8_0_scalar}, {EBB_TYPE_Q2_K, ebb_native_dot_q2_k_scalar},
        {EBB_TYPE_Q3_K, ebb_native_dot_q3_k_scalar}, {EBB_TYPE_Q4_K, ebb_native_dot_q4_k_scalar},
        {EBB_TYPE_Q5_K, ebb_native_dot_q5_k_scalar}, {EBB_TYPE_Q6_K, ebb_native_dot_q6_k_scalar},
    };
    static uint8_t w[4096 * 2];
    static float wf[4096], x[4096];
    static struct act_buf a;
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const uint32_t type = types[t].type;
        const int widths_legacy[] = {32, 64, 576, 1536, 4096}, widths_k[] = {256, 1536, 4096};
        const int *widths = is_k(type) ? widths_k : widths_legacy;
        const int n_widths = is_k(type) ? 3 : 5;
        double worst = 0;
        for (int wi = 0; wi < n_widths; wi++)
            for (int rep = 0; rep < 20; rep++) {
                const int n = widths[wi];
                random_row(type, w, n);
                ebb_type_info(type)->to_f32(w, wf, (size_t)n);
                for (int i = 0; i < n; i++) x[i] = gauss() * (i % 29 == 3 ? 20.0f : 1.0f);
                quantize(type, x, n, &a);
                const struct ebb_native_act act = {a.q, a.d, a.sums};
                const float got = types[t].dot(w, &act, n);
                double want = 0, mag = 0;
                for (int i = 0; i < n; i++) {
                    want += (double)wf[i] * a.deq[i];
                    mag += fabs((double)wf[i] * a.deq[i]);
                }
                /* float rounding of the block scales' product and of the
                 * accumulation: a few ulps of the magnitude per block */
                const double err = fabs(got - want) / (mag + 1e-30);
                if (err > worst) worst = err;
            }
        CHECK_MSG(worst < 1e-5, "%s: native product differs from the dequantized dot by %.3g of its magnitude",
                  ebb_type_info(type)->name, worst);
        printf("%-5s native product vs dequantized dot: worst %.2g of the magnitude\n", ebb_type_info(type)->name,
               worst);
    }
}

int main(void) {
    test_quantizers();
    test_products();
    return check_report("test_native");
}
