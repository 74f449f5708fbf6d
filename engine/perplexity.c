/* Perplexity (see perplexity.h for the scoring rules). NLLs are summed in
 * double from a max-shifted log-sum-exp over each row of logits, so a
 * vocabulary of 50K and thousands of tokens add without drift. */
#include "engine/perplexity.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/compress.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

static void fill_result(struct ppl_result *r, double nll, double nll2, long count) {
    const double mean = count ? nll / count : 0, var = count ? nll2 / count - mean * mean : 0;
    r->ppl = exp(mean);
    r->err = var > 0 && count > 1 ? r->ppl * sqrt(var / (count - 1)) : 0;
    r->scored = count;
}

/* One window's scored rows, positions first .. n_ctx - 1, into logits
 * (row 0 is position first): the context through the first scored
 * position -- compressing, up to each of compress->earlier's points and
 * compressed there, then compressed at its end -- then the rest. The context's
 * other rows take no output head (a tenth of a window's work on this
 * 135M model, and half the logits' memory); two passes give the bits of
 * one (the cache is batch-invariant, tests/unit/test_kv.c). */
static int window_logits(struct model_run *run, struct kv_cache *kv, const int32_t *win, int n_ctx, int first,
                         const struct compress_params *compress, float *logits, struct ppl_result *r) {
    const struct model *m = model_run_model(run);
    const size_t V = (size_t)m->cfg.n_vocab;
    const int compressing = compress && compress->mode != COMPRESS_OFF;
    struct compress_report rep;
    if (generate_prefill(run, kv, win, first + 1, compress, logits, &rep) ||
        model_forward(run, kv, win + first + 1, n_ctx - first - 1, logits + V, 1))
        return -1;
    r->compressed += rep.applied;
    /* The context's pages uncompressed (what the first compression found,
     * had there been one point only). */
    if (compressing)
        r->kv_full_bytes += (size_t)((first + 1 + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS) * kv->layout.page_bytes;
    r->kv_compressed_bytes += rep.bytes_after;
    return 0;
}

int perplexity_context(int n_ctx, int n_score) { return (n_score ? n_ctx - 1 - n_score : n_ctx / 2) + 1; }

int perplexity_windows(struct model_run *run, const int32_t *tokens, int n_windows, int n_ctx, int n_score, int32_t bos,
                       int kv_bits, const struct compress_params *compress, int32_t *top1, ppl_progress_fn progress,
                       void *ud, struct ppl_result *r, char *err, size_t errlen) {
    const struct model *m = model_run_model(run);
    const int n_tokens = r->n_tokens;   /* perplexity_measure's count, for the progress line */
    memset(r, 0, sizeof *r);
    r->n_tokens = n_tokens;
    if (n_ctx < 8 || n_ctx > m->cfg.n_ctx_train) {
        snprintf(err, errlen, "windows of %d tokens: the model's context is %d (and at least 8 are needed)", n_ctx,
                 m->cfg.n_ctx_train);
        return -1;
    }
    if (n_score < 0 || n_score > n_ctx - 2) {
        snprintf(err, errlen, "scoring %d predictions of windows of %d tokens: at most %d (one token of context)",
                 n_score, n_ctx, n_ctx - 2);
        return -1;
    }
    struct kv_account kv_policy;   /* the cache's precision; no budget */
    if (kv_account_init(&kv_policy, &m->cfg, kv_bits, 0)) {
        snprintf(err, errlen, "%s", kv_bits_problem(&m->cfg, kv_bits));
        return -1;
    }
    kv_policy.be = m->be;          /* the caches live where the model computes */
    int rc = -1;
    const int first = perplexity_context(n_ctx, n_score) - 1;
    struct kv_cache kv = {0};
    float *logits = malloc((size_t)(n_ctx - first) * m->cfg.n_vocab * sizeof(float));
    int32_t *win = malloc((size_t)n_ctx * sizeof *win);
    if (!logits || !win || kv_cache_init(&kv, &m->cfg, n_ctx, &kv_policy)) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    double nll = 0, nll2 = 0;
    long count = 0;
    const double t0 = ebb_now_seconds();
    if (progress) progress(ud, 0, n_windows, r, 0);
    for (int w = 0; w < n_windows; w++) {
        memcpy(win, tokens + (size_t)w * n_ctx, (size_t)n_ctx * sizeof *win);
        if (bos >= 0) win[0] = bos;
        kv_cache_clear(&kv);
        if (window_logits(run, &kv, win, n_ctx, first, compress, logits, r)) {
            snprintf(err, errlen, "the forward pass failed");
            goto out;
        }
        for (int j = first; j < n_ctx - 1; j++) {
            const float *row = logits + (size_t)(j - first) * m->cfg.n_vocab;
            const double v = -log_softmax_at(row, m->cfg.n_vocab, win[j + 1]);
            if (top1) {
                int best = 0;
                for (int t = 1; t < m->cfg.n_vocab; t++)
                    if (row[t] > row[best]) best = t;
                top1[count] = best;
            }
            nll += v;
            nll2 += v * v;
            count++;
        }
        r->windows = w + 1;
        fill_result(r, nll, nll2, count);
        if (progress) progress(ud, w + 1, n_windows, r, ebb_now_seconds() - t0);
    }
    rc = 0;
out:
    kv_cache_free(&kv);
    kv_account_destroy(&kv_policy);
    free(logits);
    free(win);
    return rc;
}

int perplexity_tokens(const struct model *m, const char *text, size_t len, int n_ctx, int max_windows,
                      int32_t **tokens, int *n_tokens, int *n_windows, char *err, size_t errlen) {
    *tokens = NULL;
    *n_tokens = *n_windows = 0;
    /* With BOS the stream is [BOS, body...], like llama.cpp's tokenization. */
    const int n = tokenizer_encode_with_bos(m->tok, text, len, 0, 1, tokens);
    if (n < 0) {
        snprintf(err, errlen, "the text is not valid UTF-8");
        return -1;
    }
    *n_tokens = n;
    int w = n_ctx > 0 ? n / n_ctx : 0;
    if (max_windows > 0 && w > max_windows) w = max_windows;
    *n_windows = w;
    if (n_ctx >= 8 && n_ctx <= m->cfg.n_ctx_train && w == 0) {
        snprintf(err, errlen, "the text has %d tokens, fewer than one window of %d", n, n_ctx);
        free(*tokens);
        *tokens = NULL;
        return -1;
    }
    return 0;
}

int perplexity_measure(struct model_run *run, const char *text, size_t len, int n_ctx, int n_score, int max_windows,
                       int kv_bits,
                       const struct compress_params *compress, int32_t *top1, ppl_progress_fn progress, void *ud,
                       struct ppl_result *r, char *err, size_t errlen) {
    const struct model *m = model_run_model(run);
    memset(r, 0, sizeof *r);
    int32_t *tokens = NULL;
    int n_tokens, n_windows;
    if (perplexity_tokens(m, text, len, n_ctx, max_windows, &tokens, &n_tokens, &n_windows, err, errlen)) return -1;
    r->n_tokens = n_tokens;
    const int rc = perplexity_windows(run, tokens, n_windows, n_ctx, n_score, tokenizer_bos_to_add(m->tok), kv_bits,
                                      compress, top1, progress, ud, r, err, errlen);
    r->n_tokens = n_tokens;
    free(tokens);
    return rc;
}
