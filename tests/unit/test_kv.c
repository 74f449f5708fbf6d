/* KV cache tests: precisions, the recent window, the sinks, the account.
 *
 * Independent references: quantization is checked against its documented
 * bound (every value within d/2 of itself) and layout (codes decoded here
 * from the packing formats.h describes), per row and per channel; the row
 * conversions (per-row and per-channel codes) and the
 * score and value ops of every CPU path against the arithmetic backend.h
 * defines, written out here; attention
 * against a double-precision attention written here from the documented
 * semantics (which positions are exact, which quantized, the rotation), and
 * against plain f32 attention within a stated tolerance. On the real model:
 * a greedy KV4 generation over a long prompt still answers the question,
 * and perplexity at KV4 stays within 1% of f32's.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/compress.h"
#include "engine/generate.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/formats.h"

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static double uniform(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static float gauss(void) {
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

/* Code i of a group, decoded from the layout in kernels/formats.h, written
 * out per width: 8 bits a byte each; 4 bits low nibbles first, then high;
 * 2 bits a quarter of the group per bit pair, low pair first. */
static int code_of(const uint8_t *group_codes, int bits, int group, int i) {
    if (bits == 8) return group_codes[i];
    if (bits == 4) return i < group / 2 ? group_codes[i] & 0x0f : group_codes[i - group / 2] >> 4;
    const int quarter = group / 4;
    return (group_codes[i % quarter] >> (2 * (i / quarter))) & 3;
}

/* ---------------------------------------------------------- quantization */

static void fill_row(float *x, int n, int kind) {
    for (int i = 0; i < n; i++) {
        switch (kind) {
        case 0: x[i] = gauss(); break;                                  /* plain */
        case 1: x[i] = gauss() * (i % 17 == 3 ? 40.0f : 1.0f); break;   /* outlier channels */
        case 2: x[i] = 1000.0f + 1e-3f * gauss(); break;                /* tiny range far from 0 */
        case 3: x[i] = -3.25f; break;                                   /* constant */
        case 4: x[i] = 1e-6f * gauss(); break;                          /* below f16's normals */
        default: x[i] = (float)(uniform() * 2e5 - 1e5); break;          /* beyond f16's range: clamped */
        }
    }
}

static void test_quantize_bounds(void) {
    static const int groups[] = {64, 32, 16, 8};
    float x[256], y[256];
    uint8_t codes[256];
    uint16_t dm[2 * 32];
    int worst_ok = 1;
    for (int bits = 8; bits >= 2; bits /= 2) {
        const int qmax = (1 << bits) - 1;
        for (int gi = 0; gi < 4; gi++) {
            const int group = groups[gi], n = 256;
            for (int kind = 0; kind < 6; kind++)
                for (int rep = 0; rep < 20; rep++) {
                    fill_row(x, n, kind);
                    ebb_kvq_quantize_row(bits, x, n, group, codes, dm);
                    ebb_kvq_dequantize_row(bits, codes, dm, n, group, y);
                    for (int g = 0; g < n / group; g++) {
                        const float d = ebb_f16_to_f32(dm[2 * g]), m = ebb_f16_to_f32(dm[2 * g + 1]);
                        float lo = INFINITY, hi = -INFINITY;
                        for (int i = 0; i < group; i++) {
                            float v = fminf(fmaxf(x[g * group + i], -65504.0f), 65504.0f);
                            lo = fminf(lo, v);
                            hi = fmaxf(hi, v);
                        }
                        /* The step is the range over qmax, up to f16 rounding. */
                        const float ideal = (hi - lo) / (float)qmax;
                        int ok = d >= ideal * 0.999f && d <= ideal * 1.002f + fabsf(lo) * 2e-3f / (float)qmax + 1e-7f;
                        const uint8_t *gc = codes + (size_t)g * group * bits / 8;
                        for (int i = 0; i < group; i++) {
                            float v = fminf(fmaxf(x[g * group + i], -65504.0f), 65504.0f);
                            int c = code_of(gc, bits, group, i);
                            float mine = m + d * (float)c;   /* decoded here, from the layout */
                            ok &= c >= 0 && c <= qmax;
                            ok &= mine == y[g * group + i];
                            ok &= fabsf(v - mine) <= d * 0.5f * (1 + 1e-5f) + fabsf(v) * 1e-6f;
                        }
                        if (!ok && worst_ok) {
                            CHECK_MSG(ok, "bits %d group %d kind %d: group %d breaks |x - q| <= d/2 (d %g, range %g)",
                                      bits, group, kind, g, d, hi - lo);
                            worst_ok = 0;
                        }
                    }
                }
        }
    }
    CHECK(worst_ok);
}

/* ------------------------------------------------ row and attention ops */

/* n_rows rows of n values at stride bytes: codes then dm pairs per row. */
struct qrows {
    uint8_t *buf;
    size_t stride, code_bytes;
    float *deq;   /* [n_rows][n] dequantized here */
    float *mag;   /* [n_rows][n] |m| + qmax |d| of the value's group: the size of the terms the ops sum */
};

static void make_qrows(struct qrows *r, int bits, int n_rows, int n, int group) {
    r->code_bytes = (size_t)n * bits / 8;
    r->stride = r->code_bytes + (size_t)(n / group) * 4 + 12;   /* padding: rows are strided */
    r->buf = calloc((size_t)n_rows, r->stride);
    r->deq = malloc((size_t)n_rows * n * sizeof(float));
    r->mag = malloc((size_t)n_rows * n * sizeof(float));
    float x[1024];
    for (int j = 0; j < n_rows; j++) {
        fill_row(x, n, j % 2);
        uint8_t *row = r->buf + (size_t)j * r->stride;
        uint16_t dm[256];
        ebb_kvq_quantize_row(bits, x, n, group, row, dm);
        memcpy(row + r->code_bytes, dm, (size_t)(n / group) * 4);
        for (int g = 0; g < n / group; g++)
            for (int i = 0; i < group; i++) {
                r->mag[(size_t)j * n + g * group + i] =
                    fabsf(ebb_f16_to_f32(dm[2 * g + 1])) + (float)((1 << bits) - 1) * ebb_f16_to_f32(dm[2 * g]);
                r->deq[(size_t)j * n + g * group + i] =
                    ebb_f16_to_f32(dm[2 * g + 1]) +
                    ebb_f16_to_f32(dm[2 * g]) * (float)code_of(row + (size_t)g * group * bits / 8, bits, group, i);
            }
    }
}

/* Rows of every stored precision come back as the values the layout
 * defines (decoded here), bit for bit, on every path. */
static void test_row_conversions(void) {
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    static const int shapes[][2] = {{64, 64}, {128, 64}, {192, 64}, {96, 32}, {80, 16}, {64, 8}};
    for (int pi = 0; pi < 3; pi++) {
        const struct ebb_backend *be = ebb_backend_cpu_named(paths[pi]);
        if (!be) continue;
        CHECK(be->kv_rows_f16 && be->kv_rows_q && be->attn_scores && be->attn_values);
        for (int si = 0; si < 6; si++) {
            const int n = shapes[si][0], group = shapes[si][1], n_rows = 37;
            float *out = malloc((size_t)n_rows * n * sizeof(float));
            for (int bits = 2; bits <= 16; bits *= 2) {
                struct qrows r = {0};
                uint16_t *half_rows = NULL;
                if (bits == 16) {
                    half_rows = malloc((size_t)n_rows * (n + 8) * sizeof(uint16_t));
                    r.deq = malloc((size_t)n_rows * n * sizeof(float));
                    for (int j = 0; j < n_rows; j++)
                        for (int i = 0; i < n; i++) {
                            half_rows[(size_t)j * (n + 8) + i] = ebb_f32_to_f16(gauss());
                            r.deq[(size_t)j * n + i] = ebb_f16_to_f32(half_rows[(size_t)j * (n + 8) + i]);
                        }
                    be->kv_rows_f16(out, half_rows, (n + 8) * sizeof(uint16_t), n_rows, n);
                } else {
                    make_qrows(&r, bits, n_rows, n, group);
                    const uint16_t *dm = (const uint16_t *)(const void *)(r.buf + r.code_bytes);
                    be->kv_rows_q(out, r.buf, dm, r.stride, n_rows, n, bits, group);
                }
                CHECK_MSG(!memcmp(out, r.deq, (size_t)n_rows * n * sizeof(float)),
                          "%s: kv rows at %d bits, n %d group %d do not decode to the layout's values", paths[pi], bits,
                          n, group);
                free(r.buf);
                free(r.deq);
                free(r.mag);
                free(half_rows);
            }
            free(out);
        }
    }
}

/* Per-channel codes (the 2-bit tier's keys): every channel's values within
 * d/2 of themselves, NaN as code 0, the bytes between rows untouched, the
 * codes where the packing puts them; and kv_rows_qc on every path gives
 * ebb_kvq_dequantize_channels' floats bit for bit. */
static void test_channels(void) {
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    static const int shapes[][2] = {{64, 64}, {128, 64}, {40, 8}};
    static const int row_counts[] = {1, 7, 64};
    const int max_rows = 64, max_n = 128, pad = 12;
    float *x = malloc((size_t)max_rows * max_n * sizeof(float)), *y = malloc((size_t)max_rows * max_n * sizeof(float));
    float *out = malloc((size_t)max_rows * max_n * sizeof(float));
    uint8_t *codes = malloc((size_t)max_rows * (max_n + pad));
    uint16_t dm[2 * 128];
    int bound_ok = 1, layout_ok = 1, pad_ok = 1, paths_ok = 1;
    for (int bits = 8; bits >= 2; bits /= 2) {
        const int qmax = (1 << bits) - 1;
        for (int si = 0; si < 3; si++)
            for (int ri = 0; ri < 3; ri++)
                for (int kind = 0; kind < 7; kind++) {
                    const int n = shapes[si][0], group = shapes[si][1], n_rows = row_counts[ri];
                    const size_t stride = (size_t)n * bits / 8 + pad;
                    for (int r = 0; r < n_rows; r++) fill_row(x + (size_t)r * n, n, kind < 6 ? kind : r % 6);
                    if (kind == 6)   /* some NaN, and channel 1 all NaN */
                        for (int r = 0; r < n_rows; r++) {
                            x[(size_t)r * n + 1] = NAN;
                            if (r % 3 == 0) x[(size_t)r * n + 5] = NAN;
                        }
                    memset(codes, 0xa5, (size_t)n_rows * stride);
                    ebb_kvq_quantize_channels(bits, x, n_rows, n, group, codes, stride, dm);
                    ebb_kvq_dequantize_channels(bits, codes, stride, dm, n_rows, n, group, y);
                    for (int r = 0; r < n_rows; r++)
                        for (size_t b = (size_t)n * bits / 8; b < stride; b++) pad_ok &= codes[(size_t)r * stride + b] == 0xa5;
                    for (int i = 0; i < n; i++) {
                        const float d = ebb_f16_to_f32(dm[2 * i]), m = ebb_f16_to_f32(dm[2 * i + 1]);
                        int ok = d >= 0;
                        for (int r = 0; r < n_rows; r++) {
                            const float xv = x[(size_t)r * n + i], v = fminf(fmaxf(xv, -65504.0f), 65504.0f);
                            const uint8_t *gc = codes + (size_t)r * stride + (size_t)(i / group) * group * bits / 8;
                            const int c = code_of(gc, bits, group, i % group);
                            layout_ok &= c >= 0 && c <= qmax && fmaf(d, (float)c, m) == y[(size_t)r * n + i];
                            if (xv != xv) ok &= c == 0;
                            else   /* up to float rounding of x - m and of m + d * c, which scales with |m| */
                                ok &= fabsf(v - y[(size_t)r * n + i]) <=
                                      d * 0.5f * (1 + 1e-5f) + (fabsf(v) + fabsf(m)) * 1e-6f;
                        }
                        if (!ok && bound_ok) {
                            CHECK_MSG(ok, "bits %d n %d rows %d kind %d: channel %d breaks |x - q| <= d/2 (d %g)", bits,
                                      n, n_rows, kind, i, d);
                            bound_ok = 0;
                        }
                    }
                    for (int pi = 0; pi < 3; pi++) {
                        const struct ebb_backend *be = ebb_backend_cpu_named(paths[pi]);
                        if (!be) continue;
                        CHECK(be->kv_rows_qc != NULL);
                        memset(out, 0xff, (size_t)n_rows * n * sizeof(float));
                        be->kv_rows_qc(out, codes, stride, dm, n_rows, n, bits, group);
                        const int same = !memcmp(out, y, (size_t)n_rows * n * sizeof(float));
                        if (!same && paths_ok)
                            CHECK_MSG(same, "%s: kv_rows_qc at %d bits, n %d group %d rows %d differs from "
                                            "ebb_kvq_dequantize_channels", paths[pi], bits, n, group, n_rows);
                        paths_ok &= same;
                    }
                }
    }
    CHECK(bound_ok);
    CHECK_MSG(layout_ok, "per-channel codes are not where the packing rule puts them");
    CHECK_MSG(pad_ok, "per-channel quantization wrote between rows");
    CHECK(paths_ok);
    free(x);
    free(y);
    free(out);
    free(codes);
}

/* backend.h's dot8, written out here. */
static float dot8_here(const float *a, const float *b, int n) {
    float l[8] = {0};
    for (int i = 0; i < n; i++) l[i % 8] = fmaf(a[i], b[i], l[i % 8]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* The score and value ops give exactly the arithmetic backend.h spells
 * out, on every path, for every edge of their tiles (query and row counts
 * that are not multiples of 4 and 2, lengths that are not multiples of 8
 * or 64, strided operands). */
static void test_attention_ops(void) {
    static const char *paths[] = {"scalar", "avx2", "avx512"};
    static const int lengths[] = {64, 128, 80, 13, 8, 1, 200};
    const int max_q = 11, max_rows = 67, stride = 211;
    float *q = malloc((size_t)max_q * stride * sizeof(float)), *k = malloc((size_t)max_rows * stride * sizeof(float));
    float *sc = malloc((size_t)max_q * (max_rows + 5) * sizeof(float)), *p = malloc((size_t)max_rows * sizeof(float));
    float y[200], want[200];
    for (int i = 0; i < max_q * stride; i++) q[i] = gauss();
    for (int i = 0; i < max_rows * stride; i++) k[i] = gauss() * (i % 29 == 3 ? 20.0f : 1.0f);
    for (int r = 0; r < max_rows; r++) p[r] = (float)uniform();
    for (int pi = 0; pi < 3; pi++) {
        const struct ebb_backend *be = ebb_backend_cpu_named(paths[pi]);
        if (!be) continue;
        int scores_ok = 1, values_ok = 1;
        for (int li = 0; li < 7; li++) {
            const int n = lengths[li];
            for (int n_q = 1; n_q <= max_q; n_q += 2)
                for (int n_rows = 1; n_rows <= max_rows; n_rows += 11) {
                    const size_t ss = (size_t)n_rows + 5;
                    be->attn_scores(sc, ss, q, stride, n_q, k, stride, n_rows, n);
                    for (int j = 0; j < n_q; j++)
                        for (int r = 0; r < n_rows; r++)
                            scores_ok &= sc[(size_t)j * ss + r] == dot8_here(q + (size_t)j * stride, k + (size_t)r * stride, n);
                }
            for (int n_rows = 1; n_rows <= max_rows; n_rows += 6) {
                for (int i = 0; i < n; i++) y[i] = want[i] = (float)i * 0.25f;
                for (int r = 0; r < n_rows; r++)
                    for (int i = 0; i < n; i++) want[i] = fmaf(p[r], k[(size_t)r * stride + i], want[i]);
                be->attn_values(y, p, k, stride, n_rows, n);
                values_ok &= !memcmp(y, want, (size_t)n * sizeof(float));
            }
        }
        CHECK_MSG(scores_ok, "%s: attn_scores differs from dot8", paths[pi]);
        CHECK_MSG(values_ok, "%s: attn_values differs from its fma sequence", paths[pi]);
    }
    free(q);
    free(k);
    free(sc);
    free(p);
}

static void test_rotation_invariance(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    float q[128], k[128], qr[128], kr[128];
    for (int rep = 0; rep < 50; rep++) {
        for (int i = 0; i < 128; i++) {
            q[i] = gauss();
            k[i] = gauss() * (i == 5 ? 30.0f : 1.0f);
        }
        memcpy(qr, q, sizeof q);
        memcpy(kr, k, sizeof k);
        be->hadamard64(qr, 128);
        be->hadamard64(kr, 128);
        double a = 0, b = 0, mag = 0, nk = 0, nkr = 0, maxk = 0, maxkr = 0;
        for (int i = 0; i < 128; i++) {
            a += (double)q[i] * k[i];
            b += (double)qr[i] * kr[i];
            mag += fabs((double)q[i] * k[i]);
            nk += (double)k[i] * k[i];
            nkr += (double)kr[i] * kr[i];
            maxk = fmax(maxk, fabs(k[i]));
            maxkr = fmax(maxkr, fabs(kr[i]));
        }
        CHECK_NEAR(b, a, 1e-5 * mag + 1e-5);
        CHECK_NEAR(nkr, nk, 1e-5 * nk);           /* orthonormal: norms kept */
        if (rep == 0) CHECK(maxkr < 0.5 * maxk);   /* the outlier channel is spread */
    }
}

/* ----------------------------------------------------------- attention */

static struct model_config small_config(int n_layer, int n_head_kv, int head_dim) {
    struct model_config c;
    memset(&c, 0, sizeof c);
    c.n_layer = n_layer;
    c.n_head_kv = n_head_kv;
    c.n_head = n_head_kv * 2;
    c.head_dim = head_dim;
    c.n_ctx_train = 4096;
    return c;
}

/* Random keys and values for n positions of every layer: [n][layer][kv_dim]. */
struct kv_data {
    int n, n_layer, kv_dim;
    float *k, *v;
};

static void make_data(struct kv_data *d, const struct model_config *c, int n) {
    d->n = n;
    d->n_layer = c->n_layer;
    d->kv_dim = c->n_head_kv * c->head_dim;
    size_t total = (size_t)n * c->n_layer * d->kv_dim;
    d->k = malloc(total * sizeof(float));
    d->v = malloc(total * sizeof(float));
    for (size_t i = 0; i < total; i++) {
        /* RoPE'd keys have a few large channels; values are tamer. */
        d->k[i] = gauss() * ((i % (size_t)d->kv_dim) % 23 == 7 ? 6.0f : 1.0f);
        d->v[i] = gauss();
    }
}

static const float *data_k(const struct kv_data *d, int pos, int layer) {
    return d->k + ((size_t)pos * d->n_layer + layer) * d->kv_dim;
}
static const float *data_v(const struct kv_data *d, int pos, int layer) {
    return d->v + ((size_t)pos * d->n_layer + layer) * d->kv_dim;
}

/* Stores positions [n_past, n) passing `step` positions per ensure, as the
 * forward pass would with batches of that size. */
static int fill_cache(struct kv_cache *kv, const struct ebb_backend *be, const struct kv_data *d, int n, int step) {
    for (int p0 = kv->n_past; p0 < n; p0 += step) {
        int p1 = p0 + step < n ? p0 + step : n;
        if (kv_cache_ensure(kv, p1)) return -1;
        for (int l = 0; l < d->n_layer; l++)
            for (int p = p0; p < p1; p++) kv_store(kv, be, l, p, data_k(d, p, l), data_v(d, p, l));
        kv->n_past = p1;
    }
    return 0;
}

/* The documented semantics in double: a query at position n_pos - 1 sees
 * positions < 4 and >= 64 * ((n_pos - 1) / 64 - 1) exactly, the rest as
 * quantized (rotated by H64 when head_dim % 64 == 0, dequantized, rotated
 * back). bits 32: every position exact; 16: every position rounded to f16. */
static void reference_attend_reading(const struct kv_data *d, const struct model_config *c,
                                     const struct ebb_backend *be, int bits, int layer, int kvh, const float *q,
                                     int n_pos, float scale, const struct kv_reading *only, double *out);

static void reference_attend(const struct kv_data *d, const struct model_config *c, const struct ebb_backend *be,
                             int bits, int layer, int kvh, const float *q, int n_pos, float scale, double *out) {
    reference_attend_reading(d, c, be, bits, layer, kvh, q, n_pos, scale, NULL, out);
}

/* Whether a reading (kv.h) reads position p: the pages (64 positions) of
 * the sinks, of [from, to) and from tail on. */
static int reading_reads(const struct kv_reading *only, int p) {
    const int r0 = p / 64 * 64, r1 = r0 + 64;
    return !only || r0 < 4 || (r0 < only->to && r1 > only->from) || r1 > only->tail;
}

/* The same over the positions a reading reads (all when NULL). */
static void reference_attend_reading(const struct kv_data *d, const struct model_config *c,
                                     const struct ebb_backend *be, int bits, int layer, int kvh, const float *q,
                                     int n_pos, float scale, const struct kv_reading *only, double *out) {
    const int hd = c->head_dim;
    int group = 64;
    while (hd % group) group /= 2;
    const int rotate = hd % 64 == 0;
    int body_end = bits == 32 || bits == 16 ? 0 : ((n_pos - 1) / 64 - 1) * 64;
    if (body_end < 0) body_end = 0;
    double *s = malloc((size_t)n_pos * sizeof(double));
    float *kq = malloc((size_t)n_pos * hd * sizeof(float)), *vq = malloc((size_t)n_pos * hd * sizeof(float));
    for (int i = 0; i < n_pos; i++) {
        const float *k = data_k(d, i, layer) + kvh * hd, *v = data_v(d, i, layer) + kvh * hd;
        float *ki = kq + (size_t)i * hd, *vi = vq + (size_t)i * hd;
        memcpy(ki, k, (size_t)hd * sizeof(float));
        memcpy(vi, v, (size_t)hd * sizeof(float));
        if (bits == 16) {
            for (int j = 0; j < hd; j++) {
                ki[j] = ebb_f16_to_f32(ebb_f32_to_f16(ki[j]));
                vi[j] = ebb_f16_to_f32(ebb_f32_to_f16(vi[j]));
            }
        } else if (i >= 4 && i < body_end) {
            uint8_t codes[1024];
            uint16_t dm[256];
            for (int pass = 0; pass < 2; pass++) {
                float *x = pass ? vi : ki;
                if (rotate) be->hadamard64(x, hd);
                ebb_kvq_quantize_row(bits, x, hd, group, codes, dm);
                ebb_kvq_dequantize_row(bits, codes, dm, hd, group, x);
                if (rotate) be->hadamard64(x, hd);
            }
        }
    }
    double max = -INFINITY, sum = 0;
    for (int i = 0; i < n_pos; i++) {
        double dot = 0;
        for (int j = 0; j < hd; j++) dot += (double)q[j] * kq[(size_t)i * hd + j];
        s[i] = reading_reads(only, i) ? dot * scale : -INFINITY;
        if (s[i] > max) max = s[i];
    }
    for (int i = 0; i < n_pos; i++) sum += (s[i] = exp(s[i] - max));
    for (int j = 0; j < hd; j++) out[j] = 0;
    for (int i = 0; i < n_pos; i++)
        for (int j = 0; j < hd; j++) out[j] += s[i] / sum * vq[(size_t)i * hd + j];
    free(s);
    free(kq);
    free(vq);
}

/* A cache at `bits` filled from random data, with the account it draws on
 * and attention scratch for n positions. */
struct attend_fixture {
    struct model_config c;
    struct kv_data d;
    struct kv_account acc;
    struct kv_cache kv;
    float *scratch;
};

static void fixture_init(struct attend_fixture *f, int n_layer, int n_head_kv, int head_dim, int bits, int n) {
    f->c = small_config(n_layer, n_head_kv, head_dim);
    make_data(&f->d, &f->c, n);
    CHECK(kv_account_init(&f->acc, &f->c, bits, 0) == 0);
    CHECK(kv_cache_init(&f->kv, &f->c, n, &f->acc) == 0);
    f->scratch = malloc(kv_attend_scratch(&f->c, n) * sizeof(float));
}

static void fixture_free(struct attend_fixture *f) {
    free(f->scratch);
    kv_cache_free(&f->kv);
    CHECK(f->acc.allocated_bytes == 0 && f->acc.reserved_bytes == 0);
    kv_account_destroy(&f->acc);
    free(f->d.k);
    free(f->d.v);
}

/* Attention at several query positions of every layer and head, compared
 * with reference_attend at `bits` (largest difference <= tol_exact) and at
 * 32 bits (largest difference <= tol_max, mean <= tol_mean; the values are
 * standard normal, so these are in units of the values' spread). */
static void check_attention(int bits, int n_layer, int n_head_kv, int head_dim, int n, double tol_exact,
                            double tol_max, double tol_mean) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct attend_fixture f;
    fixture_init(&f, n_layer, n_head_kv, head_dim, bits, n);
    const struct model_config c = f.c;
    const struct kv_data d = f.d;
    struct kv_cache *kv = &f.kv;
    float q[1024], out[1024];
    double ref[1024], ref32[1024];
    const float scale = 1.0f / sqrtf((float)head_dim);
    double worst_exact = 0, worst_f32 = 0, sum_f32 = 0;
    long count = 0;
    static const int positions[] = {1, 5, 64, 127, 128, 129, 191, 200, 255, 256, 300, 511};
    for (int pi = 0; pi < (int)(sizeof positions / sizeof *positions); pi++) {
        const int n_pos = positions[pi];
        if (n_pos > n) continue;
        /* The cache grows to the query's position first: queries come at
         * the end of what is stored, as in a forward pass. */
        CHECK(fill_cache(kv, be, &d, n_pos, 256) == 0);
        for (int l = 0; l < n_layer; l++)
            for (int h = 0; h < n_head_kv; h++) {
                /* A query that prefers one earlier key, as real ones do. */
                const float *kt = data_k(&d, (n_pos * 7 + h) % n_pos, l) + h * head_dim;
                for (int j = 0; j < head_dim; j++) q[j] = 0.5f * kt[j] + gauss();
                kv_attend(kv, be, l, h, q, n_pos, scale, f.scratch, out);
                reference_attend(&d, &c, be, bits, l, h, q, n_pos, scale, ref);
                reference_attend(&d, &c, be, 32, l, h, q, n_pos, scale, ref32);
                for (int j = 0; j < head_dim; j++) {
                    worst_exact = fmax(worst_exact, fabs(out[j] - ref[j]));
                    worst_f32 = fmax(worst_f32, fabs(out[j] - ref32[j]));
                    sum_f32 += fabs(out[j] - ref32[j]);
                    count++;
                }
            }
    }
    CHECK_MSG(worst_exact <= tol_exact, "kv_bits %d head_dim %d: attention differs from the documented semantics by %g",
              bits, head_dim, worst_exact);
    CHECK_MSG(worst_f32 <= tol_max && sum_f32 / count <= tol_mean,
              "kv_bits %d head_dim %d: attention differs from f32 by up to %g, %g on average (tolerance %g, %g)",
              bits, head_dim, worst_f32, sum_f32 / count, tol_max, tol_mean);
    printf("kv_bits %2d head_dim %3d: vs its semantics %.2g; vs f32 %.3g at most, %.3g on average\n", bits, head_dim,
           worst_exact, worst_f32, sum_f32 / count);
    fixture_free(&f);
}

static void test_attention(void) {
    /* Stated tolerances against f32 attention, in units of the values'
     * standard deviation, at most / on average: f16 0.005 / 0.001, KV8
     * 0.03 / 0.005, KV4 1.0 / 0.06. (Keys have outlier channels and queries
     * lean on one key, so attention is peaked, as in real models.) KV4's
     * largest difference is not a noise level but the rare near tie between
     * two keys that 4-bit keys reorder: the output then moves toward the
     * other key's value, by up to the two values' difference (0.63 seen at
     * head_dim 64 with this data). The mean is the quality bound; the
     * exact-semantics bound (1e-4) is the correctness one. */
    check_attention(32, 2, 2, 64, 300, 1e-5, 1e-5, 1e-6);
    check_attention(16, 2, 2, 64, 300, 1e-4, 5e-3, 1e-3);
    check_attention(8, 2, 2, 64, 300, 1e-4, 3e-2, 5e-3);
    check_attention(4, 2, 3, 64, 520, 1e-4, 1.0, 0.06);
    check_attention(4, 1, 2, 128, 300, 1e-4, 1.0, 0.06);
    check_attention(4, 1, 2, 96, 300, 1e-4, 1.0, 0.06);    /* groups of 32, no rotation */
    check_attention(8, 1, 1, 80, 200, 1e-4, 3e-2, 5e-3);  /* groups of 16 */
}

/* Positions a query reads at full precision give bit-identical results to
 * an f32 cache: the whole context while it fits the window, and the result
 * does not depend on how the positions were batched. */
static void test_window_exact_and_batch_invariant(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct model_config c = small_config(2, 2, 64);
    const int n = 400;
    struct kv_data d;
    make_data(&d, &c, n);
    struct kv_account a32, a4;
    kv_account_init(&a32, &c, 32, 0);
    kv_account_init(&a4, &c, 4, 0);
    struct kv_cache f32, by1, by256, by37;
    CHECK(kv_cache_init(&f32, &c, n, &a32) == 0);
    CHECK(kv_cache_init(&by1, &c, n, &a4) == 0);
    CHECK(kv_cache_init(&by256, &c, n, &a4) == 0);
    CHECK(kv_cache_init(&by37, &c, n, &a4) == 0);
    CHECK(fill_cache(&f32, be, &d, n, 256) == 0);
    float *scratch = malloc(kv_attend_scratch(&c, n) * sizeof(float));
    float q[64], o32[64], o1[64], o256[64], o37[64];
    int exact = 1, invariant = 1, differs = 0;
    /* The KV4 caches grow in passes of 1, 256 and 37 positions, and each
     * is queried at every position of a pass after the pass is stored, as
     * a forward pass reads it (window pages before the pass are gone). */
    for (int t = 0; t < n; t++) {
        if (t >= by1.n_past) CHECK(fill_cache(&by1, be, &d, t + 1, 1) == 0);
        if (t >= by256.n_past) CHECK(fill_cache(&by256, be, &d, t + 256 < n ? t + 256 : n, 256) == 0);
        if (t >= by37.n_past) CHECK(fill_cache(&by37, be, &d, t + 37 < n ? t + 37 : n, 37) == 0);
        for (int l = 0; l < 2; l++)
            for (int h = 0; h < 2; h++) {
                for (int j = 0; j < 64; j++) q[j] = gauss();
                kv_attend(&f32, be, l, h, q, t + 1, 0.125f, scratch, o32);
                kv_attend(&by1, be, l, h, q, t + 1, 0.125f, scratch, o1);
                kv_attend(&by256, be, l, h, q, t + 1, 0.125f, scratch, o256);
                kv_attend(&by37, be, l, h, q, t + 1, 0.125f, scratch, o37);
                if (t < 128) exact &= !memcmp(o32, o1, sizeof o1) && !memcmp(o32, o256, sizeof o1);
                else differs |= memcmp(o32, o1, sizeof o1) != 0;
                invariant &= !memcmp(o1, o256, sizeof o1) && !memcmp(o1, o37, sizeof o1);
            }
    }
    CHECK_MSG(exact, "within the recent window KV4 attention must equal f32 attention bit for bit");
    CHECK_MSG(invariant, "KV4 attention depends on how positions were batched");
    CHECK_MSG(differs, "beyond the window KV4 should read quantized positions");
    /* Held: every body page, the sinks, and the window pages of the last
     * pass: from the page before its first position's through its last's
     * (decoding: 2; by256's last pass 256..399: 4; by37's 370..399: 3). */
    const struct kv_layout *l4 = &a4.layout;
    const size_t body = (size_t)((n + 63) / 64) * l4->page_bytes + l4->sink_bytes;
    CHECK(by1.n_pages == (n + 63) / 64 && by256.n_pages == by1.n_pages && by37.n_pages == by1.n_pages);
    CHECK_MSG(a4.allocated_bytes == 3 * body + (size_t)(2 + 4 + 3) * l4->window_page_bytes,
              "allocated %zu, expected %zu", a4.allocated_bytes, 3 * body + (size_t)(2 + 4 + 3) * l4->window_page_bytes);
    free(scratch);
    kv_cache_free(&f32);
    kv_cache_free(&by1);
    kv_cache_free(&by256);
    kv_cache_free(&by37);
    CHECK(a4.allocated_bytes == 0 && a4.reserved_bytes == 0 && a32.allocated_bytes == 0);
    kv_account_destroy(&a32);
    kv_account_destroy(&a4);
    free(d.k);
    free(d.v);
}

/* ------------------------------------------------------------- account */

/* A query's result does not depend on the block it is computed in: the
 * queries of a pass, in blocks of 1, 5 and 16 tokens times two heads,
 * equal the same queries one at a time, bit for bit, at every precision
 * and for rotated and unrotated layouts. */
static void test_block_invariance(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    static const int shapes[][2] = {{64, 4}, {96, 16}, {64, 8}, {64, 16}, {64, 32}, {96, 4}};   /* head_dim, bits */
#if defined(__SANITIZE_ADDRESS__)
    const int n_shapes = 2;   /* about 20 times slower there: the rotated and the plain layout */
#else
    const int n_shapes = 6;
#endif
    const int n = 300, pass = 110, n_head = 2;
    for (int si = 0; si < n_shapes; si++) {
        const int hd = shapes[si][0], bits = shapes[si][1];
        struct attend_fixture f;
        fixture_init(&f, 1, 2, hd, bits, n);
        struct kv_cache *kv = &f.kv;
        float *scratch = f.scratch;
        float *q = malloc((size_t)pass * n_head * hd * sizeof(float));
        float *blocked = malloc((size_t)pass * n_head * hd * sizeof(float)), one[128];
        int same = 1;
        for (int p0 = 0; p0 < n; p0 += pass) {
            const int p1 = p0 + pass < n ? p0 + pass : n;
            CHECK(fill_cache(kv, be, &f.d, p1, p1 - p0) == 0);
            for (int i = 0; i < (p1 - p0) * n_head * hd; i++) q[i] = gauss();
            static const int block_tokens[] = {1, 5, 16};
            for (int bi = 0; bi < 3; bi++) {
                for (int t0 = 0; t0 < p1 - p0; t0 += block_tokens[bi]) {
                    const int nt = p1 - p0 - t0 < block_tokens[bi] ? p1 - p0 - t0 : block_tokens[bi];
                    for (int kvh = 0; kvh < 2; kvh++) {
                        /* Heads 2*kvh and 2*kvh+1 of a 4-head token share KV head kvh; here each token
                         * carries just its n_head heads for this KV head, at stride n_head * hd. */
                        const size_t at = (size_t)t0 * n_head * hd;
                        kv_attend_block(kv, be, 0, kvh, q + at, blocked + at, (size_t)n_head * hd, nt, n_head, p0 + t0,
                                        0.125f, scratch);
                        for (int t = t0; t < t0 + nt; t++)
                            for (int h = 0; h < n_head; h++) {
                                const float *qq = q + ((size_t)t * n_head + h) * hd;
                                kv_attend(kv, be, 0, kvh, qq, p0 + t + 1, 0.125f, scratch, one);
                                same &= !memcmp(one, blocked + ((size_t)t * n_head + h) * hd, (size_t)hd * sizeof(float));
                            }
                    }
                }
            }
        }
        CHECK_MSG(same, "kv_bits %d head_dim %d: a query's attention depends on the block it is computed in", bits, hd);
        free(q);
        free(blocked);
        fixture_free(&f);
    }
}

static void test_account_bytes(void) {
    /* SmolLM2-135M's shape: 30 layers, 3 KV heads of 64. */
    struct model_config c = small_config(30, 3, 64);
    const size_t L = 30, D = 192;
    struct {
        int bits;
        size_t row;        /* one position's K (or V) of one layer */
        size_t window;     /* f32 window page */
        size_t sink;
    } expect[] = {
        {32, D * 4, 0, 0},
        {16, D * 2, 0, 0},
        {8, D + D / 64 * 4, 2 * L * 64 * D * 4, 2 * L * 4 * D * 4},
        {4, D / 2 + D / 64 * 4, 2 * L * 64 * D * 4, 2 * L * 4 * D * 4},
    };
    for (int e = 0; e < 4; e++) {
        struct kv_account a;
        CHECK(kv_account_init(&a, &c, expect[e].bits, 0) == 0);
        const size_t page = 2 * L * 64 * expect[e].row;
        CHECK(a.layout.page_bytes == page);
        CHECK(a.layout.window_page_bytes == expect[e].window);
        static const int ctxs[] = {1, 64, 65, 100, 128, 129, 256, 300, 1000, 2048};
        for (int i = 0; i < 10; i++) {
            const int n = ctxs[i], pages = (n + 63) / 64;
            /* Window pages a sequence can hold at once: a pass of up to
             * min(n, 256) new positions spans its pages plus the one before. */
            const int b = n < 256 ? n : 256;
            int w = 2 + (b + 62) / 64;
            if (w > pages) w = pages;
            size_t want = (size_t)pages * page;
            if (expect[e].window) want += (size_t)w * expect[e].window + expect[e].sink;
            CHECK_MSG(kv_account_bytes_for(&a, n) == want, "kv_bits %d n_ctx %d: %zu bytes, expected %zu",
                      expect[e].bits, n, kv_account_bytes_for(&a, n), want);
        }
        kv_account_destroy(&a);
    }
    /* KV4 holds a 2k context in about a sixth of f32's bytes. */
    struct kv_account a32, a4;
    kv_account_init(&a32, &c, 32, 0);
    kv_account_init(&a4, &c, 4, 0);
    double ratio = (double)kv_account_bytes_for(&a4, 2048) / (double)kv_account_bytes_for(&a32, 2048);
    printf("2048 positions: f32 %zu bytes, KV4 %zu bytes reserved (%.2f)\n", kv_account_bytes_for(&a32, 2048),
           kv_account_bytes_for(&a4, 2048), ratio);
    CHECK(ratio < 0.35);
    kv_account_destroy(&a32);
    kv_account_destroy(&a4);
    CHECK(kv_bits_problem(&c, 12) != NULL);
    CHECK(kv_bits_problem(&c, 4) == NULL);
    struct model_config odd = small_config(1, 1, 36);
    CHECK(kv_bits_problem(&odd, 4) != NULL && kv_bits_problem(&odd, 16) == NULL);
    struct kv_account bad;
    CHECK(kv_account_init(&bad, &odd, 4, 0) == -1);
}

/* Growth never exceeds the reservation, whatever the batch sizes, and the
 * budget refuses reservations beyond it. */
static void test_reservations(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct model_config c = small_config(3, 2, 64);
    const int n = 700;
    struct kv_data d;
    make_data(&d, &c, n);
    struct kv_account probe;
    kv_account_init(&probe, &c, 4, 0);
    const size_t one = kv_account_bytes_for(&probe, n);
    kv_account_destroy(&probe);

    struct kv_account a;
    kv_account_init(&a, &c, 4, 2 * one + one / 2);
    struct kv_cache x, y, z;
    CHECK(kv_cache_init(&x, &c, n, &a) == 0);
    CHECK(kv_cache_init(&y, &c, n, &a) == 0);
    CHECK_MSG(kv_cache_init(&z, &c, n, &a) == KV_OVER_BUDGET, "a third reservation must be refused past the budget");
    CHECK(a.reserved_bytes == 2 * one);
    /* Random pass sizes up to MODEL_MAX_BATCH, twice over (clear in between). */
    int ok = 1;
    for (int round = 0; round < 2; round++) {
        kv_cache_clear(&x);
        for (int p0 = 0; p0 < n;) {
            int step = 1 + (int)(uniform() * (uniform() < 0.5 ? 8 : MODEL_MAX_BATCH));
            int p1 = p0 + step < n ? p0 + step : n;
            ok &= kv_cache_ensure(&x, p1) == 0;
            for (int l = 0; l < 3; l++)
                for (int p = p0; p < p1; p++) kv_store(&x, be, l, p, data_k(&d, p, l), data_v(&d, p, l));
            x.n_past = p0 = p1;
            ok &= a.allocated_bytes <= one;   /* y holds nothing yet */
        }
    }
    CHECK_MSG(ok, "growth inside a reservation failed or exceeded it");
    CHECK(kv_cache_ensure(&x, n + 1) == -1);
    CHECK(kv_cache_ensure(&y, 2 * MODEL_MAX_BATCH) == -1);   /* one pass longer than reserved for */
    kv_cache_free(&x);
    CHECK(kv_cache_init(&z, &c, n, &a) == 0);                /* room again */
    kv_cache_free(&y);
    kv_cache_free(&z);
    CHECK(a.allocated_bytes == 0 && a.reserved_bytes == 0);
    kv_account_destroy(&a);
    free(d.k);
    free(d.v);
}

/* A reservation that starts small and grows as positions are stored (the
 * scheduler's way): it always covers what is held, grows only a page at a
 * time, is refused past the budget without changing anything, and a
 * decoding cache (passes of one) reserves two window pages, not one per
 * prompt chunk. */
static void test_growing_reservations(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct model_config c = small_config(3, 2, 64);
    const int n = 700, first = 10;
    struct kv_data d;
    make_data(&d, &c, n);
    struct kv_account a;
    kv_account_init(&a, &c, 4, 0);
    CHECK_MSG(kv_account_bytes_for_pass(&a, n, 1) < kv_account_bytes_for(&a, n),
              "a decoding cache must reserve fewer window pages than one fed long passes");
    const size_t whole = kv_account_bytes_for_pass(&a, n, first);
    kv_account_set_budget(&a, whole + whole / 3);
    CHECK(kv_account_bytes_for(&a, kv_account_capacity(&a, 100000)) <= whole + whole / 3);
    CHECK(kv_account_bytes_for(&a, kv_account_capacity(&a, 100000) + 1) > whole + whole / 3);
    struct kv_cache x, y;
    CHECK(kv_cache_init_reserving(&x, &c, n, first, first, &a) == KV_OK);
    CHECK(a.reserved_bytes == kv_account_bytes_for_pass(&a, first, first));
    int ok = 1, grew = 0;
    size_t last = a.reserved_bytes;
    for (int p = 0; p < n; p++) {
        const int pass = p == 0 ? first : 1;   /* a prompt, then one token at a time */
        if (p > 0 && p < first) continue;
        ok &= kv_cache_ensure(&x, p + pass) == 0;
        for (int l = 0; l < 3; l++)
            for (int q = p; q < p + pass; q++) kv_store(&x, be, l, q, data_k(&d, q, l), data_v(&d, q, l));
        x.n_past = p + pass;
        ok &= a.allocated_bytes <= a.reserved_bytes && a.reserved_bytes == kv_account_bytes_for_pass(&a, p + pass, first);
        if (a.reserved_bytes != last) {
            grew++;
            ok &= (p + pass - 1) % KV_PAGE_TOKENS == 0;   /* a new page, nothing in between */
            last = a.reserved_bytes;
        }
    }
    CHECK_MSG(ok, "a growing reservation must cover what is held and grow only at page boundaries");
    CHECK(grew == (n - 1) / KV_PAGE_TOKENS);
    kv_cache_free(&x);
    /* Another cache takes most of the budget: growth past it is refused and
     * changes nothing; once the other goes, it succeeds. */
    CHECK(kv_cache_init_reserving(&x, &c, n, first, first, &a) == KV_OK);
    CHECK(kv_cache_init_reserving(&y, &c, n, n - 64, 1, &a) == KV_OK);
    const size_t before = a.reserved_bytes;
    CHECK(kv_cache_reserve(&x, 400) == KV_OVER_BUDGET);
    CHECK(a.reserved_bytes == before && x.n_reserved == first);
    CHECK(kv_cache_ensure(&x, 400) == -1);
    CHECK(kv_cache_reserve(&x, n + 1) == KV_FAILED);
    kv_cache_free(&y);
    CHECK(kv_cache_reserve(&x, 400) == KV_OK && x.n_reserved == 400);
    CHECK(kv_cache_init_reserving(&y, &c, n, n, n, &a) == KV_OVER_BUDGET);
    CHECK(y.account == NULL && y.pages == NULL);   /* nothing to free */
    kv_cache_free(&x);
    CHECK(a.allocated_bytes == 0 && a.reserved_bytes == 0);
    kv_account_destroy(&a);
    free(d.k);
    free(d.v);
}

/* ---------------------------------------------------------- real model */

struct text_out { char buf[8192]; size_t len; };
/* ------------------------------------------------- context compression */

/* Tiers for compacting a compact cache again (kv_cache_compact_rows rows):
 * per head the sinks and n_keep - 4 random others kept, never one of the
 * store's demoted rows [low_from, low_to); n_low random others demoted. */
static uint8_t *make_tiers_again(const struct model_config *c, int rows, int low_from, int low_to, int n_keep,
                                 int n_low) {
    const int heads = c->n_layer * c->n_head_kv;
    uint8_t *t = malloc((size_t)heads * rows);
    int *order = malloc((size_t)rows * sizeof(int));
    for (int h = 0; h < heads; h++) {
        uint8_t *th = t + (size_t)h * rows;
        for (int i = 0; i < rows - 4; i++) order[i] = 4 + i;
        for (int i = rows - 5; i > 0; i--) {
            const int j = (int)(uniform() * (i + 1)) % (i + 1), x = order[i];
            order[i] = order[j];
            order[j] = x;
        }
        for (int i = 0; i < rows; i++) th[i] = i < 4 ? KV_TIER_KEEP : KV_TIER_DROP;
        for (int i = 0, kept = 4; i < rows - 4 && kept < n_keep; i++)
            if (order[i] < low_from || order[i] >= low_to) {
                th[order[i]] = KV_TIER_KEEP;
                kept++;
            }
        for (int i = 0, low = 0; i < rows - 4 && low < n_low; i++)
            if (th[order[i]] == KV_TIER_DROP) {
                th[order[i]] = KV_TIER_LOW;
                low++;
            }
    }
    free(order);
    return t;
}

/* Every (layer, head) of a cache of c's shape with the same tier rule:
 * positions < 4 kept, then keep/low/drop from a per-head shuffle with
 * n_keep kept and n_low demoted. */
static uint8_t *make_tiers(const struct model_config *c, int boundary, int n_keep, int n_low) {
    return make_tiers_again(c, boundary, 0, 0, n_keep, n_low);
}

/* Attention of a block of 4 tokens x 2 heads at the end of the cache for
 * every layer and KV head, into out[layer][kvh][4 * 2 * head_dim]. */
static void attend_tail(const struct kv_cache *kv, const struct model_config *c, const float *q, float *scratch,
                        float *out) {
    const struct ebb_backend *be = ebb_backend_cpu();
    const int hd = c->head_dim, QD = 2 * hd, n = kv->n_past;
    for (int l = 0; l < c->n_layer; l++)
        for (int h = 0; h < c->n_head_kv; h++)
            kv_attend_block(kv, be, l, h, q, out + ((size_t)l * c->n_head_kv + h) * 4 * QD, (size_t)QD, 4, 2, n - 4,
                            0.125f, scratch);
}

/* Keeping every position is lossless: attention over the compact store is
 * the same, bit for bit, as over the pages it replaced, at every precision
 * (the store holds the same rows and they are read the same way). */
static void test_compact_lossless(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    static const int bits_list[] = {32, 16, 8, 4};
    for (int b = 0; b < 4; b++)
        for (int hdi = 0; hdi < 2; hdi++) {
            const int hd = hdi ? 40 : 64, n = 300;
            struct attend_fixture f;
            fixture_init(&f, 2, 2, hd, bits_list[b], n);
            CHECK(fill_cache(&f.kv, be, &f.d, n, 100) == 0);
            const int boundary = kv_cache_compact_limit(&f.kv);
            CHECK(boundary == 192);
            uint8_t *tiers = make_tiers(&f.c, boundary, boundary, 0);
            const size_t per = (size_t)4 * 2 * hd, total = per * 2 * 2;
            float *q = malloc(per * sizeof(float)), *before = malloc(total * sizeof(float)),
                  *after = malloc(total * sizeof(float));
            for (size_t i = 0; i < per; i++) q[i] = gauss();
            attend_tail(&f.kv, &f.c, q, f.scratch, before);
            CHECK(kv_cache_compact(&f.kv, be, boundary, tiers, 2) == 0);
            attend_tail(&f.kv, &f.c, q, f.scratch, after);
            CHECK_MSG(!memcmp(before, after, total * sizeof(float)),
                      "bits %d head_dim %d: keeping every position changed attention", bits_list[b], hd);
            free(q);
            free(before);
            free(after);
            free(tiers);
            fixture_free(&f);
        }
}

/* One head's rows of the 2-bit tier as the documented formats give them
 * back: in order of position, chunks of 64, keys per channel and values
 * per row, in the H64 basis when head_dim is a multiple of 64. */
static void demote_reference(const struct ebb_backend *be, float *k, float *v, int n_rows, int hd, int key_bits) {
    int group = 64;
    while (hd % group) group /= 2;
    const int rotate = hd % 64 == 0;
    uint8_t codes[64 * 1024 / 4];
    uint16_t dm[2 * 1024];
    for (int r = 0; r < n_rows && rotate; r++) {
        be->hadamard64(k + (size_t)r * hd, hd);
        be->hadamard64(v + (size_t)r * hd, hd);
    }
    for (int r = 0; r < n_rows && key_bits == 4; r++) {
        ebb_kvq_quantize_row(4, k + (size_t)r * hd, hd, group, codes, dm);
        ebb_kvq_dequantize_row(4, codes, dm, hd, group, k + (size_t)r * hd);
    }
    for (int c0 = 0; c0 < n_rows && key_bits == 2; c0 += 64) {
        const int rows = n_rows - c0 < 64 ? n_rows - c0 : 64;
        ebb_kvq_quantize_channels(2, k + (size_t)c0 * hd, rows, hd, group, codes, (size_t)hd / 4, dm);
        ebb_kvq_dequantize_channels(2, codes, (size_t)hd / 4, dm, rows, hd, group, k + (size_t)c0 * hd);
    }
    for (int r = 0; r < n_rows; r++) {
        ebb_kvq_quantize_row(2, v + (size_t)r * hd, hd, group, codes, dm);
        ebb_kvq_dequantize_row(2, codes, dm, hd, group, v + (size_t)r * hd);
    }
    for (int r = 0; r < n_rows && rotate; r++) {
        be->hadamard64(k + (size_t)r * hd, hd);
        be->hadamard64(v + (size_t)r * hd, hd);
    }
}

/* Attention of a block of 4 tokens x 2 query heads at the end of f's
 * n-position cache (layer l, KV head h) against softmax in double over
 * k, v[m][head_dim]: what the cache should hold, in order, the block's own
 * rows last. Each query alone must give the block's bits. Raises *worst,
 * clears *invariant. */
static void check_tail_attention(struct attend_fixture *f, int l, int h, int n, const float *k, const float *v, int m,
                                 double *worst, int *invariant) {
    const struct ebb_backend *be = ebb_backend_cpu();
    const int hd = f->c.head_dim;
    float q[4 * 2 * 64], block[4 * 2 * 64], one[64];
    for (int i = 0; i < 4 * 2 * hd; i++) q[i] = gauss();
    kv_attend_block(&f->kv, be, l, h, q, block, (size_t)2 * hd, 4, 2, n - 4, 0.125f, f->scratch);
    for (int j = 0; j < 8; j++) {
        const int pos = n - 4 + j / 2, rows = m - (n - 1 - pos);
        kv_attend_block(&f->kv, be, l, h, q + (size_t)j * hd, one, 0, 1, 1, pos, 0.125f, f->scratch);
        *invariant &= !memcmp(one, block + (size_t)j * hd, (size_t)hd * sizeof(float));
        double s[512], mx = -INFINITY, sum = 0;
        for (int r = 0; r < rows; r++) {
            double dot = 0;
            for (int i = 0; i < hd; i++) dot += (double)q[j * hd + i] * k[(size_t)r * hd + i];
            s[r] = dot * 0.125;
            if (s[r] > mx) mx = s[r];
        }
        for (int r = 0; r < rows; r++) sum += (s[r] = exp(s[r] - mx));
        for (int i = 0; i < hd; i++) {
            double o = 0;
            for (int r = 0; r < rows; r++) o += s[r] / sum * v[(size_t)r * hd + i];
            if (fabs(o - block[(size_t)j * hd + i]) > *worst) *worst = fabs(o - block[(size_t)j * hd + i]);
        }
    }
}

/* A compacted f32 cache against attention in double over what the tiers
 * say remains: kept positions exact, dropped ones absent, demoted ones as
 * the 2-bit formats return them (demote_reference), the positions from the
 * boundary on exact. Also: blocks give the same bits as single queries. */
static void check_compact_semantics(int hd, int n_keep, int n_low, int key_bits) {
    const struct ebb_backend *be = ebb_backend_cpu();
    const int n = 330;
    struct attend_fixture f;
    fixture_init(&f, 2, 2, hd, 32, n);
    CHECK(fill_cache(&f.kv, be, &f.d, n, 64) == 0);
    const int boundary = kv_cache_compact_limit(&f.kv);
    uint8_t *tiers = make_tiers(&f.c, boundary, n_keep, n_low);
    CHECK(kv_cache_compact(&f.kv, be, boundary, tiers, key_bits) == 0);
    const struct kv_compact_info ci = kv_cache_compact_info(&f.kv);
    CHECK(ci.boundary == boundary && ci.n_keep == n_keep && ci.n_low == n_low);
    float *k = malloc((size_t)n * hd * sizeof(float)), *v = malloc((size_t)n * hd * sizeof(float));
    float *lk = malloc((size_t)n * hd * sizeof(float)), *lv = malloc((size_t)n * hd * sizeof(float));
    double worst = 0;
    int invariant = 1;
    for (int l = 0; l < 2; l++)
        for (int h = 0; h < 2; h++) {
            const uint8_t *t = tiers + ((size_t)l * 2 + h) * boundary;
            int m = 0, nl = 0;
            for (int p = 0; p < boundary; p++)   /* the demoted rows, in position order */
                if (t[p] == KV_TIER_LOW) {
                    memcpy(lk + (size_t)nl * hd, data_k(&f.d, p, l) + h * hd, (size_t)hd * sizeof(float));
                    memcpy(lv + (size_t)nl * hd, data_v(&f.d, p, l) + h * hd, (size_t)hd * sizeof(float));
                    nl++;
                }
            demote_reference(be, lk, lv, nl, hd, key_bits);
            nl = 0;
            for (int p = 0; p < n; p++) {
                const float *src_k = data_k(&f.d, p, l) + h * hd, *src_v = data_v(&f.d, p, l) + h * hd;
                if (p < boundary && t[p] == KV_TIER_DROP) continue;
                if (p < boundary && t[p] == KV_TIER_LOW) {
                    src_k = lk + (size_t)nl * hd;
                    src_v = lv + (size_t)nl++ * hd;
                }
                memcpy(k + (size_t)m * hd, src_k, (size_t)hd * sizeof(float));
                memcpy(v + (size_t)m * hd, src_v, (size_t)hd * sizeof(float));
                m++;
            }
            check_tail_attention(&f, l, h, n, k, v, m, &worst, &invariant);
        }
    CHECK_MSG(worst < 2e-5, "head_dim %d keep %d low %d keys %d: compact attention differs from the reference by %g",
              hd, n_keep, n_low, key_bits, worst);
    CHECK_MSG(invariant, "head_dim %d: compact attention depends on the block", hd);
    free(k);
    free(v);
    free(lk);
    free(lv);
    free(tiers);
    fixture_free(&f);
}

static void test_compact_semantics(void) {
    check_compact_semantics(64, 50, 0, 2);      /* drop */
    check_compact_semantics(64, 40, 100, 2);    /* keep, demote (two chunks), drop */
    check_compact_semantics(64, 4, 188, 2);     /* everything demoted but the sinks */
    check_compact_semantics(40, 70, 60, 2);     /* unrotated, groups of 8 */
    check_compact_semantics(64, 40, 100, 4);    /* demoted keys at 4 bits */
    check_compact_semantics(40, 70, 60, 4);
}


/* A compact f32 cache compressed again (a conversation's next turn): 330
 * positions compacted at 256 (60 kept, 80 demoted), 130 more stored, then
 * compacted at 384 over the store's rows and the positions since, against
 * attention in double over what the second tiers say remains: a kept row
 * exact, a demoted one -- demoted now or before -- as the formats give
 * its original row back (demoted keys at 4 bits: every demoted row is
 * quantized once, from what the cache computed), the rest exact. Also
 * blocks against single queries, a demoted row never kept again, and the
 * account: the store replaced, the two new pages gone, the reservation
 * shrunk by what the new store saves more. */
static void check_compact_again(int hd) {
    const struct ebb_backend *be = ebb_backend_cpu();
    const int n1 = 330, n = 460, keep1 = 60, low1 = 80;
    struct attend_fixture f;
    fixture_init(&f, 2, 2, hd, 32, n);
    CHECK(fill_cache(&f.kv, be, &f.d, n1, 64) == 0);
    const int b1 = kv_cache_compact_limit(&f.kv);
    uint8_t *t1 = make_tiers(&f.c, b1, keep1, low1);
    CHECK(kv_cache_compact(&f.kv, be, b1, t1, 4) == 0);
    CHECK(fill_cache(&f.kv, be, &f.d, n, 64) == 0);
    const int b2 = kv_cache_compact_limit(&f.kv), rows = kv_cache_compact_rows(&f.kv, b2);
    CHECK(b1 == 256 && b2 == 384 && rows == keep1 + low1 + 128);
    uint8_t *t2 = make_tiers_again(&f.c, rows, keep1, keep1 + low1, 50, 110);
    /* Refused, nothing changed: a demoted row kept, another key format, a
     * boundary before the store's. */
    const size_t alloc0 = f.acc.allocated_bytes, res0 = f.acc.reserved_bytes, store0 = kv_cache_compact_info(&f.kv).bytes;
    uint8_t *bad = malloc((size_t)4 * rows);
    memcpy(bad, t2, (size_t)4 * rows);
    for (int h = 0; h < 4; h++) {   /* swap a kept row with a demoted-before one, in every head */
        uint8_t *th = bad + (size_t)h * rows;
        int k = 4;
        while (th[k] != KV_TIER_KEEP) k++;
        int d = keep1;
        while (th[d] == KV_TIER_KEEP) d++;
        th[k] = th[d];
        th[d] = KV_TIER_KEEP;
    }
    CHECK(kv_cache_compact(&f.kv, be, b2, bad, 4) == -1);
    CHECK(kv_cache_compact(&f.kv, be, b2, t2, 2) == -1);
    CHECK(kv_cache_compact(&f.kv, be, 192, t2, 4) == -1);
    CHECK(f.acc.allocated_bytes == alloc0 && f.acc.reserved_bytes == res0 && kv_cache_compact_info(&f.kv).boundary == b1);
    free(bad);
    CHECK(kv_cache_compact(&f.kv, be, b2, t2, 4) == 0);
    const struct kv_compact_info ci = kv_cache_compact_info(&f.kv);
    CHECK(ci.boundary == b2 && ci.n_keep == 50 && ci.n_low == 110);
    const size_t page = f.acc.layout.page_bytes;
    CHECK_MSG(f.acc.allocated_bytes == alloc0 - 2 * page - store0 + ci.bytes, "allocated %zu, expected %zu",
              f.acc.allocated_bytes, alloc0 - 2 * page - store0 + ci.bytes);
    CHECK(f.acc.reserved_bytes == res0 - (6 * page - ci.bytes - (4 * page - store0)));
    float *k = malloc((size_t)n * hd * sizeof(float)), *v = malloc((size_t)n * hd * sizeof(float));
    double worst = 0;
    int invariant = 1;
    for (int l = 0; l < 2; l++)
        for (int h = 0; h < 2; h++) {
            const uint8_t *first = t1 + ((size_t)l * 2 + h) * b1, *second = t2 + ((size_t)l * 2 + h) * rows;
            int row_pos[512], nk = 0, nl = 0;
            for (int p = 0; p < b1; p++) if (first[p] == KV_TIER_KEEP) row_pos[nk++] = p;
            for (int p = 0; p < b1; p++) if (first[p] == KV_TIER_LOW) row_pos[nk + nl++] = p;
            for (int p = b1; p < b2; p++) row_pos[nk + nl + p - b1] = p;
            int m = 0;
            for (int r = 0; r < rows + (n - b2); r++) {
                const int pos = r < rows ? row_pos[r] : b2 + r - rows;
                if (r < rows && second[r] == KV_TIER_DROP) continue;
                memcpy(k + (size_t)m * hd, data_k(&f.d, pos, l) + h * hd, (size_t)hd * sizeof(float));
                memcpy(v + (size_t)m * hd, data_v(&f.d, pos, l) + h * hd, (size_t)hd * sizeof(float));
                if (r < rows && second[r] == KV_TIER_LOW) demote_reference(be, k + (size_t)m * hd, v + (size_t)m * hd, 1, hd, 4);
                m++;
            }
            check_tail_attention(&f, l, h, n, k, v, m, &worst, &invariant);
        }
    CHECK_MSG(worst < 2e-5, "head_dim %d: attention after compacting again differs from the reference by %g", hd, worst);
    CHECK_MSG(invariant, "head_dim %d: attention after compacting again depends on the block", hd);
    free(k);
    free(v);
    free(t1);
    free(t2);
    fixture_free(&f);
}

/* Compacting again with every row where it was and the new positions kept
 * is lossless at every precision: attention moves by float rounding alone
 * (the new positions' rows are summed before the demoted ones now). Demoted
 * rows keep their bytes; with keys per channel they are quantized again
 * with the same chunk, which must give them back too. */
static void check_compact_again_lossless(int bits, int key_bits) {
    const struct ebb_backend *be = ebb_backend_cpu();
    const int n = 460;
    struct attend_fixture f;
    fixture_init(&f, 2, 2, 64, bits, n);
    CHECK(fill_cache(&f.kv, be, &f.d, 330, 64) == 0);
    uint8_t *t1 = make_tiers(&f.c, 256, 60, 80);
    CHECK(kv_cache_compact(&f.kv, be, 256, t1, key_bits) == 0);
    CHECK(fill_cache(&f.kv, be, &f.d, n, 64) == 0);
    const int rows = kv_cache_compact_rows(&f.kv, 384);
    uint8_t *t2 = malloc((size_t)4 * rows);
    for (int h = 0; h < 4; h++)
        for (int r = 0; r < rows; r++) t2[(size_t)h * rows + r] = r >= 60 && r < 140 ? KV_TIER_LOW : KV_TIER_KEEP;
    const size_t per = (size_t)4 * 2 * 64, total = per * 4;
    float *q = malloc(per * sizeof(float)), *before = malloc(total * sizeof(float)), *after = malloc(total * sizeof(float));
    for (size_t i = 0; i < per; i++) q[i] = gauss();
    attend_tail(&f.kv, &f.c, q, f.scratch, before);
    CHECK(kv_cache_compact(&f.kv, be, 384, t2, key_bits) == 0);
    attend_tail(&f.kv, &f.c, q, f.scratch, after);
    double worst = 0;
    for (size_t i = 0; i < total; i++) worst = fmax(worst, fabs((double)before[i] - after[i]));
    CHECK_MSG(worst < 2e-6,
              "bits %d keys %d: compacting again with nothing changed moved attention by %g", bits, key_bits, worst);
    free(q);
    free(before);
    free(after);
    free(t1);
    free(t2);
    fixture_free(&f);
}

/* A conversation of five turns: a cache of n positions grows by 100 and
 * is compacted again each time with random tiers (a demoted row never
 * kept), and after each, attention against the reference built from the
 * rows' original positions: the store keeps its kept rows in order, then
 * the new positions kept; its demoted rows are the kept ones demoted now,
 * those demoted before, then the new positions demoted -- each quantized
 * once from what the cache computed (keys at 4 bits). */
static void test_compact_turns(void) {
    enum { HEADS = 4, MAXN = 760 };
    struct attend_fixture f;
    fixture_init(&f, 2, 2, 64, 32, MAXN);
    int keep_pos[HEADS][MAXN], low_pos[HEADS][MAXN], n_keep = 0, n_low = 0, ok = 1;
    float *k = malloc((size_t)MAXN * 64 * sizeof(float)), *v = malloc((size_t)MAXN * 64 * sizeof(float));
    for (int n = 330; n <= MAXN; n += 100) {
        CHECK(fill_cache(&f.kv, ebb_backend_cpu(), &f.d, n, 64) == 0);
        const int from = f.kv.compact_boundary, boundary = kv_cache_compact_limit(&f.kv);
        const int rows = kv_cache_compact_rows(&f.kv, boundary), keepable = rows - n_low;
        const int keep = 4 + (int)(uniform() * (keepable - 4) * 0.5), low = (int)(uniform() * (rows - keep));
        uint8_t *t = make_tiers_again(&f.c, rows, n_keep, n_keep + n_low, keep, low);
        ok &= kv_cache_compact(&f.kv, ebb_backend_cpu(), boundary, t, 4) == 0;
        int next_keep = 0, next_low = 0;
        for (int h = 0; h < HEADS; h++) {
            int nk = 0, nl = 0, new_keep[MAXN], new_low[MAXN];
            const uint8_t *th = t + (size_t)h * rows;
            for (int pass = 0; pass < 3; pass++)   /* the order compaction writes them in */
                for (int r = 0; r < rows; r++) {
                    const int seg = r < n_keep ? 0 : r < n_keep + n_low ? 1 : 2;
                    const int pos = seg == 0 ? keep_pos[h][r] : seg == 1 ? low_pos[h][r - n_keep] : from + r - n_keep - n_low;
                    if (pass == 0 && th[r] == KV_TIER_KEEP) new_keep[nk++] = pos;
                    if (pass == seg && th[r] == KV_TIER_LOW && seg != 2) new_low[nl++] = pos;
                    if (pass == 2 && seg == 2 && th[r] == KV_TIER_LOW) new_low[nl++] = pos;
                }
            memcpy(keep_pos[h], new_keep, (size_t)nk * sizeof(int));
            memcpy(low_pos[h], new_low, (size_t)nl * sizeof(int));
            next_keep = nk;
            next_low = nl;
        }
        n_keep = next_keep;
        n_low = next_low;
        free(t);
        double worst = 0;
        int invariant = 1;
        for (int l = 0; l < 2; l++)
            for (int h = 0; h < 2; h++) {
                const int hh = l * 2 + h;
                int m = 0;
                for (int i = 0; i < n_keep + n_low + n - boundary; i++, m++) {
                    const int pos = i < n_keep ? keep_pos[hh][i] : i < n_keep + n_low ? low_pos[hh][i - n_keep]
                                                                                      : boundary + i - n_keep - n_low;
                    memcpy(k + (size_t)m * 64, data_k(&f.d, pos, l) + h * 64, 64 * sizeof(float));
                    memcpy(v + (size_t)m * 64, data_v(&f.d, pos, l) + h * 64, 64 * sizeof(float));
                    if (i >= n_keep && i < n_keep + n_low) demote_reference(ebb_backend_cpu(), k + (size_t)m * 64,
                                                                            v + (size_t)m * 64, 1, 64, 4);
                }
                check_tail_attention(&f, l, h, n, k, v, m, &worst, &invariant);
            }
        CHECK_MSG(ok && worst < 2e-5 && invariant, "turn at %d positions: compacted %d, attention off by %g, blocks %d",
                  n, ok, worst, invariant);
    }
    free(k);
    free(v);
    fixture_free(&f);
}

static void test_compact_again(void) {
    test_compact_turns();
    check_compact_again(64);
    check_compact_again(40);
    static const int bits_list[] = {32, 16, 8, 4};
    for (int b = 0; b < 4; b++) {
        check_compact_again_lossless(bits_list[b], 4);
        check_compact_again_lossless(bits_list[b], 2);
    }
}

/* The account follows compaction: the pages before the boundary go, the
 * store's bytes (kv_compact_bytes) come, the reservation shrinks by the
 * difference; rollback cannot reach into the store; a cleared cache gets
 * its pages back and computes as a fresh one; freeing returns everything
 * (fixture_free checks). Refusals change nothing. */
static void test_compact_account(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    for (int bits = 4; bits <= 32; bits *= 2) {
        if (bits == 16) continue;
        const int n = 400;
        struct attend_fixture f;
        fixture_init(&f, 2, 2, 64, bits, n);
        CHECK(fill_cache(&f.kv, be, &f.d, 330, 64) == 0);
        const struct kv_layout *lay = &f.acc.layout;
        const int boundary = kv_cache_compact_limit(&f.kv);
        CHECK(boundary == 256);
        uint8_t *bad = make_tiers(&f.c, boundary, 60, 50);
        const size_t alloc0 = f.acc.allocated_bytes, res0 = f.acc.reserved_bytes;
        CHECK(kv_cache_compact(&f.kv, be, 320, bad, 2) == -1);   /* beyond the limit */
        CHECK(kv_cache_compact(&f.kv, be, 100, bad, 2) == -1);   /* not a page boundary */
        CHECK(kv_cache_compact(&f.kv, be, boundary, bad, 3) == -1);   /* no such key format */
        bad[2] = KV_TIER_LOW;                                 /* a sink not kept */
        CHECK(kv_cache_compact(&f.kv, be, boundary, bad, 2) == -1);
        bad[2] = KV_TIER_KEEP;
        bad[10 + boundary] = bad[10 + boundary] == KV_TIER_DROP ? KV_TIER_KEEP : KV_TIER_DROP;   /* counts differ */
        CHECK(kv_cache_compact(&f.kv, be, boundary, bad, 2) == -1);
        CHECK(f.acc.allocated_bytes == alloc0 && f.acc.reserved_bytes == res0 && !f.kv.compact);
        free(bad);

        uint8_t *tiers = make_tiers(&f.c, boundary, 60, 50);
        CHECK(kv_cache_compact(&f.kv, be, boundary, tiers, 2) == 0);
        CHECK(kv_cache_compact(&f.kv, be, boundary, tiers, 2) == -1);   /* already compact */
        CHECK(kv_compact_bytes(lay, 60, 50, 4) > kv_compact_bytes(lay, 60, 50, 2));
        const size_t store = kv_compact_bytes(lay, 60, 50, 2), pages = (size_t)(boundary / 64) * lay->page_bytes;
        CHECK(kv_cache_compact_info(&f.kv).bytes == store && store < pages);
        CHECK_MSG(f.acc.allocated_bytes == alloc0 - pages + store, "bits %d: allocated %zu, expected %zu", bits,
                  f.acc.allocated_bytes, alloc0 - pages + store);
        CHECK(f.acc.reserved_bytes == res0 - (pages - store));
        /* Growth after compaction reserves pages only for what lies beyond. */
        CHECK(fill_cache(&f.kv, be, &f.d, n, 1) == 0);
        CHECK(f.acc.reserved_bytes == kv_layout_bytes_for(lay, n) - (pages - store));
        CHECK(kv_cache_truncate(&f.kv, boundary + 63) == -1 && f.kv.n_past == n);
        /* Cleared, the cache is whole again: same bits as a fresh one. */
        kv_cache_clear(&f.kv);
        CHECK(!f.kv.compact && f.kv.n_past == 0);
        CHECK(fill_cache(&f.kv, be, &f.d, n, 64) == 0);
        struct kv_cache fresh;
        CHECK(kv_cache_init(&fresh, &f.c, n, &f.acc) == 0);
        CHECK(fill_cache(&fresh, be, &f.d, n, 64) == 0);
        float q[64], a[64], b[64];
        for (int i = 0; i < 64; i++) q[i] = gauss();
        kv_attend(&f.kv, be, 1, 1, q, n, 0.125f, f.scratch, a);
        kv_attend(&fresh, be, 1, 1, q, n, 0.125f, f.scratch, b);
        CHECK_MSG(!memcmp(a, b, sizeof a), "bits %d: a cleared compact cache computes differently", bits);
        kv_cache_free(&fresh);
        free(tiers);
        fixture_free(&f);
    }
}

/* The queries recorded for compression's scoring are memory the account
 * holds: reserved within the budget with the cache, counted as allocated,
 * and given back when forgotten, replaced, cleared or freed. */
static void test_observation_account(void) {
    struct attend_fixture f;
    fixture_init(&f, 3, 2, 64, 4, 300);
    const int q_dim = 4 * 64;
    const size_t bytes = kv_observation_bytes(3, 32, q_dim, 0);
    CHECK(bytes == (size_t)3 * 32 * q_dim * sizeof(float));
    const size_t alloc0 = f.acc.allocated_bytes, res0 = f.acc.reserved_bytes;
    CHECK(kv_cache_observe(&f.kv, 100, 32, q_dim, 0) == KV_OK);
    CHECK_MSG(f.acc.allocated_bytes == alloc0 + bytes && f.acc.reserved_bytes == res0 + bytes,
              "allocated %zu, reserved %zu: the recording's %zu bytes not charged", f.acc.allocated_bytes,
              f.acc.reserved_bytes, bytes);
    CHECK(kv_cache_observe(&f.kv, 100, 32, q_dim, 0) == KV_OK);   /* replaced: charged once */
    CHECK(f.acc.allocated_bytes == alloc0 + bytes && f.acc.reserved_bytes == res0 + bytes);
    kv_cache_forget_observation(&f.kv);
    CHECK(f.acc.allocated_bytes == alloc0 && f.acc.reserved_bytes == res0);
    /* A budget that takes the cache but not the recording refuses it and
     * changes nothing; one byte more than both takes it. */
    kv_account_set_budget(&f.acc, res0 + bytes - 1);
    CHECK(kv_cache_observe(&f.kv, 100, 32, q_dim, 0) == KV_OVER_BUDGET);
    CHECK(!f.kv.obs && f.acc.allocated_bytes == alloc0 && f.acc.reserved_bytes == res0);
    kv_account_set_budget(&f.acc, res0 + bytes);
    CHECK(kv_cache_observe(&f.kv, 100, 32, q_dim, 0) == KV_OK);
    kv_cache_clear(&f.kv);
    CHECK(!f.kv.obs && f.acc.reserved_bytes == res0);
    CHECK(kv_cache_observe(&f.kv, 100, 32, q_dim, 0) == KV_OK);
    fixture_free(&f);   /* checks that freeing gives everything back */
}

/* Compression scores a prompt after its last pass, with the queries of its
 * last 32 positions; when that pass was short, the window pages those
 * queries read have been given back, and the weights come from the body:
 * each query's weights still sum to 1 and agree with an f32 cache's. */
static void test_weights_after_short_pass(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct attend_fixture f, f32;
    fixture_init(&f, 1, 2, 64, 4, 513);
    fixture_init(&f32, 1, 2, 64, 32, 513);
    CHECK(fill_cache(&f.kv, be, &f.d, 512, 256) == 0 && fill_cache(&f.kv, be, &f.d, 513, 1) == 0);
    CHECK(fill_cache(&f32.kv, be, &f.d, 513, 256) == 0);
    CHECK(f.kv.window_lo == 7);   /* the last pass (position 512) holds pages 7 and 8 */
    enum { T = 8, POS0 = 513 - 32 };
    float q[T * 2 * 64], *w = malloc((size_t)T * 2 * 513 * sizeof(float)), *w32 = malloc((size_t)T * 2 * 513 * sizeof(float));
    for (int i = 0; i < T * 2 * 64; i++) q[i] = gauss();
    kv_attend_weights(&f.kv, be, 0, 1, q, 128, T, 2, POS0, 0.125f, NULL, f.scratch, w, 513);
    kv_attend_weights(&f32.kv, be, 0, 1, q, 128, T, 2, POS0, 0.125f, NULL, f32.scratch, w32, 513);
    double worst_sum = 0, worst = 0;
    for (int j = 0; j < T * 2; j++) {
        double sum = 0;
        for (int p = 0; p <= POS0 + j / 2; p++) {
            sum += w[(size_t)j * 513 + p];
            worst = fmax(worst, fabs(w[(size_t)j * 513 + p] - w32[(size_t)j * 513 + p]));
        }
        worst_sum = fmax(worst_sum, fabs(sum - 1));
    }
    CHECK_MSG(worst_sum < 1e-5 && worst < 0.1, "weights after a short pass: sum off by %g, %g from f32", worst_sum,
              worst);
    /* Reading only some pages (a reconstruction's scoring): the sinks'
     * page, [130, 200)'s (pages 2 and 3) and from 448 on (7 and 8); the
     * others are not written, and the weights are the whole cache's
     * renormalised over what was read. */
    const struct kv_reading only = {130, 200, 448};
    float *wo = malloc((size_t)T * 2 * 513 * sizeof(float));
    for (int i = 0; i < T * 2 * 513; i++) wo[i] = 7;
    kv_attend_weights(&f.kv, be, 0, 1, q, 128, T, 2, POS0, 0.125f, &only, f.scratch, wo, 513);
    double worst_read = 0, worst_sum_read = 0;
    int unread_written = 0;
    for (int j = 0; j < T * 2; j++) {
        const float *a = w + (size_t)j * 513, *o = wo + (size_t)j * 513;
        double sa = 0, so = 0;
        for (int p = 0; p <= POS0 + j / 2; p++) {
            const int page = p / 64, read = page == 0 || page == 2 || page == 3 || page >= 7;
            if (read) sa += a[p], so += o[p];
            else unread_written += o[p] != 7;
        }
        for (int p = 0; p <= POS0 + j / 2; p++)
            if (p / 64 == 0 || p / 64 == 2 || p / 64 == 3 || p / 64 >= 7)
                worst_read = fmax(worst_read, fabs(a[p] / sa - o[p]));
        worst_sum_read = fmax(worst_sum_read, fabs(so - 1));
    }
    CHECK_MSG(unread_written == 0 && worst_read < 1e-5 && worst_sum_read < 1e-5,
              "weights over some pages: %d written where not read, %g off, sums off by %g", unread_written,
              worst_read, worst_sum_read);
    /* A pass that reads only those pages (kv->reading: a reconstruction's)
     * attends over them alone, as the documented semantics restricted to
     * them; the whole cache's attention is another. */
    float qa[64], out[64];
    double ref[64], ref_all[64], worst_only = 0, apart = 0;
    for (int h = 0; h < 2; h++) {
        const float *kt = data_k(&f.d, 150 + h, 0) + h * 64;   /* a key on a page read */
        for (int j = 0; j < 64; j++) qa[j] = 0.5f * kt[j] + gauss();
        f.kv.reading = &only;
        kv_attend(&f.kv, be, 0, h, qa, 513, 0.125f, f.scratch, out);
        f.kv.reading = NULL;
        reference_attend_reading(&f.d, &f.c, be, 4, 0, h, qa, 513, 0.125f, &only, ref);
        reference_attend(&f.d, &f.c, be, 4, 0, h, qa, 513, 0.125f, ref_all);
        for (int j = 0; j < 64; j++) {
            worst_only = fmax(worst_only, fabs(out[j] - ref[j]));
            apart = fmax(apart, fabs(ref[j] - ref_all[j]));
        }
    }
    CHECK_MSG(worst_only < 1e-4 && apart > 1e-3, "attention over some pages: %g from its semantics (%g from the whole's)",
              worst_only, apart);
    free(wo);
    free(w);
    free(w32);
    fixture_free(&f);
    fixture_free(&f32);
}

/* A prompt prefilled in long passes holds (and reserved) the window pages
 * its longest pass needs; once it only decodes, kv_cache_limit_pass gives
 * back all but the two a one-token pass reads, and decoding goes on with
 * the same bits as a cache that kept them. */
static void test_limit_pass(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    struct attend_fixture f;
    fixture_init(&f, 2, 2, 64, 4, 600);
    struct kv_cache keep;
    CHECK(kv_cache_init(&keep, &f.c, 600, &f.acc) == 0);
    CHECK(fill_cache(&f.kv, be, &f.d, 300, 256) == 0 && fill_cache(&keep, be, &f.d, 300, 256) == 0);
    const struct kv_layout *lay = &f.acc.layout;
    const size_t alloc0 = f.acc.allocated_bytes, res0 = f.acc.reserved_bytes;
    const int held0 = f.kv.window_hi - f.kv.window_lo + 1, max0 = f.kv.window_max;
    CHECK(held0 == 2 && max0 == 6);   /* the pass 256..299 holds pages 3 and 4 */
    kv_cache_limit_pass(&f.kv, 1);
    CHECK(f.kv.window_max == 2);
    CHECK(f.acc.allocated_bytes == alloc0);   /* nothing held beyond the two */
    CHECK_MSG(f.acc.reserved_bytes == res0 - (size_t)(max0 - 2) * lay->window_page_bytes, "reserved %zu of %zu",
              f.acc.reserved_bytes, res0);
    kv_cache_limit_pass(&f.kv, 64);   /* never raised */
    CHECK(f.kv.window_max == 2);
    float q[64], a[64], b[64];
    int same = 1;
    for (int n = 301; n <= 420; n++) {
        CHECK(fill_cache(&f.kv, be, &f.d, n, 1) == 0 && fill_cache(&keep, be, &f.d, n, 1) == 0);
        for (int i = 0; i < 64; i++) q[i] = gauss();
        kv_attend(&f.kv, be, 1, 0, q, n, 0.125f, f.scratch, a);
        kv_attend(&keep, be, 1, 0, q, n, 0.125f, f.scratch, b);
        same &= !memcmp(a, b, sizeof a);
    }
    CHECK_MSG(same, "decoding after kv_cache_limit_pass changed attention");
    CHECK(fill_cache(&f.kv, be, &f.d, 520, 100) == -1);   /* a pass over four pages is refused */
    kv_cache_free(&keep);
    fixture_free(&f);
}

/* A kept cache's reservation is the account's kept_bytes: the mark moves
 * it in and out, and freeing a kept cache gives back both at once. */
static void test_kept(void) {
    struct attend_fixture f;
    fixture_init(&f, 2, 2, 64, 4, 200);
    CHECK(fill_cache(&f.kv, ebb_backend_cpu(), &f.d, 150, 64) == 0);
    const struct kv_usage before = kv_account_usage(&f.acc);
    CHECK(before.kept_bytes == 0 && before.reserved_bytes > 0);
    kv_cache_set_kept(&f.kv, 1);
    kv_cache_set_kept(&f.kv, 1);   /* twice is once */
    struct kv_usage u = kv_account_usage(&f.acc);
    CHECK(u.kept_bytes == f.kv.reserved_bytes && u.reserved_bytes == before.reserved_bytes);
    kv_cache_set_kept(&f.kv, 0);
    CHECK(kv_account_usage(&f.acc).kept_bytes == 0);
    kv_cache_set_kept(&f.kv, 1);
    kv_cache_free(&f.kv);
    u = kv_account_usage(&f.acc);
    CHECK(u.kept_bytes == 0 && u.reserved_bytes == 0 && u.allocated_bytes == 0);
    fixture_free(&f);
}

/* The prompt cache's two steps: how far back a cache can be cut
 * (kv_cache_truncate_floor: anywhere at f32, within the f32 window at 4
 * bits), then kv_cache_resume for a longer sequence with long passes again:
 * a new n_ctx, window pages and reservation, refused without change when
 * the budget cannot take it. After it, going on gives the same attention,
 * bit for bit, as a cache that computed the whole sequence in one go; so
 * does a copy of a prefix (kv_cache_copy_prefix, f32 only). */
static void test_resume(void) {
    const struct ebb_backend *be = ebb_backend_cpu();
    for (int bits = 32; bits >= 4; bits -= 28) {
        struct attend_fixture f, whole;
        fixture_init(&f, 2, 2, 64, bits, 700);
        fixture_init(&whole, 2, 2, 64, bits, 700);
        kv_cache_free(&f.kv);   /* a short sequence that decoded: n_ctx 300, passes of one */
        CHECK(kv_cache_init_reserving(&f.kv, &f.c, 300, 129, 128, &f.acc) == KV_OK);
        CHECK(fill_cache(&f.kv, be, &f.d, 128, 128) == 0);
        kv_cache_limit_pass(&f.kv, 1);
        for (int n = 129; n <= 280; n++)
            CHECK(kv_cache_reserve(&f.kv, n) == KV_OK && fill_cache(&f.kv, be, &f.d, n, 1) == 0);
        /* The last pass wrote position 279 and holds window pages 3 and 4:
         * queries from 256 on (page 4) find theirs. */
        CHECK_MSG(kv_cache_truncate_floor(&f.kv) == (bits == 32 ? 0 : 256), "bits %d: floor %d", bits,
                  kv_cache_truncate_floor(&f.kv));
        if (bits == 4) CHECK(kv_cache_truncate(&f.kv, 255) == -1 && f.kv.n_past == 280);
        CHECK(kv_cache_truncate(&f.kv, 260) == 0);
        /* A budget one byte short of the resumed reservation: refused, nothing changed. */
        const size_t want = kv_account_bytes_for_pass(&f.acc, 401, 200);
        const size_t res0 = f.acc.reserved_bytes, alloc0 = f.acc.allocated_bytes;
        kv_account_set_budget(&f.acc, res0 - f.kv.reserved_bytes + want - 1);
        CHECK(kv_cache_resume(&f.kv, 700, 401, 200) == KV_OVER_BUDGET);
        CHECK(f.kv.n_ctx == 300 && f.kv.reserved_bytes == res0 && f.acc.reserved_bytes == res0 &&
              f.acc.allocated_bytes == alloc0 && f.kv.n_past == 260);
        kv_account_set_budget(&f.acc, res0 - f.kv.reserved_bytes + want);
        CHECK(kv_cache_resume(&f.kv, 700, 401, 200) == KV_OK);
        CHECK_MSG(f.kv.n_ctx == 700 && f.kv.reserved_bytes == want && f.acc.reserved_bytes == want,
                  "bits %d: reserved %zu, account %zu, want %zu", bits, f.kv.reserved_bytes, f.acc.reserved_bytes,
                  want);
        CHECK(bits == 32 || f.kv.window_max == 6);   /* passes of 200 again: up to 6 window pages */
        kv_account_set_budget(&f.acc, 0);
        /* Going on in passes of 200, then decoding, against the whole cache. */
        CHECK(fill_cache(&f.kv, be, &f.d, 400, 200) == 0 && fill_cache(&whole.kv, be, &f.d, 400, 200) == 0);
        kv_cache_limit_pass(&f.kv, 1);
        float q[64], a[64], b[64];
        int same = 1;
        for (int n = 401; n <= 460; n++) {
            CHECK(kv_cache_reserve(&f.kv, n) == KV_OK);
            CHECK(fill_cache(&f.kv, be, &f.d, n, 1) == 0 && fill_cache(&whole.kv, be, &f.d, n, 1) == 0);
            for (int i = 0; i < 64; i++) q[i] = gauss();
            kv_attend(&f.kv, be, 1, 1, q, n, 0.125f, f.scratch, a);
            kv_attend(&whole.kv, be, 1, 1, q, n, 0.125f, f.scratch, b);
            same &= !memcmp(a, b, sizeof a);
        }
        CHECK_MSG(same, "bits %d: attention after resuming differs from the cache computed whole", bits);
        /* Shorter again (its pages past the new length go back). */
        CHECK(kv_cache_truncate(&f.kv, 450) == 0);
        CHECK(kv_cache_resume(&f.kv, 455, 451, 1) == KV_OK && f.kv.n_ctx == 455 && f.kv.n_pages <= 8);
        CHECK(kv_cache_resume(&f.kv, 449, 449, 1) == KV_FAILED);   /* fewer positions than it holds */
        /* A copy of the first 300 positions goes on as the original does;
         * at 4 bits copies are refused (the window rows are gone). */
        struct kv_cache copy;
        CHECK(kv_cache_init_reserving(&copy, &f.c, 700, 301, 1, &f.acc) == KV_OK);
        const int copied = kv_cache_copy_prefix(&copy, &whole.kv, 300);
        CHECK_MSG(copied == (bits == 32 ? 0 : -1) && copy.n_past == (bits == 32 ? 300 : 0), "bits %d: copy gave %d",
                  bits, copied);
        if (bits == 32) {
            CHECK(kv_cache_truncate(&whole.kv, 300) == 0);
            same = 1;
            for (int n = 301; n <= 330; n++) {
                CHECK(kv_cache_reserve(&copy, n) == KV_OK);
                CHECK(fill_cache(&copy, be, &f.d, n, 1) == 0 && fill_cache(&whole.kv, be, &f.d, n, 1) == 0);
                for (int i = 0; i < 64; i++) q[i] = gauss();
                kv_attend(&copy, be, 0, 0, q, n, 0.125f, f.scratch, a);
                kv_attend(&whole.kv, be, 0, 0, q, n, 0.125f, f.scratch, b);
                same &= !memcmp(a, b, sizeof a);
            }
            CHECK_MSG(same, "attention over a copied prefix differs from the original's");
        }
        kv_cache_free(&copy);
        fixture_free(&f);   /* checks that everything went back */
        fixture_free(&whole);
    }
}

/* The selection: sinks always kept; SnapKV keeps the best scores and
 * demotes the next best; "recent" keeps the last positions; "random" is
 * the seed's; every head gets the counts asked for. */
static void test_compress_selection(void) {
    enum { B = 256, H = 3 };
    float scores[H * B];
    uint8_t tiers[H * B];
    for (int i = 0; i < H * B; i++) scores[i] = (float)uniform();
    struct compress_params p = compress_defaults();
    p.mode = COMPRESS_DEMOTE;
    CHECK(compress_select_tiers(&p, scores, H, B, 20, 30, 0, 0, tiers) == 0);
    int ok = 1;
    for (int h = 0; h < H; h++) {
        const float *s = scores + h * B;
        const uint8_t *t = tiers + h * B;
        float worst_kept = INFINITY, best_low = -INFINITY, worst_low = INFINITY, best_dropped = -INFINITY;
        int keep = 0, low = 0;
        for (int i = 0; i < B; i++) {
            if (i < 4) { ok &= t[i] == KV_TIER_KEEP; continue; }
            if (t[i] == KV_TIER_KEEP) { keep++; worst_kept = fminf(worst_kept, s[i]); }
            else if (t[i] == KV_TIER_LOW) { low++; best_low = fmaxf(best_low, s[i]); worst_low = fminf(worst_low, s[i]); }
            else best_dropped = fmaxf(best_dropped, s[i]);
        }
        ok &= keep == 16 && low == 30 && worst_kept >= best_low && worst_low >= best_dropped;
    }
    CHECK_MSG(ok, "SnapKV selection: sinks, counts and score order");
    /* Rows a store demoted before are never kept: the best of the others
     * are, and the capped rows compete for the demoted tier only. */
    for (int i = 0; i < H * B; i++) scores[i] = i % B >= 100 && i % B < 160 ? 10.0f + (float)uniform() : (float)uniform();
    CHECK(compress_select_tiers(&p, scores, H, B, 20, 30, 100, 160, tiers) == 0);
    ok = 1;
    for (int h = 0; h < H; h++) {
        int keep = 0, low = 0, capped_low = 0;
        for (int i = 4; i < B; i++) {
            const uint8_t t = tiers[h * B + i];
            ok &= !(i >= 100 && i < 160 && t == KV_TIER_KEEP);
            keep += t == KV_TIER_KEEP;
            low += t == KV_TIER_LOW;
            capped_low += t == KV_TIER_LOW && i >= 100 && i < 160;
        }
        ok &= keep == 16 && low == 30 && capped_low == 30;
    }
    CHECK_MSG(ok, "a store's demoted rows: never kept, first for the demoted tier when they score best");
    p.select = COMPRESS_RECENT;
    CHECK(compress_select_tiers(&p, scores, H, B, 20, 0, 0, 0, tiers) == 0);
    ok = 1;
    for (int i = 0; i < B; i++) ok &= tiers[i] == (i < 4 || i >= B - 16 ? KV_TIER_KEEP : KV_TIER_DROP);
    CHECK_MSG(ok, "recent: the sinks and the last 16");
    p.select = COMPRESS_RANDOM;
    p.seed = 7;
    uint8_t again[H * B];
    CHECK(compress_select_tiers(&p, NULL, H, B, 20, 30, 0, 0, tiers) == 0);
    CHECK(compress_select_tiers(&p, NULL, H, B, 20, 30, 0, 0, again) == 0);
    int kept = 0;
    for (int i = 0; i < B; i++) kept += tiers[i] == KV_TIER_KEEP;
    CHECK(!memcmp(tiers, again, sizeof tiers) && kept == 20 && memcmp(tiers, tiers + B, B) != 0);
    CHECK(compress_select_parse("snapkv") == COMPRESS_SNAPKV && compress_select_parse("snapkv_head") ==
          COMPRESS_SNAPKV_HEAD && compress_select_parse("best") == -1);
}

static int collect(void *ud, int32_t id, const char *text, size_t len) {
    (void)id;
    struct text_out *t = ud;
    if (t->len + len < sizeof t->buf) {
        memcpy(t->buf + t->len, text, len);
        t->len += len;
        t->buf[t->len] = 0;
    }
    return 0;
}

static void test_model_generation(struct model_run *r) {
    const struct model *m = model_run_model(r);
    /* A prompt long enough that the question's context is read from the
     * quantized body (well past 128 positions). */
    static const char *facts =
        "Here are some notes about European capitals. Berlin is the capital of Germany and its largest city. "
        "Madrid is the capital of Spain, on the river Manzanares. Rome is the capital of Italy and was the centre "
        "of the Roman Empire. Lisbon is the capital of Portugal, on the Atlantic coast. Vienna is the capital of "
        "Austria, famous for music. Paris is the capital of France, on the river Seine, and is known for the Eiffel "
        "Tower. Warsaw is the capital of Poland. Athens is the capital of Greece and one of the oldest cities in "
        "the world. Dublin is the capital of Ireland. Brussels is the capital of Belgium. Amsterdam is the capital "
        "of the Netherlands, known for its canals. Stockholm is the capital of Sweden, built on fourteen islands. "
        "Oslo is the capital of Norway. Helsinki is the capital of Finland. Copenhagen is the capital of Denmark. "
        "Prague is the capital of the Czech Republic, with a famous old bridge. Budapest is the capital of Hungary, "
        "split by the Danube. Bern is the capital of Switzerland.\n\nUsing the notes, answer: what is the capital "
        "of France, and on which river is it?";
    struct chat_msg msg = {"user", facts};
    char *prompt = chat_render(m->tok, &msg, 1, 1);
    int32_t *ids = NULL;
    int n = tokenizer_encode(m->tok, prompt, strlen(prompt), 1, &ids);
    free(prompt);
    CHECK(n > 200);
    struct gen_params p = {.max_tokens = 48};
    sampler_params_default(&p.sampling);
    p.sampling.temperature = 0;
    struct text_out t32 = {{0}, 0}, t4 = {{0}, 0};
    struct gen_result res;
    p.kv_bits = 32;
    CHECK(generate(r, ids, n, &p, collect, &t32, &res) == 0);
    p.kv_bits = 4;
    CHECK(generate(r, ids, n, &p, collect, &t4, &res) == 0);
    printf("prompt %d tokens\nkv32: %s\nkv4:  %s\n", n, t32.buf, t4.buf);
    CHECK_MSG(strstr(t32.buf, "Paris") != NULL, "f32 answer lacks Paris: %s", t32.buf);
    CHECK_MSG(strstr(t4.buf, "Paris") != NULL, "KV4 answer lacks Paris: %s", t4.buf);
    CHECK_MSG(strstr(t4.buf, "Seine") != NULL, "KV4 answer lacks the Seine: %s", t4.buf);
    p.kv_bits = 12;
    CHECK(generate(r, ids, n, &p, collect, &t4, &res) == -1 && strstr(res.error, "kv_bits"));
    free(ids);
}

/* Speculative decoding's verification and rollback at one precision: a
 * pass over [x0, d1 .. d8] gives, for the drafted tokens that match what
 * one-token decoding feeds, the very logits one-token decoding gives; and
 * after kv_cache_truncate drops the rejected drafts, the next passes give
 * exactly what a cache that never saw them gives. The prompt puts the pass
 * across a page boundary (positions 188 .. 196), so the window pages the
 * truncated cache needs are the ones the pass started from. */
static void check_rollback(struct model_run *r, int bits) {
    const struct model *m = model_run_model(r);
    const int V = m->cfg.n_vocab, n_prompt = 188, kept = 4, drafts = 8;
    struct kv_account acc;
    CHECK(kv_account_init(&acc, &m->cfg, bits, 0) == 0);
    struct kv_cache ref, spec;
    CHECK(kv_cache_init(&ref, &m->cfg, 512, &acc) == KV_OK && kv_cache_init(&spec, &m->cfg, 512, &acc) == KV_OK);
    int32_t ids[188 + 16];
    for (int i = 0; i < (int)(sizeof ids / sizeof *ids); i++) ids[i] = (int32_t)((i * 7919 + 13) % V);
    float *want = malloc((size_t)(kept + 3) * V * sizeof(float)), *got = malloc((size_t)(drafts + 1) * V * sizeof(float));
    CHECK(want && got);
    CHECK(model_forward(r, &ref, ids, n_prompt, want, 0) == 0 && model_forward(r, &spec, ids, n_prompt, got, 0) == 0);
    /* One token at a time: x0 .. x3, then y0, y1 (ids 188 .. 193). */
    for (int t = 0; t < kept + 2; t++)
        CHECK(model_forward(r, &ref, ids + n_prompt + t, 1, want + (size_t)t * V, 0) == 0);
    /* The pass: x0 .. x3 as drafted, then five drafts the target rejects. */
    int32_t pass[9];
    memcpy(pass, ids + n_prompt, (size_t)kept * sizeof(int32_t));
    for (int i = kept; i < drafts + 1; i++) pass[i] = (int32_t)((i * 104729 + 5) % V);
    CHECK(model_forward(r, &spec, pass, drafts + 1, got, 1) == 0);
    CHECK_MSG(memcmp(got, want, (size_t)kept * V * sizeof(float)) == 0,
              "kv_bits %d: verified logits differ from one-token decoding", bits);
    CHECK(spec.n_past == n_prompt + drafts + 1);
    /* Before the window the pass kept (pages 1 ..) at 4 bits; never beyond n_past. */
    if (bits == 4) CHECK(kv_cache_truncate(&spec, 60) == -1 && spec.n_past == n_prompt + drafts + 1);
    CHECK(kv_cache_truncate(&spec, n_prompt + drafts + 2) == -1 && spec.n_past == n_prompt + drafts + 1);
    CHECK(kv_cache_truncate(&spec, n_prompt + kept) == 0 && spec.n_past == n_prompt + kept);
    for (int t = kept; t < kept + 2; t++) {
        CHECK(model_forward(r, &spec, ids + n_prompt + t, 1, got, 0) == 0);
        CHECK_MSG(memcmp(got, want + (size_t)t * V, (size_t)V * sizeof(float)) == 0,
                  "kv_bits %d: after rollback, position %d's logits differ", bits, n_prompt + t);
    }
    kv_cache_free(&ref);
    kv_cache_free(&spec);
    kv_account_destroy(&acc);
    free(want);
    free(got);
}

static void test_model_rollback(struct model_run *r) {
    check_rollback(r, 32);
    check_rollback(r, 4);
}

/* Context compression's lookahead (compress_look_ahead): the tokens decoded
 * past the point are forgotten exactly -- at 4 bits too, where the
 * lookahead crosses pages whose f32 window copies a decoding sequence would
 * have given back -- so a cache that looked ahead and was left whole reads
 * as one that never did; and their queries take part in the scoring (the
 * same budget keeps other rows). */
static void check_lookahead(struct model_run *r, int bits) {
    const struct model *m = model_run_model(r);
    const int V = m->cfg.n_vocab, n = 701;   /* the lookahead crosses two page boundaries */
    struct kv_account acc;
    CHECK(kv_account_init(&acc, &m->cfg, bits, 0) == 0);
    int32_t ids[702];
    for (int i = 0; i < n + 1; i++) ids[i] = (int32_t)((i * 7919 + 13) % V);
    float *logits = malloc((size_t)V * sizeof(float)), *want = malloc((size_t)V * sizeof(float));
    float *got = malloc((size_t)V * sizeof(float));
    struct compress_params p = compress_defaults();
    p.mode = COMPRESS_DROP;
    p.min_prompt = 0;
    p.lookahead = COMPRESS_MAX_LOOKAHEAD;
    struct kv_cache plain, ahead, drop[2];
    CHECK(kv_cache_init(&plain, &m->cfg, 1024, &acc) == KV_OK && kv_cache_init(&ahead, &m->cfg, 1024, &acc) == KV_OK);
    CHECK(model_forward(r, &plain, ids, n + 1, want, 0) == 0);
    /* Looked ahead, then left whole (a budget that keeps every row). */
    p.budget = 1;
    struct compress_report rep;
    CHECK(compress_prepare(&ahead, &m->cfg, &p, n) == KV_OK && ahead.obs && ahead.obs->ahead == COMPRESS_MAX_LOOKAHEAD);
    CHECK(model_forward(r, &ahead, ids, n, logits, 0) == 0);
    double ms;
    CHECK(compress_look_ahead(r, &ahead, logits, &ms) == 0 && ahead.n_past == n + COMPRESS_MAX_LOOKAHEAD && ms > 0);
    CHECK(compress_apply(&ahead, &m->cfg, m->be, NULL, &p, &rep) == 0 && !rep.applied && ahead.n_past == n);
    CHECK(model_forward(r, &ahead, ids + n, 1, got, 0) == 0);
    CHECK_MSG(memcmp(got, want, (size_t)V * sizeof(float)) == 0,
              "kv_bits %d: after a lookahead, the next token's logits differ from a cache that never looked", bits);
    /* Dropping 75% (the recent window keeps 125 of the 175): with and
     * without the lookahead's queries. */
    p.budget = 0.25f;
    for (int look = 0; look < 2; look++) {
        p.lookahead = look ? 16 : 0;
        CHECK(kv_cache_init(&drop[look], &m->cfg, 1024, &acc) == KV_OK);
        CHECK(compress_prepare(&drop[look], &m->cfg, &p, n) == KV_OK);
        CHECK(model_forward(r, &drop[look], ids, n, logits, 0) == 0 && compress_look_ahead(r, &drop[look], logits, &ms) == 0);
        CHECK(compress_apply(&drop[look], &m->cfg, m->be, NULL, &p, &rep) == 0 && rep.applied && rep.n_prompt == n);
        CHECK(drop[look].n_past == n && model_forward(r, &drop[look], ids + n, 1, look ? got : want, 0) == 0);
        kv_cache_forget_observation(&drop[look]);
    }
    CHECK_MSG(memcmp(got, want, (size_t)V * sizeof(float)) != 0,
              "kv_bits %d: the lookahead's queries changed nothing the scoring kept", bits);
    for (int i = 0; i < 2; i++) kv_cache_free(&drop[i]);
    kv_cache_free(&plain);
    kv_cache_free(&ahead);
    kv_account_destroy(&acc);
    free(logits);
    free(want);
    free(got);
}

/* A reconstruction (compress_reconstruct) writes the prompt again past its
 * point, a chunk per pass, and forgets it: a cache that reconstructed and
 * was left whole gives the next token's logits bit for bit as one that
 * never did, at 32 and 4 bits (the f32 window held through the passes),
 * with the lookahead after it; its scores choose other rows than the
 * window's alone. */
static void check_reconstruction(struct model_run *r, int bits) {
    const struct model *m = model_run_model(r);
    const int V = m->cfg.n_vocab, n = 701;   /* three passes, the last one short */
    struct kv_account acc;
    CHECK(kv_account_init(&acc, &m->cfg, bits, 0) == 0);
    int32_t ids[702];
    for (int i = 0; i < n + 1; i++) ids[i] = (int32_t)((i * 7919 + 13) % V);
    float *want = malloc((size_t)V * sizeof(float)), *got = malloc((size_t)V * sizeof(float));
    float *logits = malloc((size_t)V * sizeof(float));
    struct compress_params p = compress_defaults();
    p.mode = COMPRESS_DROP;
    p.min_prompt = 0;
    p.select = COMPRESS_RECONSTRUCT;
    p.budget = 1;
    struct kv_cache plain, rebuilt, drop[2];
    CHECK(kv_cache_init(&plain, &m->cfg, 1024, &acc) == KV_OK && kv_cache_init(&rebuilt, &m->cfg, 1024, &acc) == KV_OK);
    CHECK(model_forward(r, &plain, ids, n + 1, want, 0) == 0);
    struct compress_report rep;
    double ms;
    int end = 0, chunk = 0;
    CHECK(compress_prepare(&rebuilt, &m->cfg, &p, n) == KV_OK && model_forward(r, &rebuilt, ids, n, logits, 0) == 0);
    CHECK(compress_reconstruction(&rebuilt, 20, &end, &chunk));
    CHECK_MSG(end == kv_cache_compact_limit(&rebuilt) && end == 576 && chunk == COMPRESS_RECONSTRUCT_PASS - 20,
              "reconstruct [0, %d) in chunks of %d", end, chunk);
    CHECK(compress_reconstruct(r, &rebuilt, ids, &ms) == 0 && rebuilt.n_past == n && ms > 0);
    float best = 0;
    for (size_t i = 0; i < rebuilt.obs->n_scores; i++) best = rebuilt.obs->scores[i] > best ? rebuilt.obs->scores[i] : best;
    CHECK_MSG(best > 0 && best <= 1, "kv_bits %d: the reconstruction's scores reach %g", bits, best);
    CHECK(compress_look_ahead(r, &rebuilt, logits, &ms) == 0 && rebuilt.n_past == n + COMPRESS_LOOKAHEAD);
    CHECK(compress_apply(&rebuilt, &m->cfg, m->be, NULL, &p, &rep) == 0 && !rep.applied && rebuilt.n_past == n);
    CHECK(model_forward(r, &rebuilt, ids + n, 1, got, 0) == 0);
    CHECK_MSG(memcmp(got, want, (size_t)V * sizeof(float)) == 0,
              "kv_bits %d: after a reconstruction, the next token's logits differ from a cache that never did", bits);
    /* Dropping 75%, scored by the reconstruction and by the window. */
    p.budget = 0.25f;
    p.lookahead = 0;
    for (int k = 0; k < 2; k++) {
        p.select = k ? COMPRESS_RECONSTRUCT : COMPRESS_SNAPKV;
        CHECK(kv_cache_init(&drop[k], &m->cfg, 1024, &acc) == KV_OK);
        CHECK(compress_prepare(&drop[k], &m->cfg, &p, n) == KV_OK && model_forward(r, &drop[k], ids, n, NULL, 0) == 0);
        CHECK(compress_reconstruct(r, &drop[k], ids, &ms) == 0 && (k ? ms > 0 : ms == 0));
        CHECK(compress_apply(&drop[k], &m->cfg, m->be, NULL, &p, &rep) == 0 && rep.applied && rep.n_prompt == n);
        CHECK(drop[k].n_past == n && model_forward(r, &drop[k], ids + n, 1, k ? got : want, 0) == 0);
    }
    CHECK_MSG(memcmp(got, want, (size_t)V * sizeof(float)) != 0,
              "kv_bits %d: the reconstruction kept what the window keeps", bits);
    /* Cues that leave no room for a chunk: the reconstruction is given up,
     * and the window scores alone, as it would without one. */
    for (int i = 0; i < 2; i++) kv_cache_free(&drop[i]);
    CHECK(kv_cache_init(&drop[0], &m->cfg, 1024, &acc) == KV_OK);
    CHECK(compress_prepare(&drop[0], &m->cfg, &p, n) == KV_OK && model_forward(r, &drop[0], ids, n, NULL, 0) == 0);
    CHECK(!compress_reconstruction(&drop[0], COMPRESS_RECONSTRUCT_PASS - 1, &end, &chunk) && !drop[0].obs->scores);
    CHECK(compress_reconstruct(r, &drop[0], ids, &ms) == 0 && drop[0].n_past == n);
    CHECK(compress_apply(&drop[0], &m->cfg, m->be, NULL, &p, &rep) == 0 && rep.applied);
    CHECK(model_forward(r, &drop[0], ids + n, 1, got, 0) == 0);
    CHECK_MSG(memcmp(got, want, (size_t)V * sizeof(float)) == 0,
              "kv_bits %d: a reconstruction given up still changed what the window keeps", bits);
    kv_cache_free(&drop[0]);
    kv_cache_free(&plain);
    kv_cache_free(&rebuilt);
    kv_account_destroy(&acc);
    free(want);
    free(got);
    free(logits);
}

static void test_model_lookahead(struct model_run *r) {
    check_lookahead(r, 32);
    check_lookahead(r, 4);
    check_reconstruction(r, 32);
    check_reconstruction(r, 4);
}

/* Perplexity scored as `ebb ppl --ctx 512 --chunks K` scores it (engine/perplexity.c). */
static double perplexity(struct model_run *r, const int32_t *tokens, int n_chunks, int kv_bits) {
    struct ppl_result res = {0};
    char err[256];
    if (perplexity_windows(r, tokens, n_chunks, 512, 0, -1, kv_bits, NULL, NULL, NULL, NULL, &res, err, sizeof err)) {
        CHECK_MSG(0, "perplexity: %s", err);
        return NAN;
    }
    return res.ppl;
}

static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(1 << 20);
    *len = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    fclose(f);
    if (buf) buf[*len] = 0;
    return buf;
}

/* r runs the default model natively (its Q4_1 blocks in place, 8-bit
 * activations), r32 the same file dequantized to f32, the path the numpy
 * reference checks: the native path must score the text within 1% of it
 * (llama.cpp's own Q4_1 kernels are 0.3% above its F32 on this text). */
/* The held-out text (tools/heldout.py) when it has been prepared, else the
 * GPL's text, which Debian ships; its path in path. */
static char *english_text(char *path, size_t size, size_t *len) {
    const char *cache = getenv("EBB_CACHE"), *home = getenv("HOME");
    if (cache) snprintf(path, size, "%s/heldout.txt", cache);
    else snprintf(path, size, "%s/.cache/ebb/heldout.txt", home ? home : ".");
    char *text = read_text(path, len);
    if (!text) text = read_text(strcpy(path, "/usr/share/common-licenses/GPL-3"), len);
    return text;
}

/* Context compression on the model, question-agnostic (the context is
 * compressed before the question is read): a pass key hidden halfway into
 * about 1,500 tokens of filler (the classic passkey test) is still found
 * with 25% of the prompt kept at 4 bits and the rest demoted, as
 * with the whole cache; the stage reports what it did, and the cache
 * shrank. */
static void test_model_passkey(struct model_run *r) {
    const struct model *m = model_run_model(r);
    static const char filler[] = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    const size_t cap = 64 * sizeof filler + 512;
    char *context = malloc(cap);
    int at = snprintf(context, cap, "There is an important info hidden inside a lot of irrelevant text. Find it and "
                      "memorize it. I will quiz you about the important information there.\n");
    for (int i = 0; i < 60; i++) {
        if (i == 30) at += snprintf(context + at, cap - (size_t)at, "The pass key is 68231. Remember it. 68231 is the pass key. ");
        at += snprintf(context + at, cap - (size_t)at, "%s", filler);
    }
    static const char question[] = "\nWhat is the pass key? The pass key is";
    int32_t *ids = NULL, *q = NULL;
    const int n = tokenizer_encode_with_bos(m->tok, context, strlen(context), 1, 1, &ids);
    const int nq = tokenizer_encode_with_bos(m->tok, question, strlen(question), 1, 0, &q);
    CHECK(n > 1200 && nq > 5);
    int32_t *all = malloc((size_t)(n + nq) * sizeof *all);
    memcpy(all, ids, (size_t)n * sizeof *all);
    memcpy(all + n, q, (size_t)nq * sizeof *all);
    struct gen_params p = {.max_tokens = 6, .kv_bits = 4, .compress = compress_defaults()};
    sampler_params_default(&p.sampling);
    p.sampling.temperature = 0;
    p.compress.at = n;
    struct text_out full = {{0}, 0}, demoted = {{0}, 0};
    struct gen_result res;
    CHECK(generate(r, all, n + nq, &p, collect, &full, &res) == 0 && !res.compress.applied);
    p.compress.mode = COMPRESS_DEMOTE;
    p.compress.min_prompt = 0;
    CHECK(generate(r, all, n + nq, &p, collect, &demoted, &res) == 0);
    const struct compress_report *c = &res.compress;
    printf("passkey in %d tokens: full cache '%s', demoted '%s' (kept %d, demoted %d, dropped %d; %zu -> %zu bytes)\n",
           n, full.buf, demoted.buf, c->kept, c->demoted, c->dropped, c->bytes_before, c->bytes_after);
    CHECK_MSG(strstr(full.buf, "68231"), "the whole cache does not find the key: %s", full.buf);
    CHECK_MSG(strstr(demoted.buf, "68231"), "the demoted cache does not find the key: %s", demoted.buf);
    CHECK(c->applied && c->n_prompt == n && c->kept + c->demoted + c->dropped == n && c->dropped == 0);
    CHECK(abs(c->kept - n / 4) <= 1 && c->bytes_after < c->bytes_before * 9 / 10);
    /* The scoring split over the run's workers chooses what one thread does. */
    struct model_run *one = model_run_new(m, 1);
    struct text_out alone = {{0}, 0};
    struct gen_result res1;
    CHECK(one && generate(one, all, n + nq, &p, collect, &alone, &res1) == 0);
    CHECK_MSG(!strcmp(alone.buf, demoted.buf) && res1.compress.kept == c->kept &&
              res1.compress.demoted == c->demoted && res1.compress.bytes_after == c->bytes_after,
              "compression on one thread: '%s' (kept %d) vs '%s' (kept %d)", alone.buf, res1.compress.kept,
              demoted.buf, c->kept);
    model_run_free(one);
    /* Dropping 75% instead, scored by a reconstruction of the context:
     * the key is still found though the question was not read. */
    struct text_out dropped = {{0}, 0};
    p.compress.mode = COMPRESS_DROP;
    p.compress.select = COMPRESS_RECONSTRUCT;
    CHECK(generate(r, all, n + nq, &p, collect, &dropped, &res) == 0);
    printf("passkey, 75%% dropped by reconstruction: '%s' (kept %d, dropped %d; %.0f ms)\n", dropped.buf, c->kept,
           c->dropped, c->ms);
    CHECK_MSG(strstr(dropped.buf, "68231"), "the reconstruction's cache does not find the key: %s", dropped.buf);
    CHECK(c->applied && c->demoted == 0 && abs(c->kept - n / 4) <= 1);
    free(all);
    free(ids);
    free(q);
    free(context);
}

static void test_model_perplexity(struct model_run *r, struct model_run *r32) {
    const struct model *m = model_run_model(r);
    char path[1024];
    size_t len = 0;
    char *text = english_text(path, sizeof path, &len);
    CHECK_MSG(text != NULL, "no English text to score");
    if (!text) return;
    int32_t *tokens = NULL;
#if defined(__SANITIZE_ADDRESS__)
    const int chunks = 1;   /* the sanitizers check memory, not the number; 4 windows take too long */
#else
    const int chunks = 4;
#endif
    int n = tokenizer_encode(m->tok, text, len, 0, &tokens);
    free(text);
    CHECK(n >= chunks * 512);
    if (n < chunks * 512) { free(tokens); return; }
    /* KV4's cost on the reference (f32 weights) path, as before native weights. */
    double p32 = perplexity(r32, tokens, chunks, 32), p4 = perplexity(r32, tokens, chunks, 4);
    printf("perplexity on %s, %d windows of 512: kv32 %.4f, kv4 %.4f (%+.2f%%)\n", path, chunks, p32, p4,
           100 * (p4 / p32 - 1));
    CHECK(p32 > 1 && p4 > 1);
    CHECK_MSG(fabs(p4 / p32 - 1) < 0.01, "KV4 perplexity %.4f is not within 1%% of f32's %.4f", p4, p32);
    const double pn = perplexity(r, tokens, chunks, 32);
    printf("native Q4_1 weights %.4f, f32 weights %.4f (%+.2f%%)\n", pn, p32, 100 * (pn / p32 - 1));
    CHECK_MSG(fabs(pn / p32 - 1) < 0.01, "native perplexity %.4f is not within 1%% of the f32 path's %.4f", pn, p32);
    free(tokens);
}

int main(void) {
    test_quantize_bounds();
    test_row_conversions();
    test_channels();
    test_attention_ops();
    test_rotation_invariance();
    test_attention();
    test_window_exact_and_batch_invariant();
    test_block_invariance();
    test_account_bytes();
    test_reservations();
    test_growing_reservations();
    test_compact_lossless();
    test_compact_semantics();
    test_compact_again();
    test_compact_account();
    test_observation_account();
    test_compress_selection();
    test_limit_pass();
    test_resume();
    test_kept();
    test_weights_after_short_pass();

    char path[1024], err[512];
    if (check_model_path(path, sizeof path)) return check_report_skipped("test_kv", path);
    struct model m;
    struct model m32;
    struct model_run *run = NULL, *run32 = NULL;
    if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        fprintf(stderr, "cannot load the default model: %s (run scripts/setup)\n", err);
        CHECK(0);
    } else if (model_load(&m32, path, MODEL_WEIGHTS_F32, err, sizeof err)) {
        CHECK_MSG(0, "%s", err);
        model_free(&m);
    } else {
        CHECK(m.weight_bytes < m32.weight_bytes / 4);   /* the file's 4-bit blocks, not f32 copies */
        run = model_run_new(&m, 2);
        run32 = model_run_new(&m32, 2);
        CHECK(run && run32);
        if (run && run32) {
            test_model_generation(run);
            test_model_rollback(run);
            test_model_lookahead(run);
            test_model_passkey(run);
            test_model_perplexity(run, run32);
        }
        model_run_free(run);
        model_run_free(run32);
        model_free(&m);
        model_free(&m32);
    }
    return check_report("test_kv");
}
