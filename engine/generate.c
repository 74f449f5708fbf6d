/* Single-sequence generation loop; see generate.h. The loop owns its KV cache
 * for the duration of the call, so concurrent sequences are the scheduler's
 * business, not this file's. */
#include "engine/generate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/model.h"
#include "engine/tokenizer.h"

const char *finish_reason_name(enum finish_reason r) {
    switch (r) {
    case FINISH_STOP: return "stop";
    case FINISH_LENGTH: return "length";
    case FINISH_CANCELLED: return "cancelled";
    default: return "error";
    }
}

double ebb_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int generate_is_end_token(const struct model *m, int32_t id) {
    if (id == tokenizer_eos(m->tok)) return 1;
    /* End-of-turn markers of the common chat formats; looked up by text so no
     * model's ids are baked in. */
    static const char *const ends[] = {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "</s>"};
    if (!tokenizer_is_control(m->tok, id)) return 0;
    size_t len;
    const char *piece = tokenizer_piece(m->tok, id, &len);
    for (size_t i = 0; piece && i < sizeof ends / sizeof ends[0]; i++)
        if (strlen(ends[i]) == len && !memcmp(piece, ends[i], len)) return 1;
    return 0;
}

static int fail(struct gen_result *res, const char *msg) {
    snprintf(res->error, sizeof res->error, "%s", msg);
    res->finish = FINISH_ERROR;
    return -1;
}

/* Emits released text through the callback; returns nonzero if cancelled. */
static int emit(gen_text_fn on_text, void *ud, int32_t id, char **buf, size_t *len) {
    int cancel = on_text ? on_text(ud, id, *buf ? *buf : "", *len) : 0;
    *len = 0;
    if (*buf) (*buf)[0] = 0;
    return cancel;
}

int generate(struct model *m, const int32_t *prompt, int n_prompt, const struct gen_params *p,
             gen_text_fn on_text, void *ud, struct gen_result *res) {
    memset(res, 0, sizeof *res);
    res->n_prompt = n_prompt;
    if (n_prompt <= 0) return fail(res, "the prompt is empty");
    int n_ctx = p->n_ctx > 0 ? p->n_ctx : n_prompt + (p->max_tokens > 0 ? p->max_tokens : 0);
    if (n_ctx > m->cfg.n_ctx_train) n_ctx = m->cfg.n_ctx_train;
    if (n_prompt >= n_ctx) {
        snprintf(res->error, sizeof res->error, "the prompt has %d tokens; the context holds %d",
                 n_prompt, n_ctx);
        res->finish = FINISH_ERROR;
        return -1;
    }
    struct kv_cache kv;
    float *logits = malloc((size_t)m->cfg.n_vocab * sizeof(float));
    int32_t *history = malloc((size_t)n_ctx * sizeof(int32_t));
    struct sampler *smp = sampler_create(&p->sampling, m->cfg.n_vocab);
    int kv_ok = kv_cache_init(&kv, &m->cfg, n_ctx) == 0;
    if (!logits || !history || !smp || !kv_ok) {
        free(logits); free(history); sampler_free(smp);
        if (kv_ok) kv_cache_free(&kv);
        return fail(res, "out of memory for the context");
    }
    memcpy(history, prompt, (size_t)n_prompt * sizeof(int32_t));
    int n_hist = n_prompt;

    struct detok dt;
    detok_init(&dt, m->tok);
    struct stop_matcher sm;
    stop_init(&sm, p->stops, p->n_stops);
    char *out = NULL;
    size_t out_len = 0;
    char piece[64];

    double t0 = ebb_now_seconds();
    int rc = model_forward(m, &kv, prompt, n_prompt, logits, 0);
    double t1 = ebb_now_seconds();
    res->prefill_s = t1 - t0;
    res->finish = FINISH_LENGTH;
    while (rc == 0 && res->n_generated < p->max_tokens) {
        int32_t id = sampler_sample(smp, logits, history, n_hist);
        res->n_generated++;
        history[n_hist++] = id;
        if (generate_is_end_token(m, id)) { res->finish = FINISH_STOP; break; }
        size_t n = detok_push(&dt, id, piece, sizeof piece);
        int stopped = stop_feed(&sm, piece, n, &out, &out_len);
        if (emit(on_text, ud, id, &out, &out_len)) { res->finish = FINISH_CANCELLED; break; }
        if (stopped) { res->finish = FINISH_STOP; break; }
        if (res->n_generated == p->max_tokens || kv.n_past >= n_ctx) break;
        rc = model_forward(m, &kv, &id, 1, logits, 0);
    }
    if (res->finish != FINISH_CANCELLED && !sm.stopped) {
        size_t n = detok_flush(&dt, piece, sizeof piece);
        stop_feed(&sm, piece, n, &out, &out_len);
        if (!sm.stopped) stop_finish(&sm, &out, &out_len);
        if (out_len) emit(on_text, ud, -1, &out, &out_len);
    }
    res->decode_s = ebb_now_seconds() - t1;
    free(out);
    stop_free(&sm);
    sampler_free(smp);
    kv_cache_free(&kv);
    free(history);
    free(logits);
    if (rc) return fail(res, "model forward failed");
    return 0;
}
