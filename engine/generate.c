/* Generation state machine and the single-sequence loop; see generate.h. */
#include "engine/generate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/grammar.h"
#include "engine/model.h"
#include "engine/sampler.h"

const char *finish_reason_name(enum finish_reason r) {
    switch (r) {
    case FINISH_STOP: return "stop";
    case FINISH_LENGTH: return "length";
    case FINISH_CANCELLED: return "cancelled";
    case FINISH_NONE: return "none";
    case FINISH_EVICTED: return "evicted";
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

/* The vocabulary's end tokens, once per sequence that must avoid them
 * (control tokens are few, so the scan is one cheap test per id). */
static int collect_end_ids(struct gen_seq *g) {
    const int n = g->m->cfg.n_vocab;
    for (int pass = 0; pass < 2; pass++) {
        g->n_end_ids = 0;
        for (int32_t id = 0; id < n; id++)
            if (generate_is_end_token(g->m, id)) {
                if (pass) g->end_ids[g->n_end_ids] = id;
                g->n_end_ids++;
            }
        if (!pass && !(g->end_ids = malloc((size_t)(g->n_end_ids + 1) * sizeof(int32_t)))) return -1;
    }
    return 0;
}

static int is_stop_id(const struct gen_seq *g, int32_t id) {
    for (int i = 0; i < g->params->n_stop_ids; i++)
        if (g->params->stop_ids[i] == id) return 1;
    return 0;
}

/* Tokens that may not be sampled now: end tokens under ignore_eos, and end
 * tokens and stop ids before min_tokens. */
static void ban_ending_tokens(struct gen_seq *g, float *logits) {
    const int early = g->n_generated < g->params->min_tokens;
    if (g->params->ignore_eos || early)
        for (int i = 0; i < g->n_end_ids; i++) logits[g->end_ids[i]] = -INFINITY;
    if (early)
        for (int i = 0; i < g->params->n_stop_ids; i++) logits[g->params->stop_ids[i]] = -INFINITY;
}

/* The grammar's mask over the logits: what it does not allow cannot be
 * sampled. Returns how many tokens it allows (0: stuck; -1: out of memory). */
static int apply_grammar(struct gen_seq *g, float *logits) {
    const int n = grammar_mask(g->matcher, g->params->grammar_vocab, g->allowed);
    for (int id = 0; n > 0 && id < g->m->cfg.n_vocab; id++)
        if (!g->allowed[id]) logits[id] = -INFINITY;
    return n;
}

int gen_seq_init(struct gen_seq *g, const struct model *m, const int32_t *prompt, int n_prompt,
                 const struct gen_params *p) {
    memset(g, 0, sizeof *g);
    g->m = m;
    g->max_tokens = p->max_tokens;
    g->want_logprobs = p->logprobs || p->top_logprobs > 0;
    g->finish = FINISH_NONE;
    g->cap_history = n_prompt + (p->max_tokens > 0 ? p->max_tokens : 0) + 1;
    g->history = malloc((size_t)g->cap_history * sizeof(int32_t));
    g->sampler = sampler_create(&p->sampling, m->cfg.n_vocab);
    g->text = malloc(1);
    g->piece_cap = tokenizer_detok_buffer(m->tok);
    g->piece = malloc(g->piece_cap);
    const int want_raw = p->logprobs || p->top_logprobs > 0;
    g->raw_logits = want_raw ? malloc((size_t)m->cfg.n_vocab * sizeof(float)) : NULL;
    g->params = p;
    if (p->grammar && p->grammar_vocab) {
        g->matcher = grammar_matcher_new(p->grammar);
        g->allowed = malloc((size_t)m->cfg.n_vocab);
    }
    if (!g->history || !g->sampler || !g->text || !g->piece || (want_raw && !g->raw_logits) ||
        ((p->ignore_eos || p->min_tokens > 0) && collect_end_ids(g) < 0) ||
        (p->grammar && p->grammar_vocab && (!g->matcher || !g->allowed))) {
        gen_seq_free(g);
        return -1;
    }
    g->text[0] = 0;
    memcpy(g->history, prompt, (size_t)n_prompt * sizeof(int32_t));
    g->n_history = n_prompt;
    detok_init(&g->detok, m->tok);
    stop_init(&g->stop, p->stops, p->n_stops);
    if (p->max_tokens <= 0 && !p->embedding) g->finish = FINISH_LENGTH;
    return 0;
}

void gen_seq_free(struct gen_seq *g) {
    if (!g) return;
    if (g->sampler) stop_free(&g->stop);
    sampler_free(g->sampler);
    free(g->history);
    free(g->text);
    free(g->raw_logits);
    free(g->end_ids);
    grammar_matcher_free(g->matcher);
    free(g->allowed);
    free(g->piece);
    memset(g, 0, sizeof *g);
}

/* Releases everything the detokenizer and stop matcher still hold. Text
 * that cannot be held (out of memory) fails the sequence: an answer with a
 * hole in it must not pass for a finished one. */
static void flush_held(struct gen_seq *g) {
    if (g->stop.stopped) return;
    size_t n = detok_flush(&g->detok, g->piece, g->piece_cap);
    if (stop_feed(&g->stop, g->piece, n, &g->text, &g->text_len) < 0 ||
        (!g->stop.stopped && stop_finish(&g->stop, &g->text, &g->text_len) < 0))
        g->finish = FINISH_ERROR;
}

void gen_seq_finish(struct gen_seq *g, enum finish_reason why) {
    if (g->finish == FINISH_NONE) {
        g->finish = why;
        if (why != FINISH_CANCELLED) flush_held(g);
    }
}

int32_t gen_seq_step(struct gen_seq *g, float *logits) {
    g->text_len = 0;
    g->text[0] = 0;
    /* The sampler reshapes logits in place, so the model's own probability
     * of the chosen token is measured on a copy taken first. */
    const int n_vocab = g->m->cfg.n_vocab;
    if (g->want_logprobs) memcpy(g->raw_logits, logits, (size_t)n_vocab * sizeof(float));
    ban_ending_tokens(g, logits);
    sampler_adjust(g->sampler, logits, g->history, g->n_history);
    if (g->matcher) {
        /* Greedy under a grammar: the mask is needed only when the best
         * token is refused (one check, under a microsecond, against up to
         * a millisecond for the whole vocabulary). */
        const double t0 = ebb_now_seconds();
        const int fits = sampler_is_greedy(g->sampler) &&
                         grammar_token_allowed(g->matcher, g->params->grammar_vocab, sampler_argmax(logits, n_vocab));
        const int allowed = fits ? 1 : apply_grammar(g, logits);
        g->mask_s += ebb_now_seconds() - t0;
        if (allowed <= 0) {
            /* Out of memory, or stuck: a complete text allows the end tokens
             * and one that can take nothing more ended with its last token,
             * so only a grammar the vocabulary cannot spell gets here. */
            gen_seq_finish(g, FINISH_ERROR);
            return -1;
        }
    }
    int32_t id = sampler_pick(g->sampler, logits);
    if (g->want_logprobs) {
        g->logprob = (float)log_softmax_at(g->raw_logits, n_vocab, id);
        g->n_top = log_softmax_top(g->raw_logits, n_vocab, g->params->top_logprobs, g->top_id, g->top_logprob);
    }
    g->n_generated++;
    if (g->n_history < g->cap_history) g->history[g->n_history++] = id;
    if (generate_is_end_token(g->m, id) || is_stop_id(g, id)) {
        g->finish = FINISH_STOP;
        flush_held(g);
        return id;
    }
    if (g->matcher) {
        size_t plen;
        const char *piece = tokenizer_piece(g->m->tok, id, &plen);
        /* The mask allowed it, so this cannot fail but for memory. */
        if (grammar_matcher_accept(g->matcher, piece ? piece : "", piece ? plen : 0)) {
            g->finish = FINISH_ERROR;
            return id;
        }
    }
    size_t n = detok_push(&g->detok, id, g->piece, g->piece_cap);
    const int stopped = stop_feed(&g->stop, g->piece, n, &g->text, &g->text_len);
    if (stopped) {   /* < 0: out of memory holding the text, not a stop string */
        g->finish = stopped < 0 ? FINISH_ERROR : FINISH_STOP;
        return id;
    }
    if (g->matcher && grammar_matcher_must_end(g->matcher)) {
        /* Complete, and nothing may follow: done without waiting for an end token. */
        g->finish = FINISH_STOP;
        flush_held(g);
    } else if (g->n_generated >= g->max_tokens) {
        g->finish = FINISH_LENGTH;
        flush_held(g);
    }
    return id;
}

static int fail(struct gen_result *res, const char *msg) {
    snprintf(res->error, sizeof res->error, "%s", msg);
    res->finish = FINISH_ERROR;
    return -1;
}

int compress_look_ahead(struct model_run *r, struct kv_cache *kv, const float *logits, double *ms) {
    const struct kv_observation *o = kv->obs;
    *ms = 0;
    if (!o || o->ahead <= 0) return 0;
    const double t0 = ebb_now_seconds();
    const int V = model_run_model(r)->cfg.n_vocab, at = kv->n_past;
    float *row = malloc((size_t)V * sizeof(float));
    if (!row) return -1;
    memcpy(row, logits, (size_t)V * sizeof(float));
    kv_cache_hold_window(kv, at);
    int rc = 0;
    for (int i = 0; i < o->ahead && rc == 0; i++) {
        int32_t id = sampler_argmax(row, V);
        rc = model_forward(r, kv, &id, 1, row, 0);
    }
    free(row);
    *ms = (ebb_now_seconds() - t0) * 1e3;
    if (rc) {   /* the hold keeps what a query at `at` reads: going back works */
        kv_cache_truncate(kv, at);
        kv_cache_hold_window(kv, -1);
    }
    return rc;
}

/* The cues before a reconstruction's chunks (KVzip's): the first asks for
 * the context, a later one for the part that starts with the previous
 * chunk's last tokens, which it quotes. */
static const char RECONSTRUCT_FIRST[] = "\n\nRepeat the previous context exactly.";
static const char RECONSTRUCT_LATER[] = "\n\nRepeat the part of the previous context exactly, starting with";
static const char RECONSTRUCT_START[] = "\n";

static int encode_cue(const struct model *m, const char *text, int32_t **ids) {
    return tokenizer_encode(m->tok, text, strlen(text), 0, ids);
}

int compress_reconstruct(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, double *ms) {
    const struct model *m = model_run_model(r);
    *ms = 0;
    if (!kv->obs || !kv->obs->scores) return 0;   /* not asked for: no cues to encode */
    const double t0 = ebb_now_seconds();
    const int at = kv->n_past;
    int32_t *first = NULL, *later = NULL, *start = NULL;
    const int n_first = encode_cue(m, RECONSTRUCT_FIRST, &first), n_later = encode_cue(m, RECONSTRUCT_LATER, &later);
    const int n_start = encode_cue(m, RECONSTRUCT_START, &start);
    const int longest = n_later + COMPRESS_RECONSTRUCT_TAIL, cue = (n_first > longest ? n_first : longest) + n_start;
    const int encoded = n_first >= 0 && n_later >= 0 && n_start >= 0;
    int end = 0, chunk = 0;
    if (!encoded || !compress_reconstruction(kv, cue, &end, &chunk)) end = 0;
    int32_t *pass = end > 0 ? malloc((size_t)(cue + chunk) * sizeof(int32_t)) : NULL;
    int rc = !encoded || (end > 0 && !pass) ? -1 : 0;
    kv_cache_hold_window(kv, at);
    for (int from = 0; rc == 0 && from < end; from += chunk) {
        const int to = end - from < chunk ? end : from + chunk;
        int n = 0;
        if (from == 0) {
            memcpy(pass, first, (size_t)n_first * sizeof(int32_t));
            n = n_first;
        } else {
            memcpy(pass, later, (size_t)n_later * sizeof(int32_t));
            memcpy(pass + n_later, tokens + from - COMPRESS_RECONSTRUCT_TAIL, COMPRESS_RECONSTRUCT_TAIL * sizeof(int32_t));
            n = n_later + COMPRESS_RECONSTRUCT_TAIL;
        }
        memcpy(pass + n, start, (size_t)n_start * sizeof(int32_t));
        n += n_start;
        memcpy(pass + n, tokens + from, (size_t)(to - from) * sizeof(int32_t));
        n += to - from;
        /* The pass attends to what its scoring renormalises over: the
         * sinks, the chunk and itself (a fifth of the stage's time on an
         * 8k prompt, with the same keys found and perplexity). */
        const struct kv_reading among = {from, to, at};
        kv->reading = &among;
        rc = model_forward(r, kv, pass, n, NULL, 0);
        kv->reading = NULL;
        rc = rc || compress_score_reconstruction(kv, &m->cfg, m->be, model_run_pool(r), from, to);
        kv_cache_truncate(kv, at);   /* the hold keeps what a query at `at` reads */
    }
    kv_cache_hold_window(kv, -1);
    free(first);
    free(later);
    free(start);
    free(pass);
    *ms = (ebb_now_seconds() - t0) * 1e3;
    return rc ? -1 : 0;
}

int generate_prefill(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, int n,
                     const struct compress_params *p, float *logits, struct compress_report *report) {
    const struct model *m = model_run_model(r);
    memset(report, 0, sizeof *report);
    int done = 0;
    double ahead_ms, rebuild_ms;
    for (int at; p && p->mode != COMPRESS_OFF && (at = compress_next_point(p, n, done)) > 0; done = at) {
        if (compress_prepare(kv, &m->cfg, p, at) || model_forward(r, kv, tokens + done, at - done, logits, 0) ||
            compress_reconstruct(r, kv, tokens, &rebuild_ms) || compress_look_ahead(r, kv, logits, &ahead_ms) ||
            compress_apply(kv, &m->cfg, m->be, model_run_pool(r), p, report))
            return -1;
        report->ms += ahead_ms + rebuild_ms;
    }
    return done < n ? model_forward(r, kv, tokens + done, n - done, logits, 0) : 0;
}

int generate(struct model_run *r, const int32_t *prompt, int n_prompt, const struct gen_params *p,
             gen_text_fn on_text, void *ud, struct gen_result *res) {
    const struct model *m = model_run_model(r);
    memset(res, 0, sizeof *res);
    res->n_prompt = n_prompt;
    if (n_prompt <= 0) return fail(res, "the prompt is empty");
    int n_ctx = p->n_ctx > 0 ? p->n_ctx : n_prompt + (p->max_tokens > 0 ? p->max_tokens : 0);
    if (n_ctx > m->cfg.n_ctx_train) n_ctx = m->cfg.n_ctx_train;
    if (n_prompt >= n_ctx && p->max_tokens > 0) {
        snprintf(res->error, sizeof res->error, "the prompt has %d tokens; the context holds %d",
                 n_prompt, n_ctx);
        res->finish = FINISH_ERROR;
        return -1;
    }
    const int kv_bits = p->kv_bits ? p->kv_bits : 32;
    struct kv_account kv_policy;    /* the cache's precision; no budget */
    if (kv_account_init(&kv_policy, &m->cfg, kv_bits, 0)) return fail(res, kv_bits_problem(&m->cfg, kv_bits));
    kv_policy.be = m->be;           /* the cache lives where the model computes */
    struct kv_cache kv;
    struct gen_seq g;
    float *logits = malloc((size_t)m->cfg.n_vocab * sizeof(float));
    /* Compression's lookahead may reach past a short answer's context. */
    const int n_cache = compress_context(&p->compress, n_prompt, n_ctx, m->cfg.n_ctx_train);
    if (!logits || kv_cache_init(&kv, &m->cfg, n_cache, &kv_policy)) {
        free(logits);
        kv_account_destroy(&kv_policy);
        return fail(res, "out of memory for the context");
    }
    if (gen_seq_init(&g, m, prompt, n_prompt, p)) {
        kv_cache_free(&kv);
        kv_account_destroy(&kv_policy);
        free(logits);
        return fail(res, "out of memory");
    }
    double t0 = ebb_now_seconds();
    int rc = 0;
    if (g.finish == FINISH_NONE) rc = generate_prefill(r, &kv, prompt, n_prompt, &p->compress, logits, &res->compress);
    double t1 = ebb_now_seconds();
    res->prefill_s = t1 - t0;
    while (rc == 0 && g.finish == FINISH_NONE) {
        int32_t id = gen_seq_step(&g, logits);
        if (g.finish == FINISH_NONE && kv.n_past >= n_ctx) gen_seq_finish(&g, FINISH_LENGTH);
        if (on_text && on_text(ud, id, g.text, g.text_len)) {
            gen_seq_finish(&g, FINISH_CANCELLED);
            break;
        }
        if (g.finish == FINISH_NONE) rc = model_forward(r, &kv, &id, 1, logits, 0);
    }
    res->decode_s = ebb_now_seconds() - t1;
    res->n_generated = g.n_generated;
    res->finish = rc ? FINISH_ERROR : g.finish;
    if (!rc && g.finish == FINISH_ERROR) snprintf(res->error, sizeof res->error, "out of memory for the generated text");
    gen_seq_free(&g);
    kv_cache_free(&kv);
    kv_account_destroy(&kv_policy);
    free(logits);
    if (rc) return fail(res, "model forward failed");
    return 0;
}
