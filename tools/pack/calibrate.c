/* Calibration: what the quantizers need to know about the activations.
 *
 * The rotated f32 model runs over windows of a calibration text with
 * the run's capture hook set; for every layer and activation point the hook adds the
 * batch's X^T X to that point's Hessian (GPTQ's proxy for how much each
 * weight column's error costs), updates each channel's absolute maximum and
 * sums, per activation group (64 or 32 channels), the squared per-token group maximum (what 4-bit
 * noise is proportional to) and the activation's energy (outliers.c).
 *
 * Precision and speed: the Hessian of a batch (up to MODEL_MAX_BATCH tokens)
 * is one float SYRK from OpenBLAS, upper triangle only, then added into a
 * double accumulator, so tens of thousands of tokens sum without float
 * drift while the heavy product runs at float speed. Symmetrised at the end.
 *
 * One pass collects every layer at once (all Hessians resident, ~0.8 GB in
 * double for the default model) on the unquantized model. GPTQ's original
 * recipe re-runs each layer on the outputs of the already quantized ones;
 * that costs one pass per layer and mostly matters for much deeper error
 * accumulation than a 4-bit group-64 model shows, so we take the single pass.
 *
 * Determinism: windows are chosen by a seeded generator (splitmix64) from the
 * text's len-aligned windows without replacement, so a seed names the data.
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/generate.h"
#include "tools/pack/pack.h"

int pack_calib_init(struct pack_calib *c, const struct model_config *cfg, int group, int want_hessian) {
    memset(c, 0, sizeof *c);
    c->n_layer = cfg->n_layer;
    c->group = group;
    const int slots = cfg->n_layer * ACT_POINTS + 1;   /* every layer's points, then the head's input */
    c->pt = calloc((size_t)slots, sizeof *c->pt);
    if (!c->pt) return -1;
    int widest = 0;
    for (int i = 0; i < slots; i++) {
        struct pack_act_stats *s = &c->pt[i];
        s->n = i == slots - 1 ? cfg->n_embd : act_point_width(cfg, (enum act_point)(i % ACT_POINTS));
        if (s->n > widest) widest = s->n;
        s->absmax = calloc((size_t)s->n, sizeof(float));
        s->abssum = calloc((size_t)s->n, sizeof(double));
        s->gmax2 = calloc((size_t)s->n / group + 1, sizeof(double));
        if (!s->absmax || !s->abssum || !s->gmax2) goto fail;
        if (want_hessian) {
            s->hess = calloc((size_t)s->n * s->n, sizeof(double));
            if (!s->hess) goto fail;
        }
    }
    if (want_hessian) {
        c->scratch = malloc((size_t)widest * widest * sizeof(float));
        if (!c->scratch) goto fail;
        c->scratch_n = widest;
    }
    return 0;
fail:
    pack_calib_free(c);
    return -1;
}

void pack_calib_free(struct pack_calib *c) {
    if (c->pt)
        for (int i = 0; i < c->n_layer * ACT_POINTS + 1; i++) {
            free(c->pt[i].hess);
            free(c->pt[i].absmax);
            free(c->pt[i].abssum);
            free(c->pt[i].gmax2);
        }
    free(c->pt);
    free(c->scratch);
    memset(c, 0, sizeof *c);
}

void pack_calib_capture(void *ud, int layer, enum act_point point, const float *x, int n_tok, int n) {
    struct pack_calib *c = ud;
    struct pack_act_stats *s = &c->pt[layer * ACT_POINTS + point];
    if (n != s->n) return;   /* cannot happen for the model the stats were made for */
    if (layer == 0 && point == ACT_ATTN_IN) c->n_tokens += n_tok;
    for (int t = 0; t < n_tok; t++) {
        const float *row = x + (size_t)t * n;
        for (int g = 0; g < n / c->group; g++) {
            float gmax = 0;
            for (int i = g * c->group; i < (g + 1) * c->group; i++) {
                const float a = fabsf(row[i]);
                if (a > s->absmax[i]) s->absmax[i] = a;
                s->abssum[i] += a;
                if (a > gmax) gmax = a;
                s->energy += (double)row[i] * row[i];
            }
            s->gmax2[g] += (double)gmax * gmax;
        }
    }
    if (!s->hess) return;
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, n, n_tok, 1.0f, x, n, 0.0f, c->scratch, n);
    for (int i = 0; i < n; i++) {
        double *h = s->hess + (size_t)i * n;
        const float *p = c->scratch + (size_t)i * n;
        for (int j = i; j < n; j++) h[j] += p[j];
    }
}

uint64_t pack_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int pack_sample_windows(const int32_t *tokens, int n_tokens, int n_seqs, int len, uint64_t seed, int32_t bos,
                        int32_t *out) {
    const int n_win = len > 0 ? n_tokens / len : 0;
    if (n_win == 0 || n_seqs <= 0) return 0;
    int *order = malloc((size_t)n_win * sizeof *order);
    if (!order) return 0;
    for (int i = 0; i < n_win; i++) order[i] = i;
    const int take = n_seqs < n_win ? n_seqs : n_win;
    uint64_t state = seed;
    for (int i = 0; i < take; i++) {   /* partial Fisher-Yates */
        int j = i + (int)(pack_splitmix64(&state) % (uint64_t)(n_win - i));
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    for (int k = 0; k < take; k++) {
        int32_t *dst = out + (size_t)k * len;
        memcpy(dst, tokens + (size_t)order[k] * len, (size_t)len * sizeof(int32_t));
        if (bos >= 0) dst[0] = bos;
    }
    free(order);
    return take;
}

static void progress_bar(const char *what, int done, int total, long tokens, double elapsed) {
    char bar[31];
    int fill = total ? (int)((long)done * 30 / total) : 30;
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    double rate = elapsed > 0 ? tokens / elapsed : 0;
    double eta = done && done < total ? elapsed * (total - done) / done : 0;
    fprintf(stderr, "\r%-16s [%s] %d/%d  %.0f tok/s  %4.0f s left ", what, bar, done, total, rate, eta);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

int pack_calibrate(struct model_run *run, struct pack_calib *c, const int32_t *windows, int n_seqs, int len,
                   const char *label, char *err, size_t errlen) {
    const struct model *m = model_run_model(run);
    struct kv_cache kv;
    if (kv_cache_init(&kv, &m->cfg, len, NULL)) {
        snprintf(err, errlen, "out of memory for a %d-token cache", len);
        return -1;
    }
    model_run_set_capture(run, pack_calib_capture, c);
    int rc = 0;
    double t0 = ebb_now_seconds();
    if (label) progress_bar(label, 0, n_seqs, 0, 0);
    for (int s = 0; s < n_seqs && !rc; s++) {
        kv_cache_clear(&kv);
        if (model_forward(run, &kv, windows + (size_t)s * len, len, NULL, 0)) {
            snprintf(err, errlen, "forward pass failed on calibration window %d", s);
            rc = -1;
        } else if (label) {
            progress_bar(label, s + 1, n_seqs, (long)(s + 1) * len, ebb_now_seconds() - t0);
        }
    }
    model_run_set_capture(run, NULL, NULL);
    kv_cache_free(&kv);
    if (rc) return rc;
    /* Mirror the upper triangles. */
    for (int p = 0; p < c->n_layer * ACT_POINTS; p++) {
        struct pack_act_stats *st = &c->pt[p];
        if (!st->hess) continue;
        for (int i = 0; i < st->n; i++)
            for (int j = 0; j < i; j++) st->hess[(size_t)i * st->n + j] = st->hess[(size_t)j * st->n + i];
    }
    return 0;
}
