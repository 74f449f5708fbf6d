/* Token sampling: turns a row of logits into the next token id.
 *
 * The pipeline is fixed and applied in this order, like llama.cpp's default
 * chain, so that the same seed and settings always give the same tokens:
 *   logit bias -> repetition penalty -> presence and frequency penalties ->
 *   greedy shortcut (temperature <= 0) -> top-k -> temperature -> softmax ->
 *   top-p -> min-p -> draw from a seeded PRNG.
 * The presence and frequency penalties count the ids this sampler has
 * returned, so they see exactly the generated tokens (OpenAI's rule; the
 * repetition penalty looks at the prompt too, through the history).
 */
#ifndef EBB_ENGINE_SAMPLER_H
#define EBB_ENGINE_SAMPLER_H
#include <stddef.h>
#include <stdint.h>

/* One entry of a logit bias: added to the logit of id before anything else
 * (OpenAI's logit_bias; -100 bans a token in practice, +100 forces it). */
struct logit_bias {
    int32_t id;
    float bias;
};

struct sampler_params {
    float temperature;     /* <= 0: greedy */
    int top_k;             /* <= 0: off */
    float top_p;           /* >= 1: off */
    float min_p;           /* <= 0: off */
    float repeat_penalty;  /* 1: off */
    int repeat_last_n;     /* window of recent tokens the penalty looks at */
    float presence_penalty;  /* 0: off; subtracted once from each id already returned */
    float frequency_penalty; /* 0: off; subtracted once per time an id was returned */
    const struct logit_bias *bias;  /* n_bias entries, ids in range; copied by sampler_create */
    int n_bias;
    uint64_t seed;
};
/* Defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, penalty 1.0
 * over the last 64 tokens, no presence/frequency penalty, no bias, seed 0. */
void sampler_params_default(struct sampler_params *p);

struct sampler;
struct sampler *sampler_create(const struct sampler_params *p, int n_vocab);
void sampler_free(struct sampler *s);
/* Samples one id. logits (n_vocab floats) are modified. history holds the
 * ids seen so far (prompt and generated), for the repetition penalty. The id
 * returned counts as generated for the presence and frequency penalties. */
int32_t sampler_sample(struct sampler *s, float *logits, const int32_t *history, int n_history);
/* sampler_sample in two halves, for callers that look at the logits in
 * between (a grammar's mask): sampler_adjust applies the bias and the
 * penalties in place; sampler_pick draws from what is left (and counts the
 * id as returned). sampler_sample(s, l, h, n) is adjust then pick. */
void sampler_adjust(struct sampler *s, float *logits, const int32_t *history, int n_history);
int32_t sampler_pick(struct sampler *s, float *logits);
/* Greedy settings (temperature <= 0 or top_k 1): pick is the argmax. */
int sampler_is_greedy(const struct sampler *s);
/* The lowest id among the largest logits (NaNs skipped): greedy's choice. */
int32_t sampler_argmax(const float *logits, int n);

/* log softmax(logits)[id] over n logits, untouched by any sampling setting:
 * the model's own log-probability of id (logprobs, perplexity). Computed in
 * double from a max-shifted log-sum-exp, so a 50K vocabulary neither
 * overflows nor loses the small terms. */
double log_softmax_at(const float *logits, int n, int32_t id);
/* The k (at most SAMPLER_MAX_TOP, at most n) ids with the largest logits,
 * best first (lower id on ties, NaN as -inf), and their log softmax over
 * all n: the alternatives reported as top_logprobs. Returns k. */
#define SAMPLER_MAX_TOP 20
int log_softmax_top(const float *logits, int n, int k, int32_t *ids, float *logprobs);

/* Stop strings: text is held back while it could still be the start of a
 * stop string, so a client never sees part of one. */
struct stop_matcher {
    const char *const *stops; /* borrowed; n strings */
    int n;
    char *held;               /* text not yet released */
    size_t n_held, cap_held;
    int stopped;
};
void stop_init(struct stop_matcher *m, const char *const *stops, int n);
void stop_free(struct stop_matcher *m);
/* Feeds newly decoded text. Appends to *out (malloc'd/realloc'd, NUL-terminated,
 * *out_len updated) what is safe to release; returns 1 once a stop string has
 * matched (the text before it is released, the stop string itself is not),
 * or -1 when out of memory (callers end generation). */
int stop_feed(struct stop_matcher *m, const char *text, size_t len, char **out, size_t *out_len);
/* At the end of generation: releases everything still held. 0, or -1 when
 * out of memory (the held text is then still held, not released). */
int stop_finish(struct stop_matcher *m, char **out, size_t *out_len);
#endif
