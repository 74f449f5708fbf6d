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
 *
 * The SIMD paths (native_x86.h) this CPU can run must give the scalar path's
 * bits: quantizers' codes, scales and sums, and every rectangle's outputs on
 * edge shapes (one block, odd block counts, rows and tokens around the tile
 * sizes, rectangles off the origin), with outlier channels and all-zero
 * activation blocks; a token computed alone equals it inside a rectangle.
 *
 * EBB_NATIVE_BENCH=1 also prints single-thread timings (not a test).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "testdata.h"
#include "kernels/backend.h"
#include "kernels/cpu/native.h"
#include "kernels/formats.h"

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
    else ebb_native_quantize_q8b32_scalar(x, n, n / EBB_NATIVE_QK, a->q, a->d, a->sums);
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
            /* Q8B32 with its leading n_hi blocks at 8 bits, the rest at 4 */
            const int n_hi = rep % 3 == 0 ? 1024 / 32 : rep % 33;
            if (k) ebb_native_quantize_q8k_scalar(x, 1024, a.q, a.d, a.sums);
            else ebb_native_quantize_q8b32_scalar(x, 1024, n_hi, a.q, a.d, a.sums);
            for (int i = 0; i < 1024; i++) {
                const float d = a.d[i / block];
                const int qmax = k || i / 32 < n_hi ? 127 : 7;
                worst_ok &= a.q[i] >= -qmax && a.q[i] <= qmax;   /* -128 must never appear */
                worst_ok &= fabsf(x[i] - d * (float)a.q[i]) <= d * 0.5f * (1 + 1e-6f) + 1e-30f;
            }
            /* the block's largest value takes qmax itself */
            if (!k) {
                int hits_max = 0;
                for (int i = 0; i < 32; i++) hits_max |= abs(a.q[32 * (n_hi < 32 ? n_hi : 0) + i]) == (n_hi < 32 ? 7 : 127);
                worst_ok &= hits_max;
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
    ebb_native_quantize_q8b32_scalar(x, 64, 2, a.q, a.d, a.sums);
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
        {EBB_TYPE_W2G64, ebb_native_dot_w2g64_scalar},
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
                if (n % (int)ebb_type_info(type)->block_elems) continue;   /* W2G64: 64 */
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


/* ------------------------------------------------------------ SIMD paths */

#define N_NATIVE 11   /* the native GGUF types and W2G64 */
struct isa {
    const char *name;
    int can_run;
    void (*q8b32)(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums);
    void (*q8k)(const float *x, int n, int8_t *q, float *d, int16_t *sums);
    ebb_native_block_fn blocks[N_NATIVE];   /* in the order of native_types */
};

#define ISA_BLOCKS(isa) \
    { ebb_native_block_q4_0_##isa, ebb_native_block_q4_1_##isa, ebb_native_block_q5_0_##isa, \
      ebb_native_block_q5_1_##isa, ebb_native_block_q8_0_##isa, ebb_native_block_q2_k_##isa, \
      ebb_native_block_q3_k_##isa, ebb_native_block_q4_k_##isa, ebb_native_block_q5_k_##isa, \
      ebb_native_block_q6_k_##isa, ebb_native_block_w2g64_##isa }

static const uint32_t native_types[N_NATIVE] = {EBB_TYPE_Q4_0, EBB_TYPE_Q4_1, EBB_TYPE_Q5_0, EBB_TYPE_Q5_1,
                                                EBB_TYPE_Q8_0, EBB_TYPE_Q2_K, EBB_TYPE_Q3_K, EBB_TYPE_Q4_K,
                                                EBB_TYPE_Q5_K, EBB_TYPE_Q6_K, EBB_TYPE_W2G64};

/* The paths, scalar first; can_run as backend_cpu.c decides it. */
#define N_ISAS 4
static struct isa isas[N_ISAS] = {
    {"scalar", 1, ebb_native_quantize_q8b32_scalar, ebb_native_quantize_q8k_scalar, ISA_BLOCKS(scalar)},
    {"avx2", 0, ebb_native_quantize_q8b32_avx2, ebb_native_quantize_q8k_avx2, ISA_BLOCKS(avx2)},
    {"avx512", 0, ebb_native_quantize_q8b32_avx512, ebb_native_quantize_q8k_avx512, ISA_BLOCKS(avx512)},
    /* AMX's quantizers are AVX-512's */
    {"amx", 0, ebb_native_quantize_q8b32_avx512, ebb_native_quantize_q8k_avx512, ISA_BLOCKS(amx)},
};

static void find_isas(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    isas[1].can_run = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    isas[2].can_run = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
#endif
    isas[3].can_run = ebb_cpu_amx_usable();
    for (int i = 1; i < N_ISAS; i++)
        if (!isas[i].can_run) printf("test_native: %s path not run (this CPU lacks it)\n", isas[i].name);
}

static void test_simd_quantizers(void) {
    enum { N = 2048 };
    static float x[N];
    static int8_t q[2][N];
    static float d[2][N / 32];
    static int16_t s[2][N / 16];
    for (int i = 1; i < N_ISAS; i++) {
        if (!isas[i].can_run) continue;
        int same = 1;
        for (int rep = 0; rep < 200; rep++) {
            random_acts(x, 1, N, 1);
            const int n = 256 * (1 + rep % 8);
            memset(q, 0x55, sizeof q), memset(d, 0x55, sizeof d), memset(s, 0x55, sizeof s);
            ebb_native_quantize_q8k_scalar(x, n, q[0], d[0], s[0]);
            isas[i].q8k(x, n, q[1], d[1], s[1]);
            same &= memcmp(q[0], q[1], sizeof q[0]) == 0 && memcmp(d[0], d[1], sizeof d[0]) == 0 &&
                    memcmp(s[0], s[1], sizeof s[0]) == 0;
            ebb_native_quantize_q8b32_scalar(x, n, n / 32, q[0], d[0], s[0]);
            isas[i].q8b32(x, n, n / 32, q[1], d[1], s[1]);
            same &= memcmp(q[0], q[1], sizeof q[0]) == 0 && memcmp(d[0], d[1], sizeof d[0]) == 0 &&
                    memcmp(s[0], s[1], sizeof s[0]) == 0;
            /* Q8B32 at an odd number of blocks, some of them 4-bit */
            const int odd = 32 * (2 * rep + 1) % N, n_hi = rep % 5 == 0 ? 0 : (rep * 7) % 40;
            ebb_native_quantize_q8b32_scalar(x, odd, n_hi, q[0], d[0], s[0]);
            isas[i].q8b32(x, odd, n_hi, q[1], d[1], s[1]);
            same &= memcmp(q[0], q[1], sizeof q[0]) == 0 && memcmp(d[0], d[1], sizeof d[0]) == 0 &&
                    memcmp(s[0], s[1], sizeof s[0]) == 0;
        }
        CHECK_MSG(same, "%s: an activation quantizer differs from the scalar one", isas[i].name);
    }
}

/* One problem: weights of n_out rows, n_tok tokens' activations in the
 * type's form (edges: random_acts' edge cases; timings go without, since
 * subnormal scales slow every path down). */
struct problem {
    uint32_t type;
    int n_tok, n_in, n_out;
    size_t row_bytes;
    uint8_t *w;
    int8_t *q;
    float *d;
    int16_t *sums;
};

static void problem_make(struct problem *p, uint32_t type, int n_tok, int n_in, int n_out, int edges) {
    p->type = type, p->n_tok = n_tok, p->n_in = n_in, p->n_out = n_out;
    p->row_bytes = ebb_row_bytes(type, (uint64_t)n_in);
    p->w = malloc(p->row_bytes * (size_t)n_out);
    p->q = malloc((size_t)n_tok * n_in);
    p->d = malloc((size_t)n_tok * (n_in / 32) * sizeof(float));
    p->sums = malloc((size_t)n_tok * (n_in / 16) * sizeof(int16_t));
    float *x = malloc((size_t)n_tok * n_in * sizeof(float));
    if (!p->w || !p->q || !p->d || !p->sums || !x) abort();
    for (int o = 0; o < n_out; o++) random_row(type, p->w + (size_t)o * p->row_bytes, n_in);
    random_acts(x, n_tok, n_in, edges);
    const int k = is_k(type), per_d = k ? 256 : 32, per_sum = k ? 16 : 32;
    for (int t = 0; t < n_tok; t++) {
        const float *xt = x + (size_t)t * n_in;
        int8_t *q = p->q + (size_t)t * n_in;
        float *d = p->d + (size_t)t * (n_in / per_d);
        int16_t *sums = p->sums + (size_t)t * (n_in / per_sum);
        /* every other token as a source-exact W4A4 file has it: half its blocks 4-bit */
        if (k) ebb_native_quantize_q8k_scalar(xt, n_in, q, d, sums);
        else ebb_native_quantize_q8b32_scalar(xt, n_in, t % 2 ? n_in / 64 : n_in / 32, q, d, sums);
    }
    free(x);
}

static void problem_free(struct problem *p) {
    free(p->w), free(p->q), free(p->d), free(p->sums);
}

static void run_block(ebb_native_block_fn f, const struct problem *p, float *out, int t0, int t1, int o0, int o1) {
    const struct ebb_native_matmul_args a = {out, p->q, p->d, p->sums, p->w, p->row_bytes, p->n_tok, p->n_in,
                                             p->n_out};
    f(&a, t0, t1, o0, o1);
}

/* Every SIMD rectangle equals the scalar one bit for bit, untouched outside
 * itself, and each token alone equals itself inside the rectangle. */
static void test_simd_blocks(void) {
    /* 18 from 2: a 16-row tile off the origin; 8 tokens fill a group of
     * row16_rows, 17 and 18 start a second; 26 (and 25 from 1) reach AMX past
     * row16_rows */
    static const int counts[] = {1, 2, 3, 4, 5, 7, 8, 17, 18, 26};
    const int nc = (int)(sizeof counts / sizeof *counts);
    for (int ty = 0; ty < N_NATIVE; ty++) {
        const uint32_t type = native_types[ty];
        const int blocks[] = {1, 3, 5, 18};   /* 18 blocks of 32: 576 */
        int same[N_ISAS] = {1, 1, 1, 1}, alone[N_ISAS] = {1, 1, 1, 1}, outside[N_ISAS] = {1, 1, 1, 1};
        for (int bi = 0; bi < 4; bi++) {
            const int n_in = blocks[bi] * (is_k(type) ? 256 : type == EBB_TYPE_W2G64 ? 64 : 32);
            for (int ti = 0; ti < nc; ti++)
                for (int oi = 0; oi < nc; oi++) {
                    const int n_tok = counts[ti], n_out = counts[oi];
                    struct problem p;
                    problem_make(&p, type, n_tok, n_in, n_out, 1);
                    const size_t n_res = (size_t)n_tok * n_out;
                    float *want = malloc(n_res * sizeof(float)), *got = malloc(n_res * sizeof(float));
                    float *one = malloc(n_res * sizeof(float));
                    if (!want || !got || !one) abort();
                    run_block(isas[0].blocks[ty], &p, want, 0, n_tok, 0, n_out);
                    /* a rectangle off the origin when there is room */
                    const int t0 = n_tok > 2 ? 1 : 0, o0 = n_out > 2 ? 2 : 0;
                    for (int i = 1; i < N_ISAS; i++) {
                        if (!isas[i].can_run) continue;
                        memset(got, 0xff, n_res * sizeof(float));   /* NaN: not written */
                        run_block(isas[i].blocks[ty], &p, got, 0, n_tok, 0, n_out);
                        same[i] &= memcmp(want, got, n_res * sizeof(float)) == 0;
                        memset(got, 0xff, n_res * sizeof(float));
                        run_block(isas[i].blocks[ty], &p, got, t0, n_tok, o0, n_out);
                        for (int t = 0; t < n_tok; t++)
                            for (int o = 0; o < n_out; o++) {
                                const size_t at = (size_t)t * n_out + o;
                                if (t >= t0 && o >= o0) same[i] &= memcmp(&want[at], &got[at], sizeof(float)) == 0;
                                else outside[i] &= isnan(got[at]);
                            }
                        /* batch invariance: each token alone, in one call per token */
                        for (int t = 0; t < n_tok; t++) run_block(isas[i].blocks[ty], &p, one, t, t + 1, 0, n_out);
                        run_block(isas[i].blocks[ty], &p, got, 0, n_tok, 0, n_out);
                        alone[i] &= memcmp(one, got, n_res * sizeof(float)) == 0;
                    }
                    free(want), free(got), free(one);
                    problem_free(&p);
                }
        }
        for (int i = 1; i < N_ISAS; i++) {
            if (!isas[i].can_run) continue;
            CHECK_MSG(same[i], "%s %s: a rectangle differs from the scalar path", isas[i].name,
                      ebb_type_info(type)->name);
            CHECK_MSG(outside[i], "%s %s: a rectangle wrote outside itself", isas[i].name, ebb_type_info(type)->name);
            CHECK_MSG(alone[i], "%s %s: a token alone differs from it inside a rectangle", isas[i].name,
                      ebb_type_info(type)->name);
        }
    }
}

/* The largest integer sums a product can meet, where a path's int16 steps
 * would saturate if it summed too many: every byte but the f16 fields
 * 0xff (each type's largest unsigned codes and scales; Q8_0's 0x80, the
 * largest magnitude) against activations all +127 and all -127, 8 and 9
 * tokens (a full group in registers and one past), 16 and 24 rows. Random
 * data never comes near (row8's Q5_K summing 8 steps of 5-bit codes into
 * an int16 passed the rectangles above). */
static void test_extreme_sums(void) {
    for (int ty = 0; ty < N_NATIVE; ty++) {
        const uint32_t type = native_types[ty];
        const int n_in = 2 * (is_k(type) ? 256 : type == EBB_TYPE_W2G64 ? 64 : 32);
        int same[N_ISAS] = {1, 1, 1, 1};
        for (int sign = -1; sign <= 1; sign += 2)
            for (int n_tok = 8; n_tok <= 9; n_tok++)
                for (int n_out = 16; n_out <= 24; n_out += 8) {
                    struct problem p;
                    problem_make(&p, type, n_tok, n_in, n_out, 0);
                    for (int o = 0; o < n_out; o++)
                        filled_row(type, p.w + (size_t)o * p.row_bytes, n_in, type == EBB_TYPE_Q8_0 ? 0x80 : 0xff);
                    float *x = malloc((size_t)n_in * sizeof(float));
                    if (!x) abort();
                    for (int i = 0; i < n_in; i++) x[i] = (float)sign;
                    const int k = is_k(type);
                    for (int t = 0; t < n_tok; t++) {   /* every code +-127 */
                        int8_t *q = p.q + (size_t)t * n_in;
                        float *d = p.d + (size_t)t * (n_in / (k ? 256 : 32));
                        int16_t *sums = p.sums + (size_t)t * (n_in / (k ? 16 : 32));
                        if (k) ebb_native_quantize_q8k_scalar(x, n_in, q, d, sums);
                        else ebb_native_quantize_q8b32_scalar(x, n_in, n_in / 32, q, d, sums);
                        CHECK(q[0] == 127 * sign && q[n_in - 1] == 127 * sign);
                    }
                    free(x);
                    const size_t n_res = (size_t)n_tok * n_out;
                    float *want = malloc(n_res * sizeof(float)), *got = malloc(n_res * sizeof(float));
                    if (!want || !got) abort();
                    run_block(isas[0].blocks[ty], &p, want, 0, n_tok, 0, n_out);
                    for (int i = 1; i < N_ISAS; i++) {
                        if (!isas[i].can_run) continue;
                        run_block(isas[i].blocks[ty], &p, got, 0, n_tok, 0, n_out);
                        same[i] &= memcmp(want, got, n_res * sizeof(float)) == 0;
                    }
                    free(want), free(got);
                    problem_free(&p);
                }
        for (int i = 1; i < N_ISAS; i++)
            if (isas[i].can_run)
                CHECK_MSG(same[i], "%s %s: the largest sums differ from the scalar path (an int16 step saturated?)",
                          isas[i].name, ebb_type_info(type)->name);
    }
}

/* The op table: each path's matmul[type] for every native type names the
 * activation form the type pairs with, and through the driver (threads
 * splitting rows and tokens) gives the scalar rectangle's bits, at a width
 * within one chunk of the AVX-512 prefill's packed blocks and one past two. */
static void test_op_table(void) {
    struct ebb_pool *pools[2] = {ebb_pool_create(2), ebb_pool_create(3)};
    CHECK(pools[0] && pools[1]);
    for (int i = 0; i < N_ISAS; i++) {
        const struct ebb_backend *be = ebb_backend_cpu_named(isas[i].name);
        if (!isas[i].can_run) continue;
        CHECK_MSG(be != NULL, "no %s backend", isas[i].name);
        if (!be) continue;
        for (int ty = 0; ty < N_NATIVE; ty++) {
            const uint32_t type = native_types[ty];
            const char *name = ebb_type_info(type)->name;
            CHECK_MSG(ebb_type_info(type)->act == (is_k(type) ? EBB_ACT_Q8K : EBB_ACT_Q8B32),
                      "%s pairs with the wrong activation form", name);
            CHECK_MSG(be->matmul[type] != NULL, "%s has no %s product", be->name, name);
            if (!be->matmul[type]) continue;
            /* widths past one 32-block chunk of the AVX-512 prefill (65 blocks: 32 + 32 + 1) */
            for (int wi = 0; wi < 2; wi++) {
            struct problem p;
            problem_make(&p, type, 37, is_k(type) ? 512 * (1 + 3 * wi) : wi ? (type == EBB_TYPE_W2G64 ? 2112 : 2080) : 576,
                         45, 1);
            const size_t n_res = (size_t)p.n_tok * p.n_out;
            float *want = malloc(n_res * sizeof(float)), *got = malloc(n_res * sizeof(float));
            if (!want || !got) abort();
            run_block(isas[0].blocks[ty], &p, want, 0, p.n_tok, 0, p.n_out);
            const struct ebb_act x = {.q = p.q, .s = p.d, .sums = p.sums};
            for (int k = 0; k < 2; k++) {
                memset(got, 0xff, n_res * sizeof(float));
                be->matmul[type](pools[k], got, &x, p.w, p.n_tok, p.n_in, p.n_out);
                CHECK_MSG(memcmp(want, got, n_res * sizeof(float)) == 0, "%s matmul[%s] with %d threads differs",
                          be->name, name, ebb_pool_threads(pools[k]));
            }
            free(want), free(got);
            problem_free(&p);
            }
        }
    }
    ebb_pool_destroy(pools[0]);
    ebb_pool_destroy(pools[1]);
}

/* ------------------------------------------------------------- timings */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Seconds per call of a rectangle over the whole problem (best of a few). */
static double time_block(ebb_native_block_fn f, const struct problem *p, float *out) {
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        int calls = 0;
        const double t0 = now_s();
        double t1;
        do {
            run_block(f, p, out, 0, p->n_tok, 0, p->n_out);
            calls++;
            t1 = now_s();
        } while (t1 - t0 < 0.05);
        if ((t1 - t0) / calls < best) best = (t1 - t0) / calls;
    }
    return best;
}

static void bench(void) {
    static const struct {
        const char *what;
        int n_tok, n_in, n_out;
    } shapes[] = {
        {"decode 1x1536x576", 1, 576, 1536}, {"decode 1x4096x4096", 1, 4096, 4096}, {"prefill 64x1536x576", 64, 576, 1536},
        {"prefill 64x4096x4096", 64, 4096, 4096},
        /* a few tokens against matrices that stream from memory (a verification pass,
         * a dozen sequences decoding): an 8B model's FFN and this model's head */
        {"verify 16x14336x4096", 16, 4096, 14336}, {"verify 12x49152x576", 12, 576, 49152},
    };
    printf("single thread; decode in GB/s of weights, prefill in GMAC/s\n");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int ty = 0; ty < N_NATIVE; ty++) {
            const uint32_t type = native_types[ty];
            int n_in = shapes[s].n_in;
            if (is_k(type) && n_in % 256) n_in = 512;   /* 576 is no multiple of 256: the nearest */
            struct problem p;
            problem_make(&p, type, shapes[s].n_tok, n_in, shapes[s].n_out, 0);
            float *out = malloc((size_t)p.n_tok * p.n_out * sizeof(float));
            if (!out) abort();
            printf("%-22s %-5s n_in %4d", shapes[s].what, ebb_type_info(type)->name, n_in);
            for (int i = 0; i < N_ISAS; i++) {
                if (!isas[i].can_run) continue;
                const double sec = time_block(isas[i].blocks[ty], &p, out);
                if (p.n_tok == 1) printf("  %s %6.2f GB/s", isas[i].name, p.row_bytes * p.n_out / sec * 1e-9);
                else printf("  %s %6.2f GMAC/s", isas[i].name, (double)p.n_tok * n_in * p.n_out / sec * 1e-9);
            }
            printf("\n");
            free(out);
            problem_free(&p);
        }
}

int main(void) {
    find_isas();
    test_quantizers();
    test_products();
    test_simd_quantizers();
    test_simd_blocks();
    test_extreme_sums();
    test_op_table();
    if (getenv("EBB_NATIVE_BENCH")) bench();
    return check_report("test_native");
}
