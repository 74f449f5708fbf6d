/* Drafts for speculative decoding (engine/draft.h): the n-gram lookup, the
 * step-cost curve and the choice of draft length. Pure functions; the
 * scheduler's verification is tested on the real model in test_scheduler.c
 * and the rollback in test_kv.c. */
#include <string.h>

#include "check.h"
#include "engine/draft.h"

static void test_ngram(void) {
    int32_t out[DRAFT_MAX];
    /* ... 1 2 3 [4 5 6 7] ... 1 2 3 -> the most recent 3-gram match's continuation */
    const int32_t h[] = {9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3};
    int n = draft_ngram(h, 12, 4, out);
    CHECK(n == 4 && out[0] == 4 && out[1] == 5 && out[2] == 6 && out[3] == 7);
    /* Limited by what follows: the match near the end has two tokens after it. */
    const int32_t h2[] = {5, 6, 7, 8, 6, 7, 5, 6, 7};
    n = draft_ngram(h2, 9, 8, out);
    CHECK(n == 6 && out[0] == 8 && out[5] == 7);   /* 5 6 7 matched at 0: 8 6 7 5 6 7 */
    /* The most recent of two matches wins. */
    const int32_t h3[] = {1, 2, 3, 10, 1, 2, 3, 20, 30, 1, 2, 3};
    n = draft_ngram(h3, 12, 2, out);
    CHECK(n == 2 && out[0] == 20 && out[1] == 30);
    /* No 3-gram match: a 2-gram one; none at all: no draft. */
    const int32_t h4[] = {4, 2, 3, 11, 12, 9, 2, 3};
    n = draft_ngram(h4, 8, 3, out);
    CHECK(n == 3 && out[0] == 11 && out[1] == 12 && out[2] == 9);
    const int32_t h5[] = {1, 2, 3, 4, 5, 6};
    CHECK(draft_ngram(h5, 6, 8, out) == 0);
    CHECK(draft_ngram(h5, 1, 8, out) == 0 && draft_ngram(h5, 0, 8, out) == 0);
    /* A repeated token: 7 7 7 -> 7 (the match at 1 has one after it). */
    const int32_t h6[] = {7, 7, 7, 7};
    n = draft_ngram(h6, 4, 8, out);
    CHECK(n == 1 && out[0] == 7);
}

static void test_costs(void) {
    struct draft_costs c;
    memset(&c, 0, sizeof c);
    CHECK(draft_costs_estimate(&c, 1) == 0);
    draft_costs_record(&c, 1, 0.010);
    draft_costs_record(&c, 5, 0.030);
    CHECK_NEAR(draft_costs_estimate(&c, 1), 0.010, 1e-12);
    CHECK_NEAR(draft_costs_estimate(&c, 3), 0.020, 1e-12);            /* between measured counts */
    CHECK_NEAR(draft_costs_estimate(&c, 7), 0.030 * (1 + 0.25 * 2 / 5), 1e-12);   /* beyond: a guess */
    draft_costs_record(&c, 1, 0.020);                                  /* moving average */
    CHECK(draft_costs_estimate(&c, 1) > 0.010 && draft_costs_estimate(&c, 1) < 0.020);
    draft_costs_record(&c, 0, 1.0);                                    /* ignored */
    draft_costs_record(&c, 3, -1.0);
    CHECK_NEAR(draft_costs_estimate(&c, 3), (draft_costs_estimate(&c, 1) + 0.030) / 2, 1e-12);
    struct draft_costs hi;
    memset(&hi, 0, sizeof hi);
    draft_costs_record(&hi, 4, 0.5);
    CHECK_NEAR(draft_costs_estimate(&hi, 2), 0.5, 1e-12);              /* only larger steps measured */
}

static void test_choose(void) {
    struct draft_costs cheap, dear;
    memset(&cheap, 0, sizeof cheap);
    memset(&dear, 0, sizeof dear);
    for (int n = 1; n <= 16; n++) {
        draft_costs_record(&cheap, n, 0.010 * (1 + 0.05 * (n - 1)));   /* bandwidth-bound: extra tokens nearly free */
        draft_costs_record(&dear, n, 0.010 * n);                         /* compute-bound: linear */
    }
    struct draft_stats good = {0}, bad = {0};
    for (int i = 0; i < 20; i++) {
        draft_stats_record(&good, 8, 8);
        draft_stats_record(&bad, 4, 0);
    }
    CHECK(draft_acceptance(&good) > 0.9 && draft_acceptance(&bad) < 0.2);
    CHECK(draft_choose(&cheap, &good, 0, 8, 8) == 8);                    /* accepted and cheap: all of it */
    CHECK(draft_choose(&cheap, &good, 0, 3, 8) == 3);                    /* only what was found */
    CHECK(draft_choose(&cheap, &good, 0, 8, 2) == 2);                    /* only what fits */
    CHECK(draft_choose(&cheap, &good, 0, 8, 0) == 0);
    /* Linear costs: no draft ever pays; the retry, of a whole draft, comes
     * every DRAFT_RETRY_STEPS. */
    int drafted = 0;
    for (int i = 0; i < 4 * DRAFT_RETRY_STEPS; i++) {
        const int k = draft_choose(&dear, &good, 0, 6, 8);
        CHECK(k == 0 || k == 6);
        drafted += k > 0;
    }
    CHECK(drafted == 4);
    /* Rarely accepted where an extra token costs a fifth of a step: none
     * (where it costs a twentieth, even 1 in 7 pays for one draft). */
    struct draft_costs fifth;
    memset(&fifth, 0, sizeof fifth);
    for (int n = 1; n <= 16; n++) draft_costs_record(&fifth, n, 0.010 * (1 + 0.2 * (n - 1)));
    drafted = 0;
    for (int i = 0; i < 4 * DRAFT_RETRY_STEPS; i++) drafted += draft_choose(&fifth, &bad, 0, 8, 8) > 0;
    CHECK(drafted == 4);
    CHECK(draft_choose(&fifth, &good, 0, 8, 8) == 8);
    CHECK(draft_choose(&cheap, &bad, 0, 8, 8) == 1);
    /* In a step of 16, a draft slows 15 other tokens: at 5% a token, a
     * middling acceptance no longer pays, a high one still does. */
    struct draft_stats half = {0};
    for (int i = 0; i < 20; i++) draft_stats_record(&half, 2, 1);
    CHECK(draft_choose(&cheap, &half, 0, 8, 8) > 0);
    CHECK(draft_choose(&cheap, &half, 15, 8, 8) == 0);
    CHECK(draft_choose(&cheap, &good, 15, 8, 8) > 0);
    /* Nothing measured: one draft, to start the curve. */
    struct draft_costs none;
    memset(&none, 0, sizeof none);
    struct draft_stats fresh = {0};
    CHECK(draft_choose(&none, &fresh, 0, 5, 8) == 1);
    /* Middling acceptance on a curve that bends: a middle length wins. */
    struct draft_costs bend;
    memset(&bend, 0, sizeof bend);
    for (int n = 1; n <= 16; n++) draft_costs_record(&bend, n, n <= 4 ? 0.010 : 0.010 * (n - 3));
    struct draft_stats mid = {0};
    for (int i = 0; i < 20; i++) draft_stats_record(&mid, 4, 3);
    const int k = draft_choose(&bend, &mid, 0, 8, 8);
    CHECK_MSG(k == 3, "chose %d", k);
}

static void test_names(void) {
    CHECK(draft_source_parse("ngram") == DRAFT_NGRAM && draft_source_parse("none") == DRAFT_NONE);
    CHECK(draft_source_parse("eagle") == -1 && draft_source_parse("") == -1);
    CHECK(!strcmp(draft_source_name(DRAFT_NGRAM), "ngram") && !strcmp(draft_source_name(DRAFT_NONE), "none"));
}

int main(void) {
    test_ngram();
    test_costs();
    test_choose();
    test_names();
    return check_report("test_draft");
}
