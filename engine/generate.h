/* Text generation for one sequence: prompt in, streamed text out.
 *
 * struct gen_seq is the per-sequence state machine every front end shares:
 * given the logits of the next position it samples a token, decides whether
 * generation is over (end-of-turn token, stop string, max tokens), and
 * releases text that is complete UTF-8 and cannot be part of a stop string.
 * generate() drives one gen_seq with model_forward (the CLI); the scheduler
 * drives many with model_forward_batch (the daemon). Both therefore produce
 * the same tokens and text for the same prompt, seed and settings.
 */
#ifndef EBB_ENGINE_GENERATE_H
#define EBB_ENGINE_GENERATE_H
#include <stddef.h>
#include <stdint.h>
#include "engine/compress.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

struct grammar;
struct grammar_matcher;
struct grammar_vocab;
struct model;
struct model_run;

/* FINISH_EVICTED: the scheduler gave up on a request whose cache no longer
 * fits a memory budget that shrank after it started (retryable, unlike an
 * error). */
enum finish_reason {
    FINISH_NONE = -1, FINISH_STOP = 0, FINISH_LENGTH = 1, FINISH_CANCELLED = 2, FINISH_ERROR = 3, FINISH_EVICTED = 4
};
/* "stop", "length", "cancelled", "error", "evicted", or "none" for
 * FINISH_NONE: the one place these names are spelt (the API, metrics labels
 * and the CLI use them). */
const char *finish_reason_name(enum finish_reason r);

struct gen_params {
    int max_tokens;                 /* generated tokens at most */
    struct sampler_params sampling;
    const char *const *stops;       /* stop strings (borrowed for the call's duration) */
    int n_stops;
    int n_ctx;                      /* KV cache size; 0: prompt + max_tokens, capped by training ctx */
    int kv_bits;                    /* generate()'s KV cache precision: 32 (or 0), 16, 8, 4 */
    int logprobs;                   /* compute the chosen token's log-probability */
    int top_logprobs;               /* and the best N ids' (N <= SAMPLER_MAX_TOP), alternatives included */
    int prompt_logprobs;            /* the scheduler's: also each prompt token's, as the prompt is computed */
    int ignore_eos;                 /* never sample an end token: run to max_tokens (or a stop) */
    int min_tokens;                 /* no end token or stop id before this many tokens */
    const int32_t *stop_ids;        /* ids that end generation as an end token does (their */
    int n_stop_ids;                 /*   text is not released); copied by the scheduler */
    int speculative;                /* enum draft_source (engine/draft.h): the scheduler's drafts; 0 none */
    struct compress_params compress;/* context compression after the prefill (mode 0: off) */
    int cache_prompt;               /* the scheduler's prompt cache (sched_config.prompt_cache_bytes):
                                       start from a finished request's cache that holds the prompt's
                                       first tokens, and leave this one's for the next */
    /* An embedding request (the scheduler's): no token is generated; once
     * the prompt is in, the mean of its tokens' final hidden states,
     * L2-normalized, is written here [n_embd] and the request ends with
     * FINISH_STOP. Borrowed: it must outlive the request's on_done. */
    float *embedding;
    /* Constrained decoding (engine/grammar.h): only tokens the grammar
     * allows are sampled, and generation stops once it allows nothing more.
     * Both borrowed: the grammar from the request, the vocabulary from the
     * model; NULL: unconstrained. */
    const struct grammar *grammar;
    const struct grammar_vocab *grammar_vocab;
};

struct gen_seq {
    const struct model *m;
    struct sampler *sampler;
    struct detok detok;
    struct stop_matcher stop;
    int32_t *history;               /* prompt then generated ids */
    int n_history, cap_history;
    int n_generated, max_tokens;
    int want_logprobs;
    enum finish_reason finish;      /* FINISH_NONE while running */
    char *text;                     /* released by the last step (NUL-terminated) */
    size_t text_len;
    float logprob;                  /* of the last sampled token, if asked */
    int n_top;                      /* its best alternatives, if asked (top_logprobs) */
    int32_t top_id[SAMPLER_MAX_TOP];
    float top_logprob[SAMPLER_MAX_TOP];
    float *raw_logits;              /* copy for logprobs, [n_vocab] */
    const struct gen_params *params;/* the settings (borrowed: the caller keeps them alive) */
    int32_t *end_ids;               /* end tokens, to ban (ignore_eos, min_tokens) */
    int n_end_ids;
    struct grammar_matcher *matcher;/* params->grammar's state, or NULL */
    uint8_t *allowed;               /* [n_vocab]: the grammar's mask for this step */
    double mask_s;                  /* time spent masking (the cost of constrained decoding) */
    char *piece;                    /* detokenizer output buffer */
    size_t piece_cap;
};

/* A sampled token as reported to a front end: its id, the text it released
 * (may be empty: held back), and when logprobs were asked for its own
 * log-probability and its best alternatives' (n_top of them, best first).
 * With prompt_logprobs, each prompt token is reported first the same way
 * (prompt set, no text; the first one's logprob is NaN: nothing predicts it). */
struct gen_token {
    int prompt;                     /* a prompt token (prompt_logprobs), not a generated one */
    int32_t id;
    const char *text;
    size_t len;
    float logprob;
    int n_top;
    const int32_t *top_id;
    const float *top_logprob;
};

/* 0, or -1 when out of memory. The prompt is copied; p is borrowed and must
 * outlive g (its stop strings and stop ids are read at every step). */
int gen_seq_init(struct gen_seq *g, const struct model *m, const int32_t *prompt, int n_prompt,
                 const struct gen_params *p);
/* Samples the next token from logits (modified in place) and advances; the
 * text it releases is in g->text / g->text_len until the next call. Returns
 * the id. Sets g->finish when generation is over (end token, stop string,
 * max_tokens, or a grammar that allows nothing more); a final step flushes
 * held text. Returns -1 with FINISH_ERROR, sampling nothing, when a grammar
 * allows no token at all (or its mask runs out of memory). */
int32_t gen_seq_step(struct gen_seq *g, float *logits);
/* Ends generation early (cancel, context full). Except when cancelled, text
 * still held is appended to g->text, after whatever the last step released:
 * callers emit g->text after calling this. */
void gen_seq_finish(struct gen_seq *g, enum finish_reason why);
void gen_seq_free(struct gen_seq *g);

/* Called with each piece of released text (may be empty when text is held
 * back) and the id that produced it (-1 for a final flush). Return nonzero to
 * cancel. */
typedef int (*gen_text_fn)(void *ud, int32_t id, const char *text, size_t len);

struct gen_result {
    enum finish_reason finish;
    int n_prompt, n_generated;
    double prefill_s, decode_s;     /* wall time of each phase */
    struct compress_report compress;/* what context compression did (applied 0: nothing) */
    char error[256];
};

/* Prompt length that the context cannot hold, or a forward failure: -1 with
 * res->error set. */
int generate(struct model_run *r, const int32_t *prompt, int n_prompt, const struct gen_params *p,
             gen_text_fn on_text, void *ud, struct gen_result *res);

struct kv_cache;
/* Context compression's lookahead (compress_params.lookahead): from a cache
 * at its compression point, whose last row's logits are given, decodes the
 * tokens the recording expects past the point greedily, one pass each, so
 * that their queries are recorded; compress_apply scores with them, then
 * forgets their rows (the cache is as it was at the point). What the model is about to say is a better guide to what it will
 * read than the prompt's own last tokens: dropping 75% of 6k tokens of
 * held-out text, the next 2k scored +7.4% in perplexity with the window
 * alone and +5.0% with 32 tokens of lookahead (docs/benchmarks.md). Greedy,
 * so a request computed again does the same. Its time goes to *ms (the
 * stage's, with compress_apply's). 0, or -1 when a pass fails (the cache is
 * as it was at the point; compress_apply then does nothing). */
int compress_look_ahead(struct model_run *r, struct kv_cache *kv, const float *logits, double *ms);
/* Context compression's reconstruction (selection "reconstruct", KVzip):
 * from a cache at its compression point whose recording asks for one
 * (compress_reconstruction), the prompt tokens[0, end) are written again
 * past the point, a chunk per pass after a cue that asks the model to
 * repeat the context, each pass's queries scored against the chunk's
 * original positions (compress_score_reconstruction) and its rows
 * forgotten. A position that helps the model say the context again
 * matters whatever the question will be: the scores do not depend on
 * what follows the point. Each pass attends only to the sinks, the chunk
 * and itself (kv->reading), as its scoring does: about 0.4 of a
 * prefill of the prompt in all.
 * It comes before the lookahead, which writes where its passes did. Time
 * to *ms. 0, or -1 when a pass fails or memory runs out (the cache is as
 * it was at the point). */
int compress_reconstruct(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, double *ms);
/* Prefills tokens[0, n) into kv (the last row's logits into logits),
 * stopping to compress at each of p's compression points
 * (compress_next_point) when p asks for compression (NULL: none); what
 * the last compression did in *report. 0, or -1 when a pass or the
 * compression fails. generate() and ebb ppl prefill so. */
int generate_prefill(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, int n,
                     const struct compress_params *p, float *logits, struct compress_report *report);

/* Token ids that end a turn for this model (EOS and end-of-turn control
 * tokens such as <|im_end|>). */
int generate_is_end_token(const struct model *m, int32_t id);

double ebb_now_seconds(void);
#endif
