/* Drafts for speculative decoding; see draft.h for the design. */
#include "engine/draft.h"

#include <string.h>

#define COST_WEIGHT 0.2          /* of a new step time in the moving average */
#define STATS_DECAY 0.8          /* of the past acceptance at each verification */
#define PRIOR_CHECKED 2.0        /* a new request's acceptance: 1 of 2, until it has its own */
#define PRIOR_ACCEPTED 1.0
#define EXTRA_TOKEN_GUESS 0.25   /* an unmeasured extra token: a quarter of a token's share of the
                                    largest step measured below (optimistic) */

const char *draft_source_name(enum draft_source s) {
    return s == DRAFT_NGRAM ? "ngram" : "none";
}

int draft_source_parse(const char *name) {
    if (!strcmp(name, "ngram")) return DRAFT_NGRAM;
    if (!strcmp(name, "none")) return DRAFT_NONE;
    return -1;
}

int draft_ngram(const int32_t *hist, int n_hist, int max_draft, int32_t *out) {
    for (int n = DRAFT_NGRAM_MAX; n >= DRAFT_NGRAM_MIN; n--) {
        if (n_hist <= n) continue;
        const int32_t *suffix = hist + n_hist - n;
        /* The most recent occurrence that has at least one token after it
         * (the suffix itself has none). */
        for (int at = n_hist - n - 1; at >= 0; at--) {
            /* The last token first: most positions fail there, without a call. */
            if (hist[at + n - 1] != suffix[n - 1] || memcmp(hist + at, suffix, (size_t)n * sizeof *hist)) continue;
            int k = n_hist - (at + n);
            if (k > max_draft) k = max_draft;
            memcpy(out, hist + at + n, (size_t)k * sizeof *out);
            return k;
        }
    }
    return 0;
}

void draft_costs_record(struct draft_costs *c, int n_tokens, double seconds) {
    if (n_tokens < 1 || n_tokens > MODEL_MAX_BATCH || seconds <= 0) return;
    double *t = &c->seconds[n_tokens];
    *t = *t > 0 ? *t + COST_WEIGHT * (seconds - *t) : seconds;
}

double draft_costs_estimate(const struct draft_costs *c, int n) {
    if (n < 1) n = 1;
    if (n > MODEL_MAX_BATCH) n = MODEL_MAX_BATCH;
    if (c->seconds[n] > 0) return c->seconds[n];
    int lo = n - 1, hi = n + 1;
    while (lo >= 1 && !(c->seconds[lo] > 0)) lo--;
    while (hi <= MODEL_MAX_BATCH && !(c->seconds[hi] > 0)) hi++;
    if (lo >= 1 && hi <= MODEL_MAX_BATCH)   /* between two measured counts */
        return c->seconds[lo] + (c->seconds[hi] - c->seconds[lo]) * (n - lo) / (hi - lo);
    if (lo >= 1) return c->seconds[lo] * (1 + EXTRA_TOKEN_GUESS * (n - lo) / lo);
    if (hi <= MODEL_MAX_BATCH) return c->seconds[hi];   /* fewer tokens cost no more */
    return 0;
}

void draft_stats_record(struct draft_stats *s, int k, int accepted) {
    /* Positions checked: the accepted ones and the first rejected, if any. */
    const int checked = accepted < k ? accepted + 1 : k;
    s->checked = s->checked * STATS_DECAY + checked;
    s->accepted = s->accepted * STATS_DECAY + accepted;
}

double draft_acceptance(const struct draft_stats *s) {
    return (s->accepted + PRIOR_ACCEPTED) / (s->checked + PRIOR_CHECKED);
}

int draft_choose(const struct draft_costs *c, struct draft_stats *s, int others, int available, int room) {
    int max_k = available < room ? available : room;
    if (max_k > DRAFT_MAX) max_k = DRAFT_MAX;
    if (max_k <= 0) return 0;
    const double base = draft_costs_estimate(c, others + 1);
    if (!(base > 0)) return 1;   /* nothing measured yet: one draft starts the curve */
    const double a = draft_acceptance(s);
    double expect = 1, term = 1, best_gain = 0;
    int best = 0;
    for (int k = 1; k <= max_k; k++) {
        term *= a;
        expect += term;
        /* The step's tokens per second, every request's: the drafts slow
         * the others' tokens too, and only this request's gain. */
        const double t = draft_costs_estimate(c, others + 1 + k);
        const double gain = t > 0 ? (others + expect) * base / ((others + 1) * t) : 0;
        if (gain > best_gain) {
            best_gain = gain;
            best = k;
        }
    }
    if (best_gain >= DRAFT_MIN_GAIN) {
        s->steps_since_draft = 0;
        return best;
    }
    if (++s->steps_since_draft >= DRAFT_RETRY_STEPS) {   /* measure the longest again */
        s->steps_since_draft = 0;
        return max_k;
    }
    return 0;
}
