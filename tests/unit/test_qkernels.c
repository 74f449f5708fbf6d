/* Tests for the quantized ops (quantize_act, matmul[W4G64], hadamard64) and
 * the W4G64 / Q8_0 quantizers in kernels/formats.c (the native GGUF
 * products, Q8_0's included, are test_native.c's).
 *
 * Two kinds of check:
 * - every SIMD path against the scalar path, bit for bit (the ops are
 *   defined to be exact up to a fixed sequence of float roundings, see
 *   kernels/cpu/ops.h), threaded and unthreaded, on random data at awkward
 *   sizes, with outputs pre-filled with NaN and guarded by canaries;
 * - the scalar path against references computed here independently, in
 *   double precision, from the definitions: quantize_act's codes and scales
 *   exactly (float quotients and products of floats are correctly rounded
 *   when computed in double and rounded once to float, since 53 >= 2*24 + 2),
 *   the matmuls within a stated bound of the exact product of the
 *   dequantized operands, hadamard64 within a bound of the explicit matrix.
 *
 * Matmul tolerance: the scalar result adds B block terms (one per weight
 * block) in float, each term's scale product rounded once, so it is within
 * (B + 2) * 2^-24 * sum |w_i a_i| of the exact sum (recursive summation bound
 * plus the scale rounding). A missing, doubled or misplaced block term
 * (about sum/B) exceeds that for every shape here.
 *
 * A path the CPU cannot run is reported as skipped.
 */
#include "check.h"
#include "kernels/backend.h"
#include "kernels/formats.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define U32 (1.0 / 16777216.0)        /* 2^-24 */
#define CANARY 16
#define CANARY_F 12345.678f
#define CANARY_B 0x5a

static const char *const PATHS[] = { "scalar", "avx2", "avx512", "amx" };
#define N_PATHS 4

/* ------------------------------------------------------------------ helpers */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static float frand(void) { return (float)((double)(next_u64() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }
static int irand(int n) { return (int)(next_u64() % (uint64_t)n); }

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

/* n floats of NaN then CANARY guards. */
static float *out_f(size_t n)
{
    float *v = xmalloc((n + CANARY) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = NAN;
    for (size_t i = 0; i < CANARY; i++) v[n + i] = CANARY_F;
    return v;
}
static int canary_f_ok(const float *v, size_t n)
{
    for (size_t i = 0; i < CANARY; i++) if (v[n + i] != CANARY_F) return 0;
    return 1;
}
static int8_t *out_b(size_t n)
{
    int8_t *v = xmalloc(n + CANARY);
    memset(v, 0x7f, n);
    memset(v + n, CANARY_B, CANARY);
    return v;
}
static int canary_b_ok(const int8_t *v, size_t n)
{
    for (size_t i = 0; i < CANARY; i++) if ((uint8_t)v[n + i] != CANARY_B) return 0;
    return 1;
}

/* Same bits, or both NaN (NaN payloads may legitimately differ). */
static size_t count_diff_f(const float *a, const float *b, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0 && !(isnan(a[i]) && isnan(b[i]))) bad++;
    return bad;
}

static float f16_at(const uint8_t *p) { return ebb_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* ------------------------------------------------------------ W4G64, Q8_0 */

static void test_w4g64_format(void)
{
    const struct ebb_type_info *ti = ebb_type_info(EBB_TYPE_W4G64);
    CHECK(ti != NULL);
    if (!ti) return;
    CHECK(strcmp(ti->name, "W4G64") == 0);
    CHECK(ti->block_elems == 64 && ti->block_bytes == 34 && ti->to_f32 != NULL);
    CHECK(ebb_row_bytes(EBB_TYPE_W4G64, 576) == 9 * 34);
    CHECK(ebb_row_bytes(EBB_TYPE_W4G64, 100) == 0);

    /* A hand-made block: d = 0.5 (f16 0x3800), byte j = (j % 16) | ((15 - j % 16) << 4). */
    uint8_t blk[34] = { 0x00, 0x38 };
    for (int j = 0; j < 32; j++) blk[2 + j] = (uint8_t)((j % 16) | ((15 - j % 16) << 4));
    float out[64];
    ti->to_f32(blk, out, 64);
    int bad = 0;
    for (int j = 0; j < 32; j++) {
        bad += out[j] != 0.5f * (float)(j % 16 - 8);
        bad += out[32 + j] != 0.5f * (float)(7 - j % 16);
    }
    CHECK_MSG(bad == 0, "W4G64 to_f32: %d wrong values", bad);
}

/* One RTN group at magnitude `scale` (0: all zero; < 0: one nonzero value). */
static void fill_group(float *x, float scale)
{
    for (int j = 0; j < 64; j++) x[j] = scale > 0 ? frand() * scale : 0;
    if (scale < 0) x[irand(64)] = -scale;
}

static void test_w4g64_rtn(void)
{
    static const float scales[] = { 1.0f, 0.01f, 3e-3f, 250.0f, 4e5f, 1e-6f, 3e-8f, 1e-20f, 1e-39f,
                                    0.0f, -1.0f, -2e-7f };
    const int per = 40;
    int bad_err = 0, bad_d = 0, bad_zero = 0;
    for (size_t si = 0; si < sizeof scales / sizeof *scales; si++) {
        float x[64], y[64];
        uint8_t blk[34];
        for (int rep = 0; rep < per; rep++) {
            fill_group(x, scales[si]);
            ebb_quantize_w4g64_rtn(x, blk, 64);
            ebb_type_info(EBB_TYPE_W4G64)->to_f32(blk, y, 64);
            double amax = 0;
            for (int j = 0; j < 64; j++) amax = fmax(amax, fabs((double)x[j]));
            double d = f16_at(blk);
            if (amax == 0) {
                for (int j = 0; j < 64; j++) bad_zero += y[j] != 0 || blk[2 + j / 2] != 0x88;
                bad_zero += d != 0;
                continue;
            }
            /* d reaches the largest value within half a step, and is at most one
             * f16 step above amax / 7 (relative 2^-10 for normal halves, 2^-24
             * absolute for subnormal ones). */
            bad_d += !(7.5 * d >= amax) || !(d <= amax / 7 * (1 + 1.0 / 1024) + 0x1p-24);
            for (int j = 0; j < 64; j++)
                bad_err += !(fabs((double)y[j] - x[j]) <= d * (0.5 + 0x1p-20));
        }
    }
    CHECK_MSG(bad_err == 0, "W4G64 RTN: %d values farther than d/2 from their input", bad_err);
    CHECK_MSG(bad_d == 0, "W4G64 RTN: %d groups with a scale out of range", bad_d);
    CHECK_MSG(bad_zero == 0, "W4G64 RTN: zero group not d = 0, codes 8");

    /* Beyond the f16 range: the scale saturates at 65504 and codes at +-7 (or -8). */
    float x[64], y[64];
    uint8_t blk[34];
    fill_group(x, 1.0f);
    x[5] = 1e7f;
    x[9] = -1e7f;
    ebb_quantize_w4g64_rtn(x, blk, 64);
    ebb_type_info(EBB_TYPE_W4G64)->to_f32(blk, y, 64);
    CHECK(f16_at(blk) == 65504.0f);
    CHECK(y[5] == 7 * 65504.0f && y[9] == -8 * 65504.0f);

    /* Several groups in one call land in consecutive blocks. */
    float xs[192], ys[192];
    uint8_t blks[3 * 34];
    for (int i = 0; i < 192; i++) xs[i] = frand() * (float)(1 + i / 64);
    ebb_quantize_w4g64_rtn(xs, blks, 192);
    ebb_type_info(EBB_TYPE_W4G64)->to_f32(blks, ys, 192);
    int bad = 0;
    for (int i = 0; i < 192; i++) bad += !(fabs((double)ys[i] - xs[i]) <= f16_at(blks + 34 * (i / 64)) * 0.5001);
    CHECK_MSG(bad == 0, "W4G64 RTN over 3 groups: %d values off", bad);
}

/* ggml's Q8_0 rule: d = amax / 127 (f16), codes roundf(x / d) with the exact d. */
static void test_q8_0_quantizer(void)
{
    static const float scales[] = { 1.0f, 0.01f, 300.0f, 1e-5f, 0.0f, -2.0f };
    int bad = 0;
    for (size_t si = 0; si < sizeof scales / sizeof *scales; si++)
        for (int rep = 0; rep < 40; rep++) {
            float x[64], y[64];
            uint8_t blk[68];
            fill_group(x, scales[si]);
            ebb_quantize_q8_0(x, blk, 64);
            ebb_type_info(EBB_TYPE_Q8_0)->to_f32(blk, y, 64);
            for (int b = 0; b < 2; b++) {
                const float *xb = x + 32 * b;
                const uint8_t *bb = blk + 34 * b;
                double amax = 0;
                for (int j = 0; j < 32; j++) amax = fmax(amax, fabs((double)xb[j]));
                float d = (float)(amax / 127);                 /* correctly rounded float quotient */
                bad += (uint16_t)(bb[0] | (bb[1] << 8)) != ebb_f32_to_f16(d);
                for (int j = 0; j < 32; j++) {
                    int q = (int8_t)bb[2 + j];
                    double want = 0;
                    if (d != 0) {
                        double v = (double)(float)((double)xb[j] * (double)(float)(1.0 / (double)d));
                        want = v < 0 ? -floor(-v + 0.5) : floor(v + 0.5);
                    }
                    bad += q != (int)want || q < -127 || q > 127;
                    bad += y[32 * b + j] != f16_at(bb) * (float)q;
                }
            }
        }
    CHECK_MSG(bad == 0, "Q8_0 quantizer: %d wrong scales or codes", bad);
}

/* ------------------------------------------------------------ quantize_act */

/* Reference for one group, from the definition, in double. */
static void act_ref_group(const float *x, double qmax, int8_t *q, float *s)
{
    double amax = 0;
    for (int i = 0; i < 64; i++) amax = fmax(amax, fabs((double)x[i]));
    *s = (float)(amax / qmax);
    double inv = 0;
    if (*s != 0) {
        inv = qmax / amax;
        inv = inv > FLT_MAX ? FLT_MAX : (double)(float)inv;
    }
    for (int i = 0; i < 64; i++) {
        double v = (double)(float)((double)x[i] * inv);   /* the float product */
        double r = v < 0 ? -floor(-v + 0.5) : floor(v + 0.5);
        q[i] = (int8_t)(r > qmax ? qmax : r < -qmax ? -qmax : r);
    }
}

/* Random activations whose groups vary in kind: ordinary, zero, huge, tiny,
 * subnormal, single spike, exact ties. */
static void fill_act(float *x, int n_tok, int n)
{
    for (int t = 0; t < n_tok; t++)
        for (int g = 0; g < n / 64; g++) {
            float *p = x + (size_t)t * n + (size_t)g * 64;
            int kind = irand(12);
            for (int i = 0; i < 64; i++) {
                float v = frand();
                switch (kind) {
                case 0: v = 0; break;
                case 1: v *= FLT_MAX; break;
                case 2: v *= 1e30f; break;
                case 3: v *= 1e-30f; break;
                case 4: v *= 1e-41f; break;                     /* subnormal */
                case 5: v = i == 17 ? -3.5f : v * 1e-3f; break;
                case 6: v = (float)(irand(15) - 7) + (irand(2) ? 0.5f : 0.0f); break;
                case 7: v *= 3e-37f; break;                     /* inverse near overflow */
                default: v *= 4.0f * (float)(1 + g % 5); break;
                }
                p[i] = v;
            }
        }
}

static void test_quantize_act_ties(const struct ebb_backend *b)
{
    /* 4-bit group with absmax 7 (inverse exactly 1) and an 8-bit group with
     * absmax 127: halves round away from zero. */
    float x[128] = { 0 };
    static const float in4[] = { 7, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 6.5f, -6.5f, 0.49999997f, -7 };
    static const int want4[] = { 7, 1, -1, 2, -2, 3, -3, 7, -7, 0, -7 };
    static const float in8[] = { 127, 0.5f, -0.5f, 126.5f, -126.5f, 3.5f, -100.5f };
    static const int want8[] = { 127, 1, -1, 127, -127, 4, -101 };
    for (size_t i = 0; i < sizeof in8 / sizeof *in8; i++) x[i] = in8[i];
    for (size_t i = 0; i < sizeof in4 / sizeof *in4; i++) x[64 + i] = in4[i];
    int8_t *q = out_b(128);
    float *s = out_f(2);
    b->quantize_act(x, 1, 128, 1, q, s);
    int bad = 0;
    for (size_t i = 0; i < sizeof in8 / sizeof *in8; i++) bad += q[i] != want8[i];
    for (size_t i = 0; i < sizeof in4 / sizeof *in4; i++) bad += q[64 + i] != want4[i];
    CHECK_MSG(bad == 0 && s[0] == 1.0f && s[1] == 1.0f, "%s quantize_act ties: %d wrong", b->name, bad);
    free(q); free(s);
}

static void check_act_shape(const struct ebb_backend *const *paths, int n_tok, int n, int n_hi)
{
    int groups = n / 64;
    size_t nq = (size_t)n_tok * n, ns = (size_t)n_tok * groups;
    float *x = xmalloc(nq * sizeof *x);
    fill_act(x, n_tok, n);
    int8_t *qs = out_b(nq), *qr = xmalloc(nq ? nq : 1);
    float *ss = out_f(ns), *sr = xmalloc((ns ? ns : 1) * sizeof *sr);
    paths[0]->quantize_act(x, n_tok, n, n_hi, qs, ss);
    int hi = n_hi < 0 ? 0 : n_hi > groups ? groups : n_hi;
    for (int t = 0; t < n_tok; t++)
        for (int g = 0; g < groups; g++)
            act_ref_group(x + (size_t)t * n + 64 * g, g < hi ? 127 : 7, qr + (size_t)t * n + 64 * g,
                          sr + (size_t)t * groups + g);

    /* Scalar against the reference: codes and scales exactly, and the
     * rounding error of ordinary groups within half a step. */
    int bad_code = 0, bad_scale = 0, bad_err = 0, bad_zero = 0;
    for (size_t i = 0; i < nq; i++) bad_code += qs[i] != qr[i];
    for (size_t i = 0; i < ns; i++) bad_scale += memcmp(&ss[i], &sr[i], sizeof(float)) != 0;
    for (size_t gi = 0; gi < ns; gi++) {
        const float *xg = x + gi * 64;
        const int8_t *qg = qs + gi * 64;
        double amax = 0;
        for (int i = 0; i < 64; i++) amax = fmax(amax, fabs((double)xg[i]));
        if (amax == 0) {
            for (int i = 0; i < 64; i++) bad_zero += qg[i] != 0;
            bad_zero += ss[gi] != 0;
        } else if (amax > 1e-30) {
            for (int i = 0; i < 64; i++)
                bad_err += !(fabs((double)qg[i] * ss[gi] - xg[i]) <= 0.5 * ss[gi] * (1 + 1e-5));
        }
    }
    char what[120];
    snprintf(what, sizeof what, "quantize_act %dx%d n_hi=%d", n_tok, n, n_hi);
    CHECK_MSG(bad_code == 0 && bad_scale == 0, "scalar %s vs reference: %d codes, %d scales differ", what,
              bad_code, bad_scale);
    CHECK_MSG(bad_err == 0, "scalar %s: %d values off by more than half a step", what, bad_err);
    CHECK_MSG(bad_zero == 0, "scalar %s: zero groups not zero", what);
    CHECK_MSG(canary_b_ok(qs, nq) && canary_f_ok(ss, ns), "scalar %s overran", what);

    for (int p = 1; p < N_PATHS; p++) {
        if (!paths[p]) continue;
        int8_t *q = out_b(nq);
        float *s = out_f(ns);
        paths[p]->quantize_act(x, n_tok, n, n_hi, q, s);
        CHECK_MSG(memcmp(q, qs, nq) == 0 && memcmp(s, ss, ns * sizeof *s) == 0,
                  "%s %s differs from scalar", paths[p]->name, what);
        CHECK_MSG(canary_b_ok(q, nq) && canary_f_ok(s, ns), "%s %s overran", paths[p]->name, what);
        free(q); free(s);
    }
    free(x); free(qs); free(qr); free(ss); free(sr);
}

static void test_quantize_act(const struct ebb_backend *const *paths)
{
    static const int toks[] = { 1, 2, 3, 5, 17 };
    static const int lens[] = { 64, 128, 576, 1536 };
    for (size_t ti = 0; ti < sizeof toks / sizeof *toks; ti++)
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
            int groups = lens[li] / 64;
            const int his[] = { 0, 1, groups / 2, groups, groups + 3, -1 };
            for (size_t hi = 0; hi < sizeof his / sizeof *his; hi++)
                check_act_shape(paths, toks[ti], lens[li], his[hi]);
        }
    for (int p = 0; p < N_PATHS; p++) if (paths[p]) test_quantize_act_ties(paths[p]);
}

/* ----------------------------------------------------------------- matmuls */

/* W4G64 weight rows: mostly RTN-quantized random rows at varied magnitudes,
 * some rows of raw random blocks (every code, incl. -8, and random positive
 * f16 scales). */
static uint8_t *make_weights(int n_in, int n_out, size_t *row_bytes)
{
    size_t rb = (size_t)(n_in / 64) * 34;
    uint8_t *w = xmalloc(rb * (size_t)n_out + 64);
    float *row = xmalloc((size_t)n_in * sizeof *row);
    for (int o = 0; o < n_out; o++) {
        uint8_t *dst = w + (size_t)o * rb;
        if (o % 7 == 3) {
            for (size_t i = 0; i < rb; i++) dst[i] = (uint8_t)next_u64();
            for (size_t b = 0; b < rb; b += 34) {
                uint16_t h = ebb_f32_to_f16((0.5f + 0.5f * frand()) * 0.02f);
                dst[b] = (uint8_t)h;
                dst[b + 1] = (uint8_t)(h >> 8);
            }
            continue;
        }
        float mag = 0.05f * (float)(1 + o % 5);
        for (int i = 0; i < n_in; i++) row[i] = frand() * mag * (i % 64 == 5 ? 8.0f : 1.0f);
        ebb_quantize_w4g64_rtn(row, dst, (size_t)n_in);
    }
    free(row);
    *row_bytes = rb;
    return w;
}

/* Codes and scales for n_tok x n_in activations, through the scalar path. */
static void make_act(const struct ebb_backend *sc, int n_tok, int n_in, int8_t **q, float **s)
{
    float *x = xmalloc((size_t)n_tok * n_in * sizeof *x);
    for (size_t i = 0; i < (size_t)n_tok * n_in; i++) x[i] = frand() * (1 + (float)(i % 97) / 10);
    if (n_in >= 128) for (int t = 0; t < n_tok; t++) memset(x + (size_t)t * n_in + 64, 0, 64 * sizeof *x);
    *q = xmalloc((size_t)n_tok * n_in);
    *s = xmalloc((size_t)n_tok * (n_in / 64) * sizeof **s);
    sc->quantize_act(x, n_tok, n_in, (n_in / 64) / 3, *q, *s);
    free(x);
}

/* b's W4G64 product on codes q and scales s. */
static void qmatmul(const struct ebb_backend *b, struct ebb_pool *pool, float *out, const int8_t *q,
                    const float *s, const void *w, int n_tok, int n_in, int n_out)
{
    const struct ebb_act a = { .q = q, .s = s };
    b->matmul[EBB_TYPE_W4G64](pool, out, &a, w, n_tok, n_in, n_out);
}

/* Double reference from the dequantized operands; mag = sum |w a|. */
static void qmatmul_ref(const uint8_t *w, size_t rb, const int8_t *q, const float *s,
                        int n_tok, int n_in, int n_out, double *ref, double *mag)
{
    float *wd = xmalloc((size_t)n_in * sizeof *wd);
    double *ad = xmalloc((size_t)n_tok * n_in * sizeof *ad);
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < n_in; i++)
            ad[(size_t)t * n_in + i] = (double)q[(size_t)t * n_in + i] * s[(size_t)t * (n_in / 64) + i / 64];
    const struct ebb_type_info *ti = ebb_type_info(EBB_TYPE_W4G64);
    for (int o = 0; o < n_out; o++) {
        ti->to_f32(w + (size_t)o * rb, wd, (size_t)n_in);
        for (int t = 0; t < n_tok; t++) {
            const double *a = ad + (size_t)t * n_in;
            double acc = 0, m = 0;
            for (int i = 0; i < n_in; i++) {
                double p = (double)wd[i] * a[i];
                acc += p;
                m += fabs(p);
            }
            ref[(size_t)t * n_out + o] = acc;
            mag[(size_t)t * n_out + o] = m;
        }
    }
    free(wd); free(ad);
}

struct qshape { int n_tok, n_in, n_out; };

static void check_qmatmul(const struct qshape *sh, struct ebb_pool **pools, int n_pools,
                          const struct ebb_backend *const *paths)
{
    const char *kn = "w4a8";
    size_t rb, no = (size_t)sh->n_tok * sh->n_out;
    uint8_t *w = make_weights(sh->n_in, sh->n_out, &rb);
    int8_t *q;
    float *s;
    make_act(paths[0], sh->n_tok, sh->n_in, &q, &s);
    double *ref = xmalloc(no * sizeof *ref), *mag = xmalloc(no * sizeof *mag);
    qmatmul_ref(w, rb, q, s, sh->n_tok, sh->n_in, sh->n_out, ref, mag);

    float *sc = out_f(no);
    qmatmul(paths[0], NULL, sc, q, s, w, sh->n_tok, sh->n_in, sh->n_out);
    int blocks = sh->n_in / 64;
    double unit = (blocks + 2) * U32;
    size_t bad = 0;
    for (size_t i = 0; i < no; i++)
        if (!(fabs((double)sc[i] - ref[i]) <= unit * mag[i] + 1e-30)) {
            if (bad < 3) fprintf(stderr, "  scalar %s out[%zu] = %.9g, want %.9g\n", kn, i, sc[i], ref[i]);
            bad++;
        }
    char what[120];
    snprintf(what, sizeof what, "%s %dx%dx%d", kn, sh->n_tok, sh->n_in, sh->n_out);
    CHECK_MSG(bad == 0, "scalar %s vs double reference: %zu outputs off", what, bad);
    CHECK_MSG(canary_f_ok(sc, no), "scalar %s overran", what);

    for (int p = 0; p < N_PATHS; p++) {
        if (!paths[p]) continue;
        for (int pi = 0; pi < n_pools; pi++) {
            if (p == 0 && !pools[pi]) continue;               /* that is sc itself */
            float *out = out_f(no);
            qmatmul(paths[p], pools[pi], out, q, s, w, sh->n_tok, sh->n_in, sh->n_out);
            size_t d = count_diff_f(out, sc, no);
            CHECK_MSG(d == 0, "%s %s threads=%d: %zu outputs differ from scalar", paths[p]->name, what,
                      pools[pi] ? ebb_pool_threads(pools[pi]) : 0, d);
            CHECK_MSG(canary_f_ok(out, no), "%s %s overran", paths[p]->name, what);
            free(out);
        }
    }
    free(w); free(q); free(s); free(ref); free(mag); free(sc);
}

static void test_qmatmul(const struct ebb_backend *const *paths)
{
    static const int toks[] = { 1, 2, 3, 5, 17, 64, 100 };
    static const int outs[] = { 1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 40, 63, 100, 129, 257 };
    struct ebb_pool *pools[5] = { NULL };
    for (int t = 1; t <= 4; t++) {
        pools[t] = ebb_pool_create(t);
        CHECK(pools[t] != NULL);
    }
    /* Every input width 64..1536 once, paired with varied tokens and rows. */
    for (int n_in = 64; n_in <= 1536; n_in += 64) {
        int i = n_in / 64;
        struct qshape sh = { toks[i % 7], n_in, outs[(i * 5) % 16] };
        check_qmatmul(&sh, pools, 5, paths);
    }
    /* Every token count with a few widths. */
    for (int ti = 0; ti < 7; ti++) {
        struct qshape a = { toks[ti], 576, 37 }, b = { toks[ti], 192, 9 + ti };
        check_qmatmul(&a, pools, 5, paths);
        check_qmatmul(&b, pools, 5, paths);
    }
    /* The model's shapes and the largest required ones, 2 threads. */
    static const struct qshape big[] = { { 1, 576, 1536 }, { 1, 1536, 576 }, { 1, 576, 1537 },
                                         { 100, 1536, 1537 }, { 64, 576, 576 }, { 5, 4096, 70 } };
    struct ebb_pool *two[2] = { NULL, pools[2] };
    for (size_t i = 0; i < sizeof big / sizeof *big; i++) check_qmatmul(&big[i], two, 2, paths);
    for (int t = 1; t <= 4; t++) ebb_pool_destroy(pools[t]);
}

/* Extreme operands: all codes at +-127 against W4 codes -8/+7 (the largest
 * integer sums), scales near the float limits (outputs overflow to inf) and
 * subnormal. Every path must still agree with scalar. */
static void test_qmatmul_extremes(const struct ebb_backend *const *paths)
{
    const int T = 5, K = 640, N = 19;
    {
        size_t rb = (size_t)(K / 64) * 34;
        uint8_t *w = xmalloc(rb * N);
        int8_t *q = xmalloc((size_t)T * K);
        float *s = xmalloc((size_t)T * (K / 64) * sizeof *s);
        for (int case_ = 0; case_ < 3; case_++) {
            for (int o = 0; o < N; o++)
                for (size_t b = 0; b < rb; b += 34) {
                    uint8_t *blk = w + (size_t)o * rb + b;
                    uint16_t h = case_ == 1 ? 0x7bff : case_ == 2 ? 0x0001 : ebb_f32_to_f16(0.01f);
                    blk[0] = (uint8_t)h;
                    blk[1] = (uint8_t)(h >> 8);
                    for (int j = 0; j < 32; j++)
                        blk[2 + j] = o % 2 ? 0x00 : 0xff;
                }
            for (int i = 0; i < T * K; i++) q[i] = (int8_t)((i / 3) % 2 ? 127 : -127);
            for (int i = 0; i < T * (K / 64); i++)
                s[i] = case_ == 1 ? FLT_MAX / 127 : case_ == 2 ? 1e-40f : 0.5f;
            float *sc = out_f((size_t)T * N);
            qmatmul(paths[0], NULL, sc, q, s, w, T, K, N);
            if (case_ == 0) {
                /* Exact here: codes -8 (or 7) against +-127 in a fixed pattern. */
                int bad = 0, blocks = (int)(rb / 34);
                for (int t = 0; t < T; t++)
                    for (int o = 0; o < N; o++) {
                        double want = 0, mag = 0;
                        for (int i = 0; i < K; i++) {
                            int wc = o % 2 ? -8 : 7;
                            double term = (double)wc * q[t * K + i] * 0.5 * f16_at(w);
                            want += term;
                            mag += fabs(term);
                        }
                        bad += !(fabs(sc[t * N + o] - want) <= (blocks + 2) * U32 * mag);
                    }
                CHECK_MSG(bad == 0, "scalar w4a8 extremes: %d wrong", bad);
            }
            for (int p = 1; p < N_PATHS; p++) {
                if (!paths[p]) continue;
                float *out = out_f((size_t)T * N);
                qmatmul(paths[p], NULL, out, q, s, w, T, K, N);
                CHECK_MSG(count_diff_f(out, sc, (size_t)T * N) == 0, "%s w4a8 extremes case %d differ",
                          paths[p]->name, case_);
                free(out);
            }
            free(sc);
        }
        free(w); free(q); free(s);
    }
}

/* Batch invariance: a row's bits do not depend on how many tokens share the
 * call, its place in the batch, tiling or threads. Checked against the same
 * row computed alone, unthreaded. */
static void test_qmatmul_batch_invariant(const struct ebb_backend *b)
{
    static const int shapes[][2] = { { 576, 576 }, { 576, 192 }, { 1536, 576 }, { 320, 129 }, { 2560, 40 } };
    struct ebb_pool *pool2 = ebb_pool_create(2), *pool3 = ebb_pool_create(3);
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int K = shapes[si][0], N = shapes[si][1];
            size_t rb;
            uint8_t *w = make_weights(K, N, &rb);
            for (int T = 2; T <= 50; T += 7) {
                int8_t *q;
                float *s;
                make_act(ebb_backend_cpu_named("scalar"), T, K, &q, &s);
                float *all = out_f((size_t)T * N), *one = out_f((size_t)N);
                qmatmul(b, T % 2 ? pool2 : pool3, all, q, s, w, T, K, N);
                int differ = 0;
                for (int t = 0; t < T; t++) {
                    qmatmul(b, NULL, one, q + (size_t)t * K, s + (size_t)t * (K / 64), w, 1, K, N);
                    differ += count_diff_f(one, all + (size_t)t * N, (size_t)N) != 0;
                }
                CHECK_MSG(differ == 0, "%s w4a8: K=%d N=%d T=%d: %d rows differ from the row alone", b->name,
                          K, N, T, differ);
                free(q); free(s); free(all); free(one);
            }
            free(w);
        }
    ebb_pool_destroy(pool2);
    ebb_pool_destroy(pool3);
}

static void test_qmatmul_empty(const struct ebb_backend *b)
{
    float out[4] = { NAN, NAN, NAN, NAN };
    int8_t q[1] = { 0 };
    float s[1] = { 0 };
    uint8_t w[1] = { 0 };
    qmatmul(b, NULL, out, q, s, w, 2, 0, 2);
    CHECK_MSG(out[0] == 0 && out[3] == 0, "%s w4a8 with n_in = 0 must give zeros", b->name);
    out[0] = NAN;
    qmatmul(b, NULL, out, q, s, w, 0, 64, 2);
    CHECK_MSG(isnan(out[0]), "%s w4a8 with n_tok = 0 wrote", b->name);
}

/* -------------------------------------------------------------- hadamard64 */

static void test_hadamard(const struct ebb_backend *const *paths)
{
    static const int lens[] = { 0, 64, 128, 576, 1536 };
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        int n = lens[li];
        float *x = xmalloc(((size_t)n + 1) * sizeof *x);
        for (int i = 0; i < n; i++) {
            int kind = (i / 64) % 4;
            x[i] = frand() * (kind == 0 ? 1.0f : kind == 1 ? 1e30f : kind == 2 ? 1e-42f : 100.0f);
        }
        float *ys = out_f((size_t)n);
        memcpy(ys, x, (size_t)n * sizeof *x);
        paths[0]->hadamard64(ys, n);

        /* Against the explicit Sylvester matrix / 8, and orthonormality. */
        int bad = 0, bad_inv = 0, bad_norm = 0;
        float *yy = xmalloc(((size_t)n + 1) * sizeof *yy);
        memcpy(yy, ys, (size_t)n * sizeof *yy);
        paths[0]->hadamard64(yy, n);
        for (int b = 0; b < n; b += 64) {
            double l1 = 0, n_in = 0, n_out = 0;
            for (int j = 0; j < 64; j++) { l1 += fabs((double)x[b + j]); n_in += (double)x[b + j] * x[b + j]; }
            if (!isfinite(n_in) || (l1 > 0 && l1 < 1e-36)) continue;  /* subnormal block: exactness only */
            for (int i = 0; i < 64; i++) {
                double want = 0;
                for (int j = 0; j < 64; j++)
                    want += (__builtin_popcount((unsigned)(i & j)) % 2 ? -1.0 : 1.0) * x[b + j];
                want /= 8;
                bad += !(fabs(ys[b + i] - want) <= 7 * U32 * l1 / 8 + 1e-40);
                bad_inv += !(fabs(yy[b + i] - x[b + i]) <= 16 * U32 * l1 + 1e-40);
                n_out += (double)ys[b + i] * ys[b + i];
            }
            bad_norm += !(fabs(sqrt(n_out) - sqrt(n_in)) <= 1e-5 * sqrt(n_in));
        }
        CHECK_MSG(bad == 0, "hadamard64 n=%d: %d values differ from the explicit matrix", n, bad);
        CHECK_MSG(bad_inv == 0, "hadamard64 n=%d: H(H(x)) != x in %d places", n, bad_inv);
        CHECK_MSG(bad_norm == 0, "hadamard64 n=%d: %d blocks change the norm", n, bad_norm);
        CHECK_MSG(canary_f_ok(ys, (size_t)n), "scalar hadamard64 n=%d overran", n);

        for (int p = 1; p < N_PATHS; p++) {
            if (!paths[p]) continue;
            float *y = out_f((size_t)n);
            memcpy(y, x, (size_t)n * sizeof *x);
            paths[p]->hadamard64(y, n);
            CHECK_MSG(count_diff_f(y, ys, (size_t)n) == 0, "%s hadamard64 n=%d differs from scalar",
                      paths[p]->name, n);
            CHECK_MSG(canary_f_ok(y, (size_t)n), "%s hadamard64 n=%d overran", paths[p]->name, n);
            free(y);
        }
        free(x); free(ys); free(yy);
    }
}

/* ------------------------------------------------------------------- main */

int main(void)
{
    const struct ebb_backend *paths[N_PATHS];
    for (int p = 0; p < N_PATHS; p++) {
        paths[p] = ebb_backend_cpu_named(PATHS[p]);
        if (!paths[p]) printf("test_qkernels: path %s not supported by this CPU: SKIPPED (not executed)\n",
                              PATHS[p]);
        else CHECK(paths[p]->quantize_act && paths[p]->matmul[EBB_TYPE_W4G64] && paths[p]->matmul[EBB_TYPE_Q8_0] &&
                   paths[p]->hadamard64);
    }
    CHECK(paths[0] != NULL);
    if (!paths[0]) return check_report("test_qkernels");

    test_w4g64_format();
    test_w4g64_rtn();
    test_q8_0_quantizer();
    test_quantize_act(paths);
    test_hadamard(paths);
    test_qmatmul(paths);
    test_qmatmul_extremes(paths);
    for (int p = 0; p < N_PATHS; p++) {
        if (!paths[p]) continue;
        printf("test_qkernels: batch invariance on %s\n", paths[p]->name);
        test_qmatmul_batch_invariant(paths[p]);
        test_qmatmul_empty(paths[p]);
    }
    return check_report("test_qkernels");
}
