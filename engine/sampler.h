/* Token sampling: turns a row of logits into the next token id.
 *
 * The pipeline is fixed and applied in this order, like llama.cpp's default
 * chain, so that the same seed and settings always give the same tokens:
 *   repetition penalty -> greedy shortcut (temperature <= 0) -> top-k ->
 *   temperature -> softmax -> top-p -> min-p -> draw from a seeded PRNG.
 */
#ifndef EBB_ENGINE_SAMPLER_H
#define EBB_ENGINE_SAMPLER_H
#include <stddef.h>
#include <stdint.h>

struct sampler_params {
    float temperature;     /* <= 0: greedy */
    int top_k;             /* <= 0: off */
    float top_p;           /* >= 1: off */
    float min_p;           /* <= 0: off */
    float repeat_penalty;  /* 1: off */
    int repeat_last_n;     /* window of recent tokens the penalty looks at */
    uint64_t seed;
};
/* Defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, penalty 1.0
 * over the last 64 tokens, seed 0. */
void sampler_params_default(struct sampler_params *p);

struct sampler;
struct sampler *sampler_create(const struct sampler_params *p, int n_vocab);
void sampler_free(struct sampler *s);
/* Samples one id. logits (n_vocab floats) are modified. history holds the
 * ids seen so far (prompt and generated), for the repetition penalty. */
int32_t sampler_sample(struct sampler *s, float *logits, const int32_t *history, int n_history);

/* log softmax(logits)[id] over n logits, untouched by any sampling setting:
 * the model's own log-probability of id (logprobs, perplexity). Computed in
 * double from a max-shifted log-sum-exp, so a 50K vocabulary neither
 * overflows nor loses the small terms. */
double log_softmax_at(const float *logits, int n, int32_t id);

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
