/* A model placed on a device held against the same file on the CPU, pass by
 * pass: the harness of test_device_engine (the emulated device, where every
 * logit must be the scalar path's bits) and of the GPU suite's
 * test_cuda_engine (a real device, where the f32 steps' own summation order
 * and exp allow float error, so it reports the largest difference and
 * counts the positions whose greedy choice differs).
 *
 * Both sides always see the same tokens -- the reference's greedy choices
 * -- so one difference does not send them down different texts.
 */
#ifndef EBB_TEST_ENGINE_COMPARE_H
#define EBB_TEST_ENGINE_COMPARE_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/kv.h"
#include "engine/model.h"

/* What the comparisons saw, over every logits row they compared. */
struct ec_stats {
    long rows, rows_differing;     /* rows compared; rows not bit-identical */
    double max_abs;                /* the largest |ref - dev| of any logit */
    double max_rel;                /* ... over the row's largest |logit| */
    long argmax_differ;            /* rows whose greedy token differs */
    double min_margin_at_differ;   /* the reference's top-2 gap at such a row (a near-tie is forgivable) */
};

static inline void ec_stats_init(struct ec_stats *s) {
    memset(s, 0, sizeof *s);
    s->min_margin_at_differ = INFINITY;
}

static inline int ec_argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

static inline void ec_rows(struct ec_stats *s, const float *ref, const float *dev, int n_rows, int V) {
    for (int r = 0; r < n_rows; r++) {
        const float *a = ref + (size_t)r * V, *b = dev + (size_t)r * V;
        s->rows++;
        if (memcmp(a, b, (size_t)V * sizeof(float)) == 0) continue;
        s->rows_differing++;
        double scale = 0, worst = 0;
        for (int i = 0; i < V; i++) {
            scale = fmax(scale, fabs((double)a[i]));
            const double d = fabs((double)a[i] - (double)b[i]);
            worst = isnan(d) ? INFINITY : fmax(worst, d);
        }
        s->max_abs = fmax(s->max_abs, worst);
        s->max_rel = fmax(s->max_rel, scale > 0 ? worst / scale : worst);
        const int ia = ec_argmax(a, V), ib = ec_argmax(b, V);
        if (ia != ib) {
            s->argmax_differ++;
            float second = -INFINITY;
            for (int i = 0; i < V; i++)
                if (i != ia && a[i] > second) second = a[i];
            s->min_margin_at_differ = fmin(s->min_margin_at_differ, (double)(a[ia] - second));
        }
    }
}

/* One side of a comparison: a run and a KV account at the given precision,
 * whose caches live where the model is. */
struct ec_side {
    struct model_run *run;
    struct kv_account account;
};

static inline int ec_side_init(struct ec_side *s, struct model *m, int kv_bits) {
    s->run = model_run_new(m, 2);
    if (!s->run || kv_account_init(&s->account, &m->cfg, kv_bits, 0)) return -1;
    s->account.be = m->be;
    return 0;
}

static inline void ec_side_free(struct ec_side *s) {
    model_run_free(s->run);
    kv_account_destroy(&s->account);
}

/* The prompt with every position's logits, then `steps` tokens one at a
 * time, then a rollback of the last (speculative decoding's) and that token
 * again. */
static inline void ec_prompt_and_decode(struct model *ref, struct model *dev, const int32_t *prompt, int n_prompt,
                                 int kv_bits, int steps, struct ec_stats *st) {
    struct ec_side a, b;
    const int ok = ec_side_init(&a, ref, kv_bits) == 0 && ec_side_init(&b, dev, kv_bits) == 0;
    CHECK_MSG(ok, "KV%d: runs", kv_bits);
    if (!ok) return;
    const int V = ref->cfg.n_vocab, n_ctx = n_prompt + steps + 1;
    struct kv_cache ka, kb;
    CHECK(kv_cache_init(&ka, &ref->cfg, n_ctx, &a.account) == KV_OK);
    CHECK(kv_cache_init(&kb, &dev->cfg, n_ctx, &b.account) == KV_OK);
    float *la = malloc((size_t)n_prompt * V * sizeof(float)), *lb = malloc((size_t)n_prompt * V * sizeof(float));
    CHECK(model_forward(a.run, &ka, prompt, n_prompt, la, 1) == 0);
    CHECK_MSG(model_forward(b.run, &kb, prompt, n_prompt, lb, 1) == 0, "KV%d: the device's prompt pass", kv_bits);
    ec_rows(st, la, lb, n_prompt, V);
    int32_t tok = ec_argmax(la + (size_t)(n_prompt - 1) * V, V);
    for (int step = 0; step < steps; step++) {
        CHECK(model_forward(a.run, &ka, &tok, 1, la, 0) == 0);
        CHECK(model_forward(b.run, &kb, &tok, 1, lb, 0) == 0);
        ec_rows(st, la, lb, 1, V);
        if (step + 1 < steps) tok = ec_argmax(la, V);
    }
    CHECK(kv_cache_truncate(&ka, ka.n_past - 1) == 0 && kv_cache_truncate(&kb, kb.n_past - 1) == 0);
    CHECK(model_forward(a.run, &ka, &tok, 1, la, 0) == 0 && model_forward(b.run, &kb, &tok, 1, lb, 0) == 0);
    ec_rows(st, la, lb, 1, V);
    kv_cache_free(&ka);
    kv_cache_free(&kb);
    free(la);
    free(lb);
    ec_side_free(&a);
    ec_side_free(&b);
}

/* Three sequences in one pass on the device -- a prompt chunk, a decode
 * token after a prompt, an embedding -- against each alone on the CPU. The
 * embedding sums' largest difference joins max_abs. */
static inline void ec_batch(struct model *ref, struct model *dev, const int32_t *prompt, int n_prompt, struct ec_stats *st) {
    struct ec_side a, b;
    const int ok = ec_side_init(&a, ref, 4) == 0 && ec_side_init(&b, dev, 4) == 0 && n_prompt > 41;
    CHECK(ok);
    if (!ok) return;
    const int V = ref->cfg.n_vocab, E = ref->cfg.n_embd;
    struct kv_cache alone[3], batched[3];
    for (int i = 0; i < 3; i++) {
        CHECK(kv_cache_init(&alone[i], &ref->cfg, n_prompt + 8, &a.account) == KV_OK);
        CHECK(kv_cache_init(&batched[i], &dev->cfg, n_prompt + 8, &b.account) == KV_OK);
    }
    float *want = malloc((size_t)V * sizeof(float)), *got0 = malloc((size_t)V * sizeof(float));
    float *got1 = malloc((size_t)V * sizeof(float));
    float *emb_want = calloc((size_t)E, sizeof(float)), *emb_got = calloc((size_t)E, sizeof(float));
    CHECK(model_forward(a.run, &alone[1], prompt, 40, want, 0) == 0);
    CHECK(model_forward(b.run, &batched[1], prompt, 40, got1, 0) == 0);
    struct batch_seq seqs[3] = {
        {&batched[0], prompt, 30, got0, 0, NULL},
        {&batched[1], prompt + 40, 1, got1, 0, NULL},
        {&batched[2], prompt + 5, 12, NULL, 0, emb_got},
    };
    CHECK(model_forward_batch(b.run, seqs, 3) == 0);
    CHECK(model_forward(a.run, &alone[0], prompt, 30, want, 0) == 0);
    ec_rows(st, want, got0, 1, V);
    CHECK(model_forward(a.run, &alone[1], prompt + 40, 1, want, 0) == 0);
    ec_rows(st, want, got1, 1, V);
    struct batch_seq e = {&alone[2], prompt + 5, 12, NULL, 0, emb_want};
    CHECK(model_forward_batch(a.run, &e, 1) == 0);
    st->rows++;
    if (memcmp(emb_want, emb_got, (size_t)E * sizeof(float))) {
        st->rows_differing++;
        for (int i = 0; i < E; i++) st->max_abs = fmax(st->max_abs, fabs((double)emb_want[i] - (double)emb_got[i]));
    }
    for (int i = 0; i < 3; i++) {
        kv_cache_free(&alone[i]);
        kv_cache_free(&batched[i]);
    }
    free(want), free(got0), free(got1), free(emb_want), free(emb_got);
    ec_side_free(&a);
    ec_side_free(&b);
}

/* A text long enough to fill more than two KV pages, so a cache at 8 or 4
 * bits reads its first page from the quantized body. */
static const char ec_text[] =
    "The committee met on Tuesday to discuss the budget for next year. After a long debate "
    "about roads, schools and the new library, they agreed to raise the parks fund by ten "
    "percent and to review the transport plan in the spring, when the new figures are in. "
    "The mayor thanked the volunteers who had counted traffic at every crossing in town, "
    "and asked the council to publish the counts, the costs of each option and a map of "
    "the proposed bus lanes before the public meeting in March. Several residents wrote "
    "to say that the bridge on Mill Street needs repairs first, since lorries now take a "
    "long detour through the market square on Saturdays, which slows everyone down.";
#endif
