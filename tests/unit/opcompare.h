/* One backend's op table held against another's, op by op, on random cases
 * and edge shapes: the harness of test_cuda_math (the CUDA arithmetic run on
 * the CPU) and of the GPU suite (tests/gpu: the CUDA backend itself).
 *
 * `ref` is a CPU path (the scalar one). `test` may keep its tensors in its
 * own memory (backend.h's struct ebb_backend_memory): inputs are copied in
 * through it, outputs read back, and every failure of that memory is a
 * failed check naming the reason. Ops whose contract is bit-exact (the
 * quantized products, quantizers, Hadamard, attention and KV-row ops,
 * BitStack's) are compared bit for bit; the f32 ops whose contract allows
 * the path's own summation order and exp (f32 matmul, rmsnorm, softmax,
 * SwiGLU) within a relative tolerance. An entry `test` leaves NULL is
 * reported as not compared, never as passed.
 */
#ifndef EBB_TEST_OPCOMPARE_H
#define EBB_TEST_OPCOMPARE_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/kv.h"
#include "kernels/backend.h"
#include "kernels/formats.h"
#include "testdata.h"

static const struct ebb_backend *oc_test;
static int oc_not_compared;
/* Set by harnesses whose backend exponentiates and sums softmax in the
 * scalar path's order (the CPU-side ones): the fused attention must then
 * give its bits, not only agree within float error. */
static int oc_exact_softmax;
/* A table whose attention splits queries from this position on (sums in
 * another order) is held to the tolerance there even when exact elsewhere. */
static int oc_attend_split_from = 1 << 30;

static void *oc_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) abort();
    return p;
}

/* A copy of host bytes in the test backend's memory. */
static void *oc_put(const void *host, size_t bytes)
{
    const struct ebb_backend_memory *m = oc_test->memory;
    if (!m) {
        void *p = oc_xmalloc(bytes);
        memcpy(p, host, bytes);
        return p;
    }
    void *p = m->alloc(bytes ? bytes : 1);
    CHECK_MSG(p != NULL, "%s: alloc(%zu): %s", oc_test->name, bytes, m->error());
    if (!p) abort();
    CHECK_MSG(m->upload(p, host, bytes) == 0, "%s: upload: %s", oc_test->name, m->error());
    return p;
}

static void oc_get(void *host, const void *dev, size_t bytes)
{
    const struct ebb_backend_memory *m = oc_test->memory;
    if (!m) {
        memcpy(host, dev, bytes);
        return;
    }
    CHECK_MSG(m->download(host, dev, bytes) == 0, "%s: download: %s", oc_test->name, m->error());
}

static void oc_free(void *p)
{
    if (oc_test->memory) oc_test->memory->release(p);
    else free(p);
}

static int oc_same_bits(const void *a, const void *b, size_t bytes, const char *what)
{
    if (memcmp(a, b, bytes) == 0) return 1;
    const uint8_t *x = a, *y = b;
    size_t i = 0;
    while (x[i] == y[i]) i++;
    fprintf(stderr, "%s: %s differs from the scalar path first at byte %zu\n", oc_test->name, what, i);
    return 0;
}

/* |a - b| <= tol * max |a|, elementwise: for sums whose terms cancel (an
 * attention output over a long cache), where an element's own size says
 * little of the error its order of summation may carry. */
static int oc_close_scaled(const float *a, const float *b, size_t n, float tol, const char *what)
{
    float big = 0;
    for (size_t i = 0; i < n; i++) big = fmaxf(big, fabsf(a[i]));
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(a[i] - b[i]) <= tol * big)) {
            fprintf(stderr, "%s: %s differs at %zu: %.9g vs the scalar path's %.9g (largest %.9g)\n", oc_test->name,
                    what, i, (double)b[i], (double)a[i], (double)big);
            return 0;
        }
    return 1;
}

/* |a - b| <= tol * (|a| + |b|) + tiny, elementwise. */
static int oc_close(const float *a, const float *b, size_t n, float tol, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        const float d = fabsf(a[i] - b[i]), s = fabsf(a[i]) + fabsf(b[i]);
        if (!(d <= tol * s + 1e-30f)) {
            fprintf(stderr, "%s: %s differs at %zu: %.9g vs the scalar path's %.9g\n", oc_test->name, what, i,
                    (double)b[i], (double)a[i]);
            return 0;
        }
    }
    return 1;
}

static int oc_has(const void *entry, const char *what)
{
    if (entry) return 1;
    printf("%s: %s not compared (no such entry)\n", oc_test->name, what);
    oc_not_compared++;
    return 0;
}

static float *oc_floats(size_t n, float scale)
{
    float *v = oc_xmalloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = gauss() * scale;
    return v;
}

/* ------------------------------------------------------------- products */

static int oc_is_k(uint32_t type)
{
    return type == EBB_TYPE_Q2_K || type == EBB_TYPE_Q3_K || type == EBB_TYPE_Q4_K || type == EBB_TYPE_Q5_K ||
           type == EBB_TYPE_Q6_K;
}

/* One matmul of `type`: n_out random rows, n_tok tokens quantized by ref in
 * the type's activation form (W4G64: n_hi varied; the legacy types: every
 * other token with 4-bit blocks, as a source-exact file). */
static void oc_matmul(const struct ebb_backend *ref, uint32_t type, int n_tok, int n_in, int n_out)
{
    const struct ebb_type_info *ti = ebb_type_info(type);
    const size_t rb = ebb_row_bytes(type, (uint64_t)n_in), wbytes = rb * (size_t)n_out;
    uint8_t *w = oc_xmalloc(wbytes);
    float *x = oc_xmalloc((size_t)n_tok * n_in * sizeof *x);
    int8_t *q = oc_xmalloc((size_t)n_tok * n_in);
    const int blocks = n_in / 32;
    float *d = oc_xmalloc((size_t)n_tok * blocks * sizeof *d);
    int16_t *sums = oc_xmalloc((size_t)n_tok * (n_in / 16) * sizeof *sums);
    size_t d_bytes = 0, sum_bytes = 0;
    struct ebb_act a = {0};
    if (type == EBB_TYPE_F32) {
        for (int i = 0; i < n_out * n_in; i++) ((float *)(void *)w)[i] = gauss();
        random_acts(x, n_tok, n_in, 0);
    } else {
        for (int o = 0; o < n_out; o++) random_row(type, w + (size_t)o * rb, n_in);
        random_acts(x, n_tok, n_in, 1);
    }
    if (ti->act == EBB_ACT_Q8G64) {
        const int groups = n_in / 64;
        ref->quantize_act(x, n_tok, n_in, (n_tok + n_out) % (groups + 2) - 1, q, d);
        d_bytes = (size_t)n_tok * groups * sizeof *d;
    } else if (ti->act == EBB_ACT_Q8B32) {
        for (int t = 0; t < n_tok; t++)
            ref->quantize_q8b32(x + (size_t)t * n_in, n_in, t % 2 ? blocks / 2 : blocks, q + (size_t)t * n_in,
                                d + (size_t)t * blocks, sums + (size_t)t * blocks);
        d_bytes = (size_t)n_tok * blocks * sizeof *d;
        sum_bytes = (size_t)n_tok * blocks * sizeof *sums;
    } else if (ti->act == EBB_ACT_Q8K) {
        for (int t = 0; t < n_tok; t++)
            ref->quantize_q8k(x + (size_t)t * n_in, n_in, q + (size_t)t * n_in, d + (size_t)t * (n_in / 256),
                              sums + (size_t)t * (n_in / 16));
        d_bytes = (size_t)n_tok * (n_in / 256) * sizeof *d;
        sum_bytes = (size_t)n_tok * (n_in / 16) * sizeof *sums;
    }
    if (type == EBB_TYPE_F32) a.f = x;
    else a.q = q, a.s = d, a.sums = sum_bytes ? sums : NULL;

    const size_t out_bytes = (size_t)n_tok * n_out * sizeof(float);
    float *want = oc_xmalloc(out_bytes), *got = oc_xmalloc(out_bytes);
    ref->matmul[type](NULL, want, &a, w, n_tok, n_in, n_out);

    struct ebb_act da = {0};
    void *dw = oc_put(w, wbytes), *dout = oc_put(got, out_bytes);
    if (type == EBB_TYPE_F32) {
        da.f = oc_put(x, (size_t)n_tok * n_in * sizeof *x);
    } else {
        da.q = oc_put(q, (size_t)n_tok * n_in);
        da.s = oc_put(d, d_bytes);
        da.sums = sum_bytes ? oc_put(sums, sum_bytes) : NULL;
    }
    oc_test->matmul[type](NULL, dout, &da, dw, n_tok, n_in, n_out);
    oc_get(got, dout, out_bytes);
    char what[96];
    snprintf(what, sizeof what, "matmul %s (%d tokens x %d x %d)", ti->name, n_tok, n_in, n_out);
    if (type == EBB_TYPE_F32) CHECK_MSG(oc_close(want, got, (size_t)n_tok * n_out, 2e-5f, what), "%s", what);
    else CHECK_MSG(oc_same_bits(want, got, out_bytes, what), "%s", what);

    oc_free(dw), oc_free(dout);
    if (da.f) oc_free((void *)da.f);
    if (da.q) oc_free((void *)da.q), oc_free((void *)da.s);
    if (da.sums) oc_free((void *)da.sums);
    free(w), free(x), free(q), free(d), free(sums), free(want), free(got);
}

static void oc_products(const struct ebb_backend *ref)
{
    static const uint32_t types[] = {EBB_TYPE_F32, EBB_TYPE_W4G64, EBB_TYPE_Q4_0, EBB_TYPE_Q4_1, EBB_TYPE_Q5_0,
                                     EBB_TYPE_Q5_1, EBB_TYPE_Q8_0, EBB_TYPE_Q2_K, EBB_TYPE_Q3_K, EBB_TYPE_Q4_K,
                                     EBB_TYPE_Q5_K, EBB_TYPE_Q6_K, EBB_TYPE_W2G64};
    /* one token (decode), a few, the most the decode kernels take (8), more
     * than a warp's worth; one row, odd rows;
     * inputs of one block (W4G64, W2G64), odd block counts (legacy types) up to
     * the default model's 576 and 1536 */
    static const int toks[] = {1, 3, 8, 37}, outs[] = {1, 7, 70};
    static const int ins_w4[] = {64, 576, 1536}, ins_k[] = {256, 768, 1536};
    static const int ins_legacy[] = {96, 576, 1504};   /* odd block counts too: a decode step's lone block */
    for (size_t k = 0; k < sizeof types / sizeof *types; k++) {
        const uint32_t type = types[k];
        char what[64];
        snprintf(what, sizeof what, "matmul %s", ebb_type_info(type)->name);
        if (!oc_has(oc_test->matmul[type], what)) continue;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 3; j++) {
                const int n_in = oc_is_k(type) ? ins_k[(i + j) % 3]
                                 : ebb_type_info(type)->block_elems == 32 ? ins_legacy[(i + j) % 3]
                                                                          : ins_w4[(i + j) % 3];
                oc_matmul(ref, type, toks[i], n_in, outs[j]);
            }
    }
}

/* ----------------------------------------------------------- quantizers */

static void oc_quantizers(const struct ebb_backend *ref)
{
    enum { T = 5, N = 1536 };
    float *x = oc_xmalloc(T * N * sizeof *x);
    int8_t q[2][T * N];
    float s[2][T * N / 32];
    int16_t sums[2][T * N / 16];
    if (oc_has(oc_test->quantize_act, "quantize_act")) {
        for (int rep = 0; rep < 12; rep++) {
            random_acts(x, T, N, 1);
            const int n = 64 * (1 + rep % 24), n_hi = rep * 5 % 30 - 3;   /* below 0 and past the end too */
            ref->quantize_act(x, T, n, n_hi, q[0], s[0]);
            float *dx = oc_put(x, (size_t)T * n * sizeof *x);
            int8_t *dq = oc_put(q[1], (size_t)T * n);
            float *ds = oc_put(s[1], (size_t)T * (n / 64) * sizeof(float));
            oc_test->quantize_act(dx, T, n, n_hi, dq, ds);
            oc_get(q[1], dq, (size_t)T * n), oc_get(s[1], ds, (size_t)T * (n / 64) * sizeof(float));
            CHECK(oc_same_bits(q[0], q[1], (size_t)T * n, "quantize_act codes"));
            CHECK(oc_same_bits(s[0], s[1], (size_t)T * (n / 64) * sizeof(float), "quantize_act scales"));
            oc_free(dx), oc_free(dq), oc_free(ds);
        }
    }
    for (int k = 0; k < 2; k++) {
        if (!oc_has(k ? (const void *)oc_test->quantize_q8k : (const void *)oc_test->quantize_q8b32,
                    k ? "quantize_q8k" : "quantize_q8b32"))
            continue;
        for (int rep = 0; rep < 12; rep++) {
            random_acts(x, 1, N, 1);
            const int n = k ? 256 * (1 + rep % 6) : 32 * (1 + rep * 7 % 48), n_hi = rep * 3 % 50 - 2;
            const int nd = n / (k ? 256 : 32), ns = n / (k ? 16 : 32);
            if (k) ref->quantize_q8k(x, n, q[0], s[0], sums[0]);
            else ref->quantize_q8b32(x, n, n_hi, q[0], s[0], sums[0]);
            float *dx = oc_put(x, (size_t)n * sizeof *x), *ds = oc_put(s[1], (size_t)nd * sizeof(float));
            int8_t *dq = oc_put(q[1], (size_t)n);
            int16_t *dsum = oc_put(sums[1], (size_t)ns * sizeof(int16_t));
            if (k) oc_test->quantize_q8k(dx, n, dq, ds, dsum);
            else oc_test->quantize_q8b32(dx, n, n_hi, dq, ds, dsum);
            oc_get(q[1], dq, (size_t)n), oc_get(s[1], ds, (size_t)nd * sizeof(float));
            oc_get(sums[1], dsum, (size_t)ns * sizeof(int16_t));
            CHECK(oc_same_bits(q[0], q[1], (size_t)n, k ? "quantize_q8k codes" : "quantize_q8b32 codes"));
            CHECK(oc_same_bits(s[0], s[1], (size_t)nd * sizeof(float), "activation scales"));
            CHECK(oc_same_bits(sums[0], sums[1], (size_t)ns * sizeof(int16_t), "code sums"));
            oc_free(dx), oc_free(ds), oc_free(dq), oc_free(dsum);
        }
    }
    if (oc_has(oc_test->quantize_q8b32_loudest, "quantize_q8b32_loudest")) {
        /* the choice per token: ties among the loudest blocks (copied
         * blocks), n_hi of none, some, all and more than all */
        for (int rep = 0; rep < 12; rep++) {
            const int n = 32 * (1 + rep * 11 % 48), blocks = n / 32, n_hi = rep % 4 == 3 ? blocks + 2 : rep * 5 % (blocks + 1);
            random_acts(x, 1, n, 1);
            for (int b = 2; b < blocks; b += 3) memcpy(x + 32 * b, x + 32 * (b - 2), 32 * sizeof(float));
            if (rep % 2) x[7] = 50.0f;
            ref->quantize_q8b32_loudest(x, n, n_hi, q[0], s[0], sums[0]);
            float *dx = oc_put(x, (size_t)n * sizeof *x), *ds = oc_put(s[1], (size_t)blocks * sizeof(float));
            int8_t *dq = oc_put(q[1], (size_t)n);
            int16_t *dsum = oc_put(sums[1], (size_t)blocks * sizeof(int16_t));
            oc_test->quantize_q8b32_loudest(dx, n, n_hi, dq, ds, dsum);
            oc_get(q[1], dq, (size_t)n), oc_get(s[1], ds, (size_t)blocks * sizeof(float));
            oc_get(sums[1], dsum, (size_t)blocks * sizeof(int16_t));
            CHECK_MSG(oc_same_bits(q[0], q[1], (size_t)n, "loudest-block codes"), "n %d, n_hi %d", n, n_hi);
            CHECK(oc_same_bits(s[0], s[1], (size_t)blocks * sizeof(float), "loudest-block scales"));
            CHECK(oc_same_bits(sums[0], sums[1], (size_t)blocks * sizeof(int16_t), "loudest-block sums"));
            oc_free(dx), oc_free(ds), oc_free(dq), oc_free(dsum);
        }
    }
    if (oc_has(oc_test->hadamard64, "hadamard64")) {
        for (int rep = 0; rep < 6; rep++) {
            const int n = 64 * (1 + rep * 5 % 24);
            random_acts(x, 1, n, 1);
            float *want = oc_xmalloc((size_t)n * sizeof *want), *got = oc_xmalloc((size_t)n * sizeof *got);
            memcpy(want, x, (size_t)n * sizeof *x);
            ref->hadamard64(want, n);
            float *dx = oc_put(x, (size_t)n * sizeof *x);
            oc_test->hadamard64(dx, n);
            oc_get(got, dx, (size_t)n * sizeof *got);
            CHECK(oc_same_bits(want, got, (size_t)n * sizeof *got, "hadamard64"));
            oc_free(dx), free(want), free(got);
        }
    }
    free(x);
}

/* -------------------------------------------------------- vector ops (f32) */

static void oc_vector_ops(const struct ebb_backend *ref)
{
    static const int sizes[] = {1, 31, 576, 1536, 49152};
    const int rms = oc_has(oc_test->rmsnorm_f32, "rmsnorm_f32"), soft = oc_has(oc_test->softmax_f32, "softmax_f32"),
              swi = oc_has(oc_test->swiglu_f32, "swiglu_f32"), add = oc_has(oc_test->add_f32, "add_f32");
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        const int n = sizes[k];
        const size_t bytes = (size_t)n * sizeof(float);
        float *x = oc_floats((size_t)n, 3), *g = oc_floats((size_t)n, 1), *want = oc_xmalloc(bytes),
              *got = oc_xmalloc(bytes);
        if (rms) {
            ref->rmsnorm_f32(want, x, g, n, 1e-5f);
            float *dx = oc_put(x, bytes), *dg = oc_put(g, bytes);
            oc_test->rmsnorm_f32(dx, dx, dg, n, 1e-5f);             /* in place, as the engine calls it */
            oc_get(got, dx, bytes);
            CHECK(oc_close(want, got, (size_t)n, 1e-5f, "rmsnorm_f32"));
            oc_free(dx), oc_free(dg);
        }
        if (soft) {
            memcpy(want, x, bytes);
            ref->softmax_f32(want, n);
            float *dx = oc_put(x, bytes);
            oc_test->softmax_f32(dx, n);
            oc_get(got, dx, bytes);
            CHECK(oc_close(want, got, (size_t)n, 1e-5f, "softmax_f32"));
            oc_free(dx);
        }
        if (swi) {
            memcpy(want, x, bytes);
            ref->swiglu_f32(want, g, n);
            float *dx = oc_put(x, bytes), *dg = oc_put(g, bytes);
            oc_test->swiglu_f32(dx, dg, n);
            oc_get(got, dx, bytes);
            CHECK(oc_close(want, got, (size_t)n, 1e-5f, "swiglu_f32"));
            oc_free(dx), oc_free(dg);
        }
        if (add) {
            memcpy(want, x, bytes);
            ref->add_f32(want, g, n);
            float *dx = oc_put(x, bytes), *dg = oc_put(g, bytes);
            oc_test->add_f32(dx, dg, n);
            oc_get(got, dx, bytes);
            CHECK(oc_same_bits(want, got, bytes, "add_f32"));
            oc_free(dx), oc_free(dg);
        }
        free(x), free(g), free(want), free(got);
    }
}

/* ------------------------------------------------------ attention, KV rows */

static void oc_attention(const struct ebb_backend *ref)
{
    /* queries of a head (64 wide) over strided rows; odd widths for the lanes */
    static const int widths[] = {64, 13, 128};
    const int scores = oc_has(oc_test->attn_scores, "attn_scores"), values = oc_has(oc_test->attn_values, "attn_values");
    for (size_t k = 0; k < sizeof widths / sizeof *widths; k++) {
        const int n = widths[k], n_q = 3 + (int)k, n_rows = 1 + 45 * (int)k;
        const size_t q_stride = (size_t)n + 5, k_stride = (size_t)n + 3, s_stride = (size_t)n_rows + 2;
        float *q = oc_floats(q_stride * n_q, 1), *kk = oc_floats(k_stride * n_rows, 1);
        const size_t s_bytes = s_stride * n_q * sizeof(float);
        float *want = oc_floats(s_stride * n_q, 1), *got = oc_xmalloc(s_bytes);
        if (scores) {
            float *dq = oc_put(q, q_stride * n_q * sizeof *q), *dk = oc_put(kk, k_stride * n_rows * sizeof *kk);
            float *ds = oc_put(want, s_bytes);                      /* the gaps between rows kept */
            ref->attn_scores(want, s_stride, q, q_stride, n_q, kk, k_stride, n_rows, n);
            oc_test->attn_scores(ds, s_stride, dq, q_stride, n_q, dk, k_stride, n_rows, n);
            oc_get(got, ds, s_bytes);
            CHECK(oc_same_bits(want, got, s_bytes, "attn_scores"));
            oc_free(dq), oc_free(dk), oc_free(ds);
        }
        if (values) {
            float *p = oc_floats((size_t)n_rows, 0.3f), *y = oc_floats((size_t)n, 1);
            float *wy = oc_xmalloc((size_t)n * sizeof *wy), *gy = oc_xmalloc((size_t)n * sizeof *gy);
            memcpy(wy, y, (size_t)n * sizeof *y);
            ref->attn_values(wy, p, kk, k_stride, n_rows, n);
            float *dy = oc_put(y, (size_t)n * sizeof *y), *dp = oc_put(p, (size_t)n_rows * sizeof *p);
            float *dv = oc_put(kk, k_stride * n_rows * sizeof *kk);
            oc_test->attn_values(dy, dp, dv, k_stride, n_rows, n);
            oc_get(gy, dy, (size_t)n * sizeof *gy);
            CHECK(oc_same_bits(wy, gy, (size_t)n * sizeof *gy, "attn_values"));
            oc_free(dy), oc_free(dp), oc_free(dv), free(p), free(y), free(wy), free(gy);
        }
        free(q), free(kk), free(want), free(got);
    }
}

/* n_rows stored rows of `stride` bytes, every byte random except the f16
 * fields, which are finite halves. */
static uint8_t *oc_kv_rows(int n_rows, size_t stride, size_t dm_at, int n_pairs)
{
    uint8_t *rows = oc_xmalloc((size_t)n_rows * stride);
    for (size_t i = 0; i < (size_t)n_rows * stride; i++) rows[i] = (uint8_t)next_u32();
    for (int r = 0; r < n_rows; r++)
        for (int p = 0; p < n_pairs; p++) {
            const uint16_t h = ebb_f32_to_f16(gauss() * (p % 2 ? 1.0f : 0.05f));
            memcpy(rows + (size_t)r * stride + dm_at + 2 * (size_t)p, &h, 2);
        }
    return rows;
}

static void oc_kv_rows_ops(const struct ebb_backend *ref)
{
    const int n = 128, n_rows = 37;
    const size_t out_bytes = (size_t)n * n_rows * sizeof(float);
    float *want = oc_xmalloc(out_bytes), *got = oc_xmalloc(out_bytes);
    if (oc_has(oc_test->kv_rows_f16, "kv_rows_f16")) {
        const size_t stride = 2 * (size_t)n + 6;
        uint8_t *rows = oc_kv_rows(n_rows, stride, 0, n);
        ref->kv_rows_f16(want, (const uint16_t *)(const void *)rows, stride, n_rows, n);
        uint8_t *dr = oc_put(rows, (size_t)n_rows * stride);
        float *dout = oc_put(got, out_bytes);
        oc_test->kv_rows_f16(dout, (const uint16_t *)(const void *)dr, stride, n_rows, n);
        oc_get(got, dout, out_bytes);
        CHECK(oc_same_bits(want, got, out_bytes, "kv_rows_f16"));
        oc_free(dr), oc_free(dout), free(rows);
    }
    static const int bits_of[] = {8, 4, 2}, groups[] = {64, 32, 16, 8};
    const int per_group = oc_has(oc_test->kv_rows_q, "kv_rows_q"), per_channel = oc_has(oc_test->kv_rows_qc, "kv_rows_qc");
    for (int b = 0; b < 3; b++)
        for (int gi = 0; gi < 4; gi++) {
            const int bits = bits_of[b], group = groups[gi];
            const size_t code_bytes = (size_t)n * bits / 8, stride = code_bytes + 4 * (size_t)(n / group) + 4;
            char what[64];
            if (per_group) {
                uint8_t *rows = oc_kv_rows(n_rows, stride, code_bytes, 2 * (n / group));
                ref->kv_rows_q(want, rows, (const uint16_t *)(const void *)(rows + code_bytes), stride, n_rows, n,
                               bits, group);
                uint8_t *dr = oc_put(rows, (size_t)n_rows * stride);
                float *dout = oc_put(got, out_bytes);
                oc_test->kv_rows_q(dout, dr, (const uint16_t *)(const void *)(dr + code_bytes), stride, n_rows, n,
                                   bits, group);
                oc_get(got, dout, out_bytes);
                snprintf(what, sizeof what, "kv_rows_q (%d bits, groups of %d)", bits, group);
                CHECK_MSG(oc_same_bits(want, got, out_bytes, what), "%s", what);
                oc_free(dr), oc_free(dout), free(rows);
            }
            if (per_channel) {
                uint8_t *rows = oc_kv_rows(n_rows, stride, 0, 0);
                uint8_t *dm = oc_kv_rows(1, 4 * (size_t)n, 0, 2 * n);
                ref->kv_rows_qc(want, rows, stride, (const uint16_t *)(const void *)dm, n_rows, n, bits, group);
                uint8_t *dr = oc_put(rows, (size_t)n_rows * stride), *ddm = oc_put(dm, 4 * (size_t)n);
                float *dout = oc_put(got, out_bytes);
                oc_test->kv_rows_qc(dout, dr, stride, (const uint16_t *)(const void *)ddm, n_rows, n, bits, group);
                oc_get(got, dout, out_bytes);
                snprintf(what, sizeof what, "kv_rows_qc (%d bits, groups of %d)", bits, group);
                CHECK_MSG(oc_same_bits(want, got, out_bytes, what), "%s", what);
                oc_free(dr), oc_free(ddm), oc_free(dout), free(rows), free(dm);
            }
        }
    free(want), free(got);
}

/* ------------------------------------------------------------- BitStack */

static void oc_bitstack(const struct ebb_backend *ref)
{
    static const int shapes[][3] = {{576, 5, 3}, {1536, 40, 8}, {32, 1, 1}};   /* n, rows, vectors */
    const int isums = oc_has(oc_test->bitstack_isums, "bitstack_isums"),
              codes = oc_has(oc_test->bitstack_codes, "bitstack_codes"),
              scale_add = oc_has(oc_test->bitstack_scale_add, "bitstack_scale_add");
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        const int n = shapes[k][0], n_rows = shapes[k][1], n_vec = shapes[k][2];
        uint8_t *signs = oc_xmalloc((size_t)n_rows * n / 8);
        int8_t *t = oc_xmalloc((size_t)n_vec * n);
        for (size_t i = 0; i < (size_t)n_rows * n / 8; i++) signs[i] = (uint8_t)next_u32();
        for (size_t i = 0; i < (size_t)n_vec * n; i++) t[i] = (int8_t)((int)(next_u32() % 255) - 127);
        const size_t ibytes = (size_t)n_rows * n_vec * sizeof(int32_t);
        int32_t *want = oc_xmalloc(ibytes), *got = oc_xmalloc(ibytes);
        ref->bitstack_isums(want, signs, n_rows, t, n_vec, n);
        if (isums) {
            uint8_t *ds = oc_put(signs, (size_t)n_rows * n / 8);
            int8_t *dt = oc_put(t, (size_t)n_vec * n);
            int32_t *di = oc_put(got, ibytes);
            oc_test->bitstack_isums(di, ds, n_rows, dt, n_vec, n);
            oc_get(got, di, ibytes);
            CHECK(oc_same_bits(want, got, ibytes, "bitstack_isums"));
            oc_free(ds), oc_free(dt), oc_free(di);
        }
        if (codes) {
            float *x = oc_xmalloc((size_t)n * sizeof *x), *v = oc_floats((size_t)n, 0.1f);
            random_acts(x, 1, n, 1);
            int8_t *wq = oc_xmalloc((size_t)n), *gq = oc_xmalloc((size_t)n);
            float ws, gs;
            ref->bitstack_codes(x, v, n, wq, &ws);
            float *dx = oc_put(x, (size_t)n * sizeof *x), *dv = oc_put(v, (size_t)n * sizeof *v);
            float *dscale = oc_put(&gs, sizeof gs);
            int8_t *dq = oc_put(gq, (size_t)n);
            oc_test->bitstack_codes(dx, dv, n, dq, dscale);
            oc_get(gq, dq, (size_t)n), oc_get(&gs, dscale, sizeof gs);
            CHECK(oc_same_bits(wq, gq, (size_t)n, "bitstack_codes codes"));
            CHECK(oc_same_bits(&ws, &gs, sizeof gs, "bitstack_codes scale"));
            oc_free(dx), oc_free(dv), oc_free(dscale), oc_free(dq), free(x), free(v), free(wq), free(gq);
        }
        if (scale_add && n_vec > 1) {
            /* n_vec vectors as n_tok tokens of `rank` each */
            const int rank = n_vec % 2 ? 1 : 2, n_tok = n_vec / rank;
            const size_t stride = (size_t)n_rows + 3, out_n = stride * n_tok;
            float *u = oc_floats((size_t)n_rows * rank, 0.01f), *ts = oc_floats((size_t)n_tok * rank, 0.01f);
            float *wout = oc_floats(out_n, 1), *gout = oc_xmalloc(out_n * sizeof *gout);
            float *dout = oc_put(wout, out_n * sizeof *wout);
            ref->bitstack_scale_add(wout, stride, want, n_rows, n_tok, rank, u, ts);
            int32_t *di = oc_put(want, ibytes);
            float *du = oc_put(u, (size_t)n_rows * rank * sizeof *u), *dts = oc_put(ts, (size_t)n_tok * rank * sizeof *ts);
            oc_test->bitstack_scale_add(dout, stride, di, n_rows, n_tok, rank, du, dts);
            oc_get(gout, dout, out_n * sizeof *gout);
            CHECK(oc_same_bits(wout, gout, out_n * sizeof *gout, "bitstack_scale_add"));
            oc_free(dout), oc_free(di), oc_free(du), oc_free(dts), free(u), free(ts), free(wout), free(gout);
        }
        free(signs), free(t), free(want), free(got);
    }
}

/* ----------------------------------------------- steps between the products */

static void oc_steps(const struct ebb_backend *ref)
{
    /* rows of every type that has a to_f32, picked by id (repeats, the last row) */
    static const uint32_t types[] = {EBB_TYPE_F32, EBB_TYPE_F16, EBB_TYPE_BF16, EBB_TYPE_W4G64, EBB_TYPE_Q4_0,
                                     EBB_TYPE_Q4_1, EBB_TYPE_Q5_0, EBB_TYPE_Q5_1, EBB_TYPE_Q8_0, EBB_TYPE_Q2_K,
                                     EBB_TYPE_Q3_K, EBB_TYPE_Q4_K, EBB_TYPE_Q5_K, EBB_TYPE_Q6_K};
    if (oc_has(oc_test->get_rows, "get_rows")) {
        for (size_t k = 0; k < sizeof types / sizeof *types; k++) {
            const uint32_t type = types[k];
            const int n = ebb_type_info(type)->block_elems == 256 ? 512 : 576, n_table = 9, n_rows = 6;
            const size_t rb = ebb_row_bytes(type, (uint64_t)n);
            uint8_t *table = oc_xmalloc(rb * n_table);
            if (type == EBB_TYPE_F32 || type == EBB_TYPE_F16 || type == EBB_TYPE_BF16)
                for (size_t i = 0; i < rb * n_table; i += 2) {      /* finite values of every size */
                    const float v = gauss() * (float)(1 << (next_u32() % 16)) * 1e-3f;
                    uint16_t h = type == EBB_TYPE_F16 ? ebb_f32_to_f16(v) : 0;
                    if (type != EBB_TYPE_F16) {
                        uint32_t u;
                        memcpy(&u, &v, 4);
                        h = (uint16_t)(type == EBB_TYPE_BF16 ? u >> 16 : (i / 2) % 2 ? u >> 16 : u);
                    }
                    memcpy(table + i, &h, 2);
                }
            else
                for (int r = 0; r < n_table; r++) random_row(type, table + (size_t)r * rb, n);
            const int32_t ids[6] = {0, 8, 3, 3, 7, 1};
            const size_t out_bytes = (size_t)n_rows * n * sizeof(float);
            float *want = oc_xmalloc(out_bytes), *got = oc_xmalloc(out_bytes);
            ref->get_rows(want, table, type, ids, n_rows, n);
            uint8_t *dt = oc_put(table, rb * n_table);
            int32_t *dids = oc_put(ids, sizeof ids);
            float *dout = oc_put(got, out_bytes);
            oc_test->get_rows(dout, dt, type, dids, n_rows, n);
            oc_get(got, dout, out_bytes);
            char what[64];
            snprintf(what, sizeof what, "get_rows %s", ebb_type_info(type)->name);
            CHECK_MSG(oc_same_bits(want, got, out_bytes, what), "%s", what);
            oc_free(dt), oc_free(dids), oc_free(dout), free(table), free(want), free(got);
        }
    }
    if (oc_has(oc_test->permute_f32, "permute_f32")) {
        const int n = 576, n_tok = 5;
        int32_t *perm = oc_xmalloc((size_t)n * sizeof *perm);
        for (int i = 0; i < n; i++) perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            const int j = (int)(next_u32() % (uint32_t)(i + 1)), t = perm[i];
            perm[i] = perm[j], perm[j] = t;
        }
        float *x = oc_floats((size_t)n * n_tok, 1), *want = oc_xmalloc((size_t)n * n_tok * sizeof(float));
        float *got = oc_xmalloc((size_t)n * n_tok * sizeof(float));
        ref->permute_f32(want, x, perm, n_tok, n);
        float *dx = oc_put(x, (size_t)n * n_tok * sizeof *x), *dout = oc_put(got, (size_t)n * n_tok * sizeof *got);
        int32_t *dp = oc_put(perm, (size_t)n * sizeof *perm);
        oc_test->permute_f32(dout, dx, dp, n_tok, n);
        oc_get(got, dout, (size_t)n * n_tok * sizeof *got);
        CHECK(oc_same_bits(want, got, (size_t)n * n_tok * sizeof *got, "permute_f32"));
        oc_free(dx), oc_free(dout), oc_free(dp), free(perm), free(x), free(want), free(got);
    }
    if (oc_has(oc_test->rope_f32, "rope_f32")) {
        /* both pairings; the whole head and a part of it (rope_dim < head_dim); rows with gaps */
        static const int cases[][5] = {{64, 64, 0, 9, 4}, {64, 64, 1, 3, 7}, {128, 32, 1, 2, 1}, {64, 16, 0, 1, 3}};
        for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
            const int hd = cases[k][0], rd = cases[k][1], neox = cases[k][2], heads = cases[k][3], n_tok = cases[k][4];
            const size_t stride = (size_t)heads * hd + 3, n_val = stride * n_tok, half = (size_t)rd / 2;
            float *x = oc_floats(n_val, 2), *c = oc_xmalloc(half * n_tok * sizeof(float));
            float *sn = oc_xmalloc(half * n_tok * sizeof(float)), *got = oc_xmalloc(n_val * sizeof(float));
            for (size_t i = 0; i < half * n_tok; i++) {
                const double theta = (double)(i / half * 37 + 1) * pow(10000.0, -2.0 * (double)(i % half) / rd);
                c[i] = (float)cos(theta), sn[i] = (float)sin(theta);
            }
            float *dx = oc_put(x, n_val * sizeof *x), *dc = oc_put(c, half * n_tok * sizeof *c);
            float *ds = oc_put(sn, half * n_tok * sizeof *sn);
            ref->rope_f32(x, stride, n_tok, heads, hd, rd, neox, c, sn);
            oc_test->rope_f32(dx, stride, n_tok, heads, hd, rd, neox, dc, ds);
            oc_get(got, dx, n_val * sizeof *got);
            CHECK_MSG(oc_same_bits(x, got, n_val * sizeof *got, "rope_f32"), "rope case %zu", k);
            oc_free(dx), oc_free(dc), oc_free(ds), free(x), free(c), free(sn), free(got);
        }
    }
    if (oc_has(oc_test->scale_f32, "scale_f32")) {
        const int n = 333;
        float *x = oc_floats((size_t)n, 3), *want = oc_xmalloc((size_t)n * sizeof(float));
        float *got = oc_xmalloc((size_t)n * sizeof(float));
        ref->scale_f32(want, x, 0.125f * 1.1f, n);
        float *dx = oc_put(x, (size_t)n * sizeof *x);
        oc_test->scale_f32(dx, dx, 0.125f * 1.1f, n);     /* in place, as attention uses it */
        oc_get(got, dx, (size_t)n * sizeof *got);
        CHECK(oc_same_bits(want, got, (size_t)n * sizeof *got, "scale_f32"));
        oc_free(dx), free(x), free(want), free(got);
    }
    if (oc_has(oc_test->kv_store_row, "kv_store_row")) {
        /* every precision; groups of 64 rotated and not, narrower groups;
         * rows with values beyond f16's range, a constant group, NaN */
        static const int cases[][4] = {{32, 576, 64, 0}, {16, 576, 64, 0}, {8, 576, 64, 1}, {4, 576, 64, 1},
                                       {4, 192, 64, 0},  {8, 96, 32, 0},   {4, 48, 16, 0},  {4, 40, 8, 0}};
        for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
            const int bits = cases[k][0], n = cases[k][1], group = cases[k][2], rotate = cases[k][3];
            const size_t bytes = bits >= 16 ? (size_t)n * bits / 8 : (size_t)n * bits / 8 + (size_t)n / group * 4;
            float *x = oc_floats((size_t)n, 4);
            x[1] = 7e4f, x[2] = -9e4f;
            for (int i = n - group; i < n; i++) x[i] = 0.75f;    /* a constant group */
            if (bits < 16) x[5] = NAN;
            uint8_t *want = oc_xmalloc(bytes), *got = oc_xmalloc(bytes);
            memset(want, 0x5a, bytes);
            ref->kv_store_row(want, x, n, bits, group, rotate);
            float *dx = oc_put(x, (size_t)n * sizeof *x);
            memset(got, 0xa5, bytes);                  /* other stale bytes than the reference's */
            uint8_t *drow = oc_put(got, bytes);
            oc_test->kv_store_row(drow, dx, n, bits, group, rotate);
            oc_get(got, drow, bytes);
            CHECK_MSG(oc_same_bits(want, got, bytes, "kv_store_row"), "kv_store_row case %zu (%d bits)", k, bits);
            oc_free(dx), oc_free(drow), free(x), free(want), free(got);
        }
    }
}

/* The fused attention op against kv.c's composition of the scalar ops: a
 * cache filled through kv.c on the host at every precision (rotated and
 * not), its pages copied into the test backend's memory with their page
 * tables, and blocks of queries that read the window, the body, the sinks,
 * or all of them. */
static void oc_attend(const struct ebb_backend *ref)
{
    if (!oc_has(oc_test->attend, "attend")) return;
    /* bits, head_dim, positions: the long caches reach the CUDA kernel's
     * split over the sequence (from position 1024 on) */
    static const int cases[][3] = {{32, 64, 200}, {16, 64, 200}, {8, 64, 200}, {4, 64, 200}, {4, 48, 200},
                                   {8, 48, 200}, {4, 64, 1270}, {32, 64, 1270}};
    static const int blocks[][4] = {{1, 1, 150, 3}, {0, 0, 5, 2}, {1, 0, 130, 1}, {0, 1, 199, 1},   /* layer, kvh, */
                                    {0, 1, 1020, 6}, {1, 0, 1269, 1}};                            /* pos0, n_tok */
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        const int bits = cases[c][0], hd = cases[c][1], n = cases[c][2], n_head = 2;
        struct model_config cfg = {.n_layer = 2, .n_head = 4, .n_head_kv = 2, .head_dim = hd};
        struct kv_account acct;
        struct kv_cache kv;
        CHECK(kv_account_init(&acct, &cfg, bits, 0) == 0 && kv_cache_init(&kv, &cfg, n, &acct) == KV_OK);
        const int kvd = cfg.n_head_kv * hd;
        /* A long cache is filled a pass at a time, its window following, the
         * last pass from last_pass on: queries from there on read it as a
         * pass of that length would (the earlier windows are given back). */
        const int last_pass = n <= 256 ? 0 : n - 250;
        for (int p0 = 0; p0 < n;) {
            const int end = p0 < last_pass ? (p0 + 128 < last_pass ? p0 + 128 : last_pass) : n;
            CHECK(kv_cache_ensure(&kv, end) == 0);
            for (int l = 0; l < cfg.n_layer; l++)
                for (int p = p0; p < end; p++) {
                    float *k = oc_floats((size_t)kvd, 1.5f), *v = oc_floats((size_t)kvd, 1);
                    k[3] = 40.0f * (float)(p % 3);                       /* an outlier channel */
                    kv_store(&kv, ref, l, p, k, v);
                    free(k), free(v);
                }
            kv.n_past = end;
            p0 = end;
        }
        const struct kv_layout *L = &kv.layout;
        const int pages = kv.n_pages;
        uint8_t **dbody = oc_xmalloc((size_t)pages * sizeof *dbody);
        float **dwin = oc_xmalloc((size_t)pages * sizeof *dwin);
        for (int p = 0; p < pages; p++) {
            dbody[p] = oc_put(kv.pages[p], L->page_bytes);
            const int held = kv.window && p >= kv.window_lo && p <= kv.window_hi && kv.window[p];
            dwin[p] = held ? oc_put(kv.window[p], L->window_page_bytes) : NULL;
        }
        float *dsink = kv.sink ? oc_put(kv.sink, L->sink_bytes) : NULL;
        const struct ebb_kv_pages view = {
            .bits = bits, .group = L->group, .rotate = L->rotate, .kv_dim = L->kv_dim, .head_dim = hd,
            .n_pages = pages, .row_bytes = L->row_bytes, .code_bytes = L->code_bytes,
            .body = oc_put(dbody, (size_t)pages * sizeof *dbody), .window = oc_put(dwin, (size_t)pages * sizeof *dwin),
            .sink = dsink};
        for (size_t b = 0; b < sizeof blocks / sizeof *blocks; b++) {
            const int layer = blocks[b][0], kvh = blocks[b][1], pos0 = blocks[b][2], n_tok = blocks[b][3];
            if (pos0 < last_pass || pos0 + n_tok > n) continue;
            const size_t stride = (size_t)cfg.n_head * hd, q_n = (size_t)n_tok * stride;
            float *q = oc_floats(q_n, 1), *want = oc_xmalloc(q_n * sizeof(float)), *got = oc_xmalloc(q_n * sizeof(float));
            memcpy(want, q, q_n * sizeof(float));
            memcpy(got, q, q_n * sizeof(float));
            float *scratch = oc_xmalloc(kv_attend_scratch(&cfg, n) * sizeof(float));
            const size_t at = (size_t)kvh * n_head * hd;    /* the query heads of KV head kvh */
            kv_attend_block(&kv, ref, layer, kvh, q + at, want + at, stride, n_tok, n_head, pos0, 0.125f, scratch);
            float *dq = oc_put(q, q_n * sizeof(float)), *dout = oc_put(got, q_n * sizeof(float));
            float *dscratch = oc_put(scratch, (size_t)n_tok * n_head * (pos0 + n_tok) * sizeof(float));
            oc_test->attend(&view, layer, kvh, dq + at, dout + at, stride, n_tok, n_head, pos0, 0.125f, dscratch);
            oc_get(got, dout, q_n * sizeof(float));
            char what[96];
            snprintf(what, sizeof what, "attend KV%d head_dim %d, %d positions, block %zu", bits, hd, n, b);
            if (pos0 + n_tok > oc_attend_split_from)
                CHECK_MSG(oc_close_scaled(want, got, q_n, 1e-5f, what), "%s", what);
            else if (oc_exact_softmax)
                CHECK_MSG(oc_same_bits(want, got, q_n * sizeof(float), what), "%s", what);
            else CHECK_MSG(oc_close(want, got, q_n, 1e-5f, what), "%s", what);
            oc_free(dq), oc_free(dout), oc_free(dscratch), free(q), free(want), free(got), free(scratch);
        }
        for (int p = 0; p < pages; p++) {
            oc_free(dbody[p]);
            if (dwin[p]) oc_free(dwin[p]);
        }
        if (dsink) oc_free(dsink);
        oc_free((void *)view.body), oc_free((void *)view.window), free(dbody), free(dwin);
        kv_cache_free(&kv);
        kv_account_destroy(&acct);
    }
}

/* The memory's queued copy and zero (what the engine uses between ops). */
static void oc_memory(void)
{
    const struct ebb_backend_memory *m = oc_test->memory;
    if (!m) return;
    uint8_t host[1000], got[1000];
    for (size_t i = 0; i < sizeof host; i++) host[i] = (uint8_t)(next_u32() | 1);
    uint8_t *d = oc_put(host, sizeof host);
    m->copy(d + 500, d + 3, 400);
    m->zero(d + 7, 13);
    oc_get(got, d, sizeof got);
    memcpy(host + 500, host + 3, 400);
    memset(host + 7, 0, 13);
    CHECK(oc_same_bits(host, got, sizeof got, "memory copy and zero"));
    oc_free(d);
}

/* Every op of test against ref. Returns how many entries were not compared. */
static int opcompare_all(const struct ebb_backend *ref, const struct ebb_backend *test)
{
    oc_test = test;
    oc_not_compared = 0;
    oc_products(ref);
    oc_quantizers(ref);
    oc_vector_ops(ref);
    oc_attention(ref);
    oc_kv_rows_ops(ref);
    oc_bitstack(ref);
    oc_steps(ref);
    oc_attend(ref);
    oc_memory();
    if (test->memory) CHECK_MSG(test->memory->sync() == 0, "%s: %s", test->name, test->memory->error());
    return oc_not_compared;
}
#endif
