/* Tests for engine/sampler.c: the sampling pipeline and the stop matcher.
 *
 * References are computed here independently of the sampler: argmax by a
 * plain loop, probabilities by a double-precision softmax, top-p / min-p sets
 * by a full qsort, and stop-string results by scanning the whole text at
 * once. Statistical checks use fixed seeds, so they are deterministic: the
 * bounds (chi-square at p ~ 1e-5, 5 sigma per bucket) are loose enough that a
 * correct sampler passes for any seed and tight enough that a wrong
 * distribution (e.g. a missing temperature or renormalisation) fails.
 */
#include "engine/sampler.h"
#include "tests/unit/check.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BIG_VOCAB 49152

/* ------------------------------------------------------------ helpers --- */

/* Test-side PRNG (independent of the sampler's). */
static uint64_t lcg_state = 0x12345678u;
static uint32_t lcg_next(void) {
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(lcg_state >> 33);
}
static double lcg_uniform(void) { return lcg_next() / 2147483648.0; }
/* Roughly normal, from 12 uniforms. */
static double lcg_gauss(void) {
    double s = 0;
    for (int i = 0; i < 12; i++) s += lcg_uniform();
    return s - 6.0;
}

static void random_logits(float *l, int n, double scale) {
    for (int i = 0; i < n; i++) l[i] = (float)(lcg_gauss() * scale);
}

static int ref_argmax(const float *l, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (l[i] > l[best]) best = i;
    return best;
}

static void ref_softmax(const double *logits, int n, double t, double *p) {
    double max = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] > max) max = logits[i];
    for (int i = 0; i < n; i++) sum += p[i] = exp((logits[i] - max) / t);
    for (int i = 0; i < n; i++) p[i] /= sum;
}

static struct sampler_params params_plain(float t, uint64_t seed) {
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = t;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = seed;
    return p;
}

/* Draws n_draws ids from fixed logits (a fresh copy each time, since the
 * sampler may modify them) and counts them. */
static void count_draws(const struct sampler_params *p, const float *logits, int n_vocab,
                        int n_draws, long *counts) {
    struct sampler *s = sampler_create(p, n_vocab);
    float *row = malloc((size_t)n_vocab * sizeof(*row));
    CHECK(s && row);
    if (!s || !row) { free(row); sampler_free(s); return; }
    memset(counts, 0, (size_t)n_vocab * sizeof(*counts));
    for (int d = 0; d < n_draws; d++) {
        memcpy(row, logits, (size_t)n_vocab * sizeof(*row));
        int32_t id = sampler_sample(s, row, NULL, 0);
        CHECK_MSG(id >= 0 && id < n_vocab, "id %d out of range", (int)id);
        if (id >= 0 && id < n_vocab) counts[id]++;
    }
    free(row);
    sampler_free(s);
}

/* Compares counts with expected probabilities: ids with p = 0 must never
 * appear, the chi-square must stay under a p ~ 1e-5 bound and each bucket
 * within 5 sigma. */
static void check_distribution(const char *what, const long *counts, const double *p, int n,
                               long n_draws) {
    double chi2 = 0;
    int df = -1;
    for (int i = 0; i < n; i++) {
        double e = p[i] * (double)n_draws;
        if (p[i] == 0) {
            CHECK_MSG(counts[i] == 0, "%s: excluded id %d drawn %ld times", what, i, counts[i]);
            continue;
        }
        df++;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
        double sigma = sqrt(e * (1 - p[i]));
        CHECK_MSG(fabs(counts[i] - e) <= 5 * sigma + 1, "%s: id %d drawn %ld, expected %.1f",
                  what, i, counts[i], e);
    }
    /* Chi-square upper tail ~1e-5: mean df, sd sqrt(2 df); df + 4.5 sd + 10
     * is beyond the 1e-5 quantile for every df used here (1..9). */
    double bound = df + 4.5 * sqrt(2.0 * df) + 10;
    CHECK_MSG(df >= 1 && chi2 < bound, "%s: chi2 %.2f >= %.2f (df %d)", what, chi2, bound, df);
}

/* ------------------------------------------------------- sampler tests --- */

static void test_defaults_and_create(void) {
    struct sampler_params p;
    memset(&p, 0xff, sizeof(p));
    sampler_params_default(&p);
    CHECK_NEAR(p.temperature, 0.8, 1e-7);
    CHECK(p.top_k == 40);
    CHECK_NEAR(p.top_p, 0.95, 1e-7);
    CHECK_NEAR(p.min_p, 0.05, 1e-7);
    CHECK_NEAR(p.repeat_penalty, 1.0, 0);
    CHECK(p.repeat_last_n == 64);
    CHECK(p.seed == 0);

    CHECK(sampler_create(&p, 0) == NULL);
    CHECK(sampler_create(&p, -3) == NULL);
    sampler_free(NULL);
    struct sampler *s = sampler_create(NULL, 4);   /* NULL params: defaults */
    CHECK(s != NULL);
    float l[4] = {0, 0, 9, 0};
    if (s) CHECK(sampler_sample(s, l, NULL, 0) == 2);   /* others are < min_p */
    sampler_free(s);
}

static void test_greedy(void) {
    float *l = malloc(BIG_VOCAB * sizeof(*l)), *copy = malloc(BIG_VOCAB * sizeof(*l));
    struct sampler_params p = params_plain(0.0f, 7);
    p.top_k = 40;
    p.top_p = 0.5f;
    struct sampler *s = sampler_create(&p, BIG_VOCAB);
    p.temperature = -1.0f;
    struct sampler *s_neg = sampler_create(&p, BIG_VOCAB);
    CHECK(l && copy && s && s_neg);
    if (!l || !copy || !s || !s_neg) goto out;
    for (int r = 0; r < 50; r++) {
        random_logits(l, BIG_VOCAB, 3.0);
        int want = ref_argmax(l, BIG_VOCAB);
        memcpy(copy, l, BIG_VOCAB * sizeof(*l));
        CHECK(sampler_sample(s, l, NULL, 0) == want);
        CHECK(sampler_sample(s_neg, l, NULL, 0) == want);
        CHECK(memcmp(copy, l, BIG_VOCAB * sizeof(*l)) == 0);   /* penalty off: untouched */
    }
    /* Ties: the lowest id wins. */
    for (int i = 0; i < BIG_VOCAB; i++) l[i] = -1.0f;
    l[40000] = 5.0f;
    l[123] = 5.0f;
    l[30000] = 5.0f;
    CHECK(sampler_sample(s, l, NULL, 0) == 123);
out:
    sampler_free(s);
    sampler_free(s_neg);
    free(l);
    free(copy);
}

static void test_top_k1_is_greedy(void) {
    float *l = malloc(BIG_VOCAB * sizeof(*l));
    CHECK(l != NULL);
    if (!l) return;
    const float temps[] = {0.05f, 0.7f, 1.0f, 3.0f, 100.0f};
    for (int t = 0; t < 5; t++) {
        struct sampler_params p = params_plain(temps[t], 1000 + t);
        p.top_k = 1;
        p.top_p = 0.9f;
        p.min_p = 0.01f;
        struct sampler *s = sampler_create(&p, BIG_VOCAB);
        CHECK(s != NULL);
        if (!s) continue;
        for (int r = 0; r < 20; r++) {
            random_logits(l, BIG_VOCAB, 1.0);
            int want = ref_argmax(l, BIG_VOCAB);
            CHECK_MSG(sampler_sample(s, l, NULL, 0) == want, "T=%g", temps[t]);
        }
        sampler_free(s);
    }
    free(l);
}

/* Runs n steps with logits generated from a fixed test seed. */
static void run_sequence(const struct sampler_params *p, int n_vocab, int steps, int32_t *ids) {
    struct sampler *s = sampler_create(p, n_vocab);
    float *l = malloc((size_t)n_vocab * sizeof(*l));
    CHECK(s && l);
    lcg_state = 99;
    for (int i = 0; i < steps && s && l; i++) {
        random_logits(l, n_vocab, 0.5);
        ids[i] = sampler_sample(s, l, ids, i);
    }
    free(l);
    sampler_free(s);
}

static void test_seeds(void) {
    enum { STEPS = 2000 };
    static int32_t a[STEPS], b[STEPS], c[STEPS];
    struct sampler_params p = params_plain(1.0f, 1234);
    run_sequence(&p, 50, STEPS, a);
    run_sequence(&p, 50, STEPS, b);
    CHECK(memcmp(a, b, sizeof(a)) == 0);
    p.seed = 1235;
    run_sequence(&p, 50, STEPS, c);
    int differ = 0;
    for (int i = 0; i < STEPS; i++) differ += a[i] != c[i];
    /* ~50 comparable tokens: two independent streams agree ~3% of the time. */
    CHECK_MSG(differ > STEPS * 8 / 10, "seeds 1234 and 1235 differ at only %d of %d", differ,
              STEPS);

    /* Full default pipeline, big vocabulary, with a repetition penalty. */
    enum { BIG_STEPS = 200 };
    static int32_t d[BIG_STEPS], e[BIG_STEPS], f[BIG_STEPS];
    sampler_params_default(&p);
    p.repeat_penalty = 1.1f;
    p.seed = 42;
    p.temperature = 1.5f;
    run_sequence(&p, BIG_VOCAB, BIG_STEPS, d);
    run_sequence(&p, BIG_VOCAB, BIG_STEPS, e);
    CHECK(memcmp(d, e, sizeof(d)) == 0);
    p.seed = 43;
    run_sequence(&p, BIG_VOCAB, BIG_STEPS, f);
    differ = 0;
    for (int i = 0; i < BIG_STEPS; i++) differ += d[i] != f[i];
    CHECK_MSG(differ > BIG_STEPS / 2, "big vocab: seeds differ at only %d", differ);
}

static void test_frequencies(void) {
    enum { N = 200000 };
    long counts[10];
    double p[10], lg[10];

    /* Plain softmax(l / T). */
    const float l6[6] = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, -3.0f};
    for (int i = 0; i < 6; i++) lg[i] = l6[i];
    ref_softmax(lg, 6, 0.7, p);
    struct sampler_params sp = params_plain(0.7f, 5);
    count_draws(&sp, l6, 6, N, counts);
    check_distribution("softmax T=0.7", counts, p, 6, N);

    /* Same logits at T=2: the flatter distribution must be followed too (a
     * sampler ignoring temperature fails one of these two). */
    ref_softmax(lg, 6, 2.0, p);
    sp = params_plain(2.0f, 6);
    count_draws(&sp, l6, 6, N, counts);
    check_distribution("softmax T=2", counts, p, 6, N);

    /* top-k = 3 of 10 at T = 1.5: renormalised over the best three. */
    const float l10[10] = {0.1f, 1.2f, -0.4f, 0.9f, 0.3f, 1.0f, -2.0f, 0.0f, 0.5f, -1.0f};
    sp = params_plain(1.5f, 7);
    sp.top_k = 3;
    double top3[3] = {1.2, 1.0, 0.9}, p3[3];
    ref_softmax(top3, 3, 1.5, p3);
    for (int i = 0; i < 10; i++) p[i] = 0;
    p[1] = p3[0];
    p[5] = p3[1];
    p[3] = p3[2];
    count_draws(&sp, l10, 10, N, counts);
    check_distribution("top-k 3", counts, p, 10, N);

    /* top-p over probabilities 0.4 0.3 0.15 0.1 0.05 (ids shuffled):
     * top_p 0.8 keeps the first three (0.85), renormalised. */
    const double probs[5] = {0.4, 0.3, 0.15, 0.1, 0.05};
    const int where[5] = {3, 0, 4, 1, 2};
    float l5[5];
    for (int i = 0; i < 5; i++) l5[where[i]] = (float)log(probs[i]);
    sp = params_plain(1.0f, 8);
    sp.top_p = 0.8f;
    for (int i = 0; i < 5; i++) p[where[i]] = i < 3 ? probs[i] / 0.85 : 0;
    count_draws(&sp, l5, 5, N, counts);
    check_distribution("top-p 0.8", counts, p, 5, N);

    /* min-p 0.3 on the same: threshold 0.12 keeps 0.4 0.3 0.15. */
    sp = params_plain(1.0f, 9);
    sp.min_p = 0.3f;
    count_draws(&sp, l5, 5, N, counts);
    check_distribution("min-p 0.3", counts, p, 5, N);
}

/* Reference top-p / min-p set over a big vocabulary via a full sort. */
static const double *sort_probs;
static int cmp_desc(const void *a, const void *b) {
    double x = sort_probs[*(const int *)a], y = sort_probs[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : *(const int *)a - *(const int *)b;
}

/* Marks allowed[i] for the ids the pipeline may return and returns how many.
 * The thresholds are loosened by 1e-6 (top-p) and 1e-5 relative (min-p): the
 * sampler works in float, and a token sitting exactly on a threshold may
 * fall either way; anything clearly outside stays excluded. */
static int ref_allowed(const float *l, int n, int top_k, float top_p, float min_p,
                       char *allowed) {
    double *lg = malloc(n * sizeof(*lg)), *pr = malloc(n * sizeof(*pr));
    int *order = malloc(n * sizeof(*order));
    for (int i = 0; i < n; i++) lg[i] = l[i], order[i] = i;
    sort_probs = lg;
    qsort(order, n, sizeof(*order), cmp_desc);
    int m = top_k > 0 && top_k < n ? top_k : n;
    double *sub = malloc(m * sizeof(*sub));
    for (int i = 0; i < m; i++) sub[i] = lg[order[i]];
    ref_softmax(sub, m, 1.0, pr);
    int keep = m;
    double cum = 0;
    for (int i = 0; i < m && top_p < 1; i++) {
        cum += pr[i];
        if (cum >= (double)top_p + 1e-6) { keep = i + 1; break; }
    }
    int keep_min = 0;
    for (int i = 0; i < m; i++)
        if (pr[i] >= (double)min_p * pr[0] * (1 - 1e-5)) keep_min = i + 1;
    if (keep_min < keep) keep = keep_min;
    memset(allowed, 0, n);
    for (int i = 0; i < keep; i++) allowed[order[i]] = 1;
    free(lg), free(pr), free(order), free(sub);
    return keep;
}

static void check_allowed_only(const char *what, int top_k, float top_p, float min_p,
                               double scale, int rows, int draws) {
    float *l = malloc(BIG_VOCAB * sizeof(*l)), *row = malloc(BIG_VOCAB * sizeof(*l));
    char *allowed = malloc(BIG_VOCAB);
    char *seen = malloc(BIG_VOCAB);
    struct sampler_params p = params_plain(1.0f, 77);
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    struct sampler *s = sampler_create(&p, BIG_VOCAB);
    CHECK(l && row && allowed && seen && s);
    for (int r = 0; r < rows && s; r++) {
        random_logits(l, BIG_VOCAB, scale);
        int keep = ref_allowed(l, BIG_VOCAB, top_k, top_p, min_p, allowed);
        int bad = 0, distinct = 0;
        memset(seen, 0, BIG_VOCAB);
        for (int d = 0; d < draws; d++) {
            memcpy(row, l, BIG_VOCAB * sizeof(*l));
            int32_t id = sampler_sample(s, row, NULL, 0);
            if (id < 0 || id >= BIG_VOCAB || !allowed[id]) bad++;
            else if (!seen[id]) seen[id] = 1, distinct++;
        }
        CHECK_MSG(bad == 0, "%s: %d of %d draws outside the %d allowed ids", what, bad, draws,
                  keep);
        /* The set is really used, not collapsed to a few ids. */
        int expect = keep < draws / 4 ? keep : draws / 4;
        CHECK_MSG(distinct >= expect / 2, "%s: only %d distinct of %d allowed", what, distinct,
                  keep);
        if (r == 0) printf("%s: %d allowed, %d distinct drawn\n", what, keep, distinct);
    }
    sampler_free(s);
    free(l), free(row), free(allowed), free(seen);
}

static void test_top_p_min_p_exclusion(void) {
    /* Small case: top-p 0.65 over 0.4 0.3 0.15 0.1 0.05 keeps exactly two. */
    float l5[5];
    const double probs[5] = {0.4, 0.3, 0.15, 0.1, 0.05};
    for (int i = 0; i < 5; i++) l5[4 - i] = (float)log(probs[i]);   /* best has highest id */
    long counts[5];
    struct sampler_params p = params_plain(1.0f, 3);
    p.top_p = 0.65f;
    count_draws(&p, l5, 5, 20000, counts);
    CHECK(counts[4] > 0 && counts[3] > 0);
    CHECK(counts[0] == 0 && counts[1] == 0 && counts[2] == 0);
    /* A tiny top_p still keeps one: always the best. */
    p.top_p = 1e-6f;
    count_draws(&p, l5, 5, 2000, counts);
    CHECK(counts[4] == 2000);
    /* min-p 0.2: threshold 0.08 keeps 0.4 0.3 0.15 0.1, drops 0.05 only. */
    p = params_plain(1.0f, 4);
    p.min_p = 0.2f;
    count_draws(&p, l5, 5, 20000, counts);
    CHECK(counts[0] == 0);
    CHECK(counts[1] > 0 && counts[2] > 0 && counts[3] > 0 && counts[4] > 0);
    /* top-p 0.93 (keeps 4: 0.95) with min-p 0.3 (threshold 0.12, keeps 3):
     * the shorter wins, 3. */
    p = params_plain(1.0f, 5);
    p.top_p = 0.93f;
    p.min_p = 0.3f;
    count_draws(&p, l5, 5, 20000, counts);
    CHECK(counts[0] == 0 && counts[1] == 0);
    CHECK(counts[2] > 0 && counts[3] > 0 && counts[4] > 0);

    /* Big vocabulary against a full-sort reference. Scale 1.5 puts thousands
     * of ids in the top-p set, scale 4 a few dozen. */
    check_allowed_only("top-p 0.9 wide", 0, 0.9f, 0.0f, 1.5, 2, 1000);
    check_allowed_only("top-p 0.9 sharp", 0, 0.9f, 0.0f, 4.0, 2, 1000);
    check_allowed_only("min-p 0.1", 0, 1.0f, 0.1f, 3.0, 2, 1000);
    check_allowed_only("top-p 0.7 + min-p 0.01", 0, 0.7f, 0.01f, 2.5, 2, 1000);
    check_allowed_only("top-k 40 + top-p 0.95 + min-p 0.05", 40, 0.95f, 0.05f, 2.0, 2, 1000);
    check_allowed_only("top-k 1000 + top-p 0.5", 1000, 0.5f, 0.0f, 1.0, 2, 1000);
}

static void test_repeat_penalty(void) {
    struct sampler_params p = params_plain(0.0f, 0);
    p.repeat_penalty = 1.3f;
    p.repeat_last_n = 4;
    struct sampler *s = sampler_create(&p, 6);
    CHECK(s != NULL);
    if (!s) return;

    /* Positive logit divided: 2.0 / 1.3 = 1.54 < 1.9, argmax moves to 1. */
    float a[6] = {2.0f, 1.9f, 0.5f, -1.0f, -1.1f, 0.0f};
    const int32_t h1[] = {0};
    CHECK(sampler_sample(s, a, h1, 1) == 1);
    CHECK_NEAR(a[0], 2.0 / 1.3, 1e-6);
    CHECK_NEAR(a[1], 1.9f, 0);

    /* Negative logit multiplied: -1.0 * 1.3 = -1.3 < -1.1 (others lower). */
    float b[6] = {-1.0f, -5.0f, -5.0f, -5.0f, -1.1f, -5.0f};
    CHECK(sampler_sample(s, b, h1, 1) == 4);
    CHECK_NEAR(b[0], -1.3, 1e-6);

    /* Outside the window (last 4 of 6): no penalty, argmax stays 0. */
    float c[6] = {2.0f, 1.9f, 0.5f, -1.0f, -1.1f, 0.0f};
    const int32_t h2[] = {0, 0, 5, 5, 2, 3};
    CHECK(sampler_sample(s, c, h2, 6) == 0);
    CHECK_NEAR(c[0], 2.0, 0);
    CHECK_NEAR(c[2], 0.5 / 1.3, 1e-6);
    CHECK_NEAR(c[5], 0.0, 0);

    /* Repeated ids are penalised once: 2.0 / 1.3 = 1.54 > 1.5 stays argmax
     * (three times would give 0.91). Out-of-range ids are ignored. */
    float d[6] = {2.0f, 1.5f, 0, 0, 0, 0};
    const int32_t h3[] = {0, -1, 0, 99};
    CHECK(sampler_sample(s, d, h3, 4) == 0);
    CHECK_NEAR(d[0], 2.0 / 1.3, 1e-6);
    sampler_free(s);

    /* Penalty 1: logits untouched. repeat_last_n < 0: whole history. */
    p.repeat_penalty = 1.0f;
    s = sampler_create(&p, 6);
    float e[6] = {2.0f, 1.9f, 0, 0, 0, 0};
    if (s) CHECK(sampler_sample(s, e, h1, 1) == 0);
    CHECK_NEAR(e[0], 2.0, 0);
    sampler_free(s);
    p.repeat_penalty = 1.3f;
    p.repeat_last_n = -1;
    s = sampler_create(&p, 6);
    float f[6] = {2.0f, 1.9f, 0, 0, 0, 0};
    const int32_t h4[] = {0, 3, 3, 3, 3, 3, 3, 3, 3};
    if (s) CHECK(sampler_sample(s, f, h4, 9) == 1);
    sampler_free(s);

    /* The stamp array is reused across calls without leaking penalties:
     * many calls in a row, each sees only its own history. */
    p.repeat_last_n = 64;
    s = sampler_create(&p, 6);
    for (int i = 0; i < 1000 && s; i++) {
        float g[6] = {2.0f, 1.9f, 0, 0, 0, 0};
        const int32_t hp[] = {(int32_t)(i % 2 ? 0 : 4)};
        CHECK(sampler_sample(s, g, hp, 1) == (i % 2 ? 1 : 0));
    }
    sampler_free(s);
}

/* Presence and frequency penalties, and the logit bias, against a
 * reference that keeps its own counts of the ids returned: greedy over
 * random rows, each step's argmax of (row + bias - fp * count - pp * seen). */
static void test_presence_frequency_bias(void) {
    enum { V = 300, STEPS = 200 };
    const struct logit_bias bias[] = {{5, 2.5f}, {17, -100.0f}, {299, 1.0f}};
    struct sampler_params p = params_plain(0.0f, 0);
    p.presence_penalty = 0.7f;
    p.frequency_penalty = 0.3f;
    p.bias = bias;
    p.n_bias = 3;
    struct sampler *s = sampler_create(&p, V);
    CHECK(s != NULL);
    if (!s) return;
    int count[V] = {0};
    float row[V], ref[V];
    for (int step = 0; step < STEPS; step++) {
        random_logits(row, V, 1.0);
        for (int i = 0; i < V; i++) ref[i] = row[i];
        for (size_t b = 0; b < sizeof bias / sizeof bias[0]; b++) ref[bias[b].id] += bias[b].bias;
        for (int i = 0; i < V; i++) ref[i] -= p.frequency_penalty * (float)count[i] + (count[i] ? p.presence_penalty : 0.0f);
        const int want = ref_argmax(ref, V);
        const int32_t got = sampler_sample(s, row, NULL, 0);
        CHECK_MSG(got == want, "step %d: got %d, want %d", step, (int)got, want);
        CHECK(got != 17);
        count[want]++;
    }
    sampler_free(s);

    /* The bias is the sampler's own copy: changing the caller's array after
     * sampler_create changes nothing. Negative penalties encourage repeats. */
    struct logit_bias mine[1] = {{3, 50.0f}};
    p = params_plain(0.0f, 0);
    p.bias = mine;
    p.n_bias = 1;
    p.frequency_penalty = -1.0f;
    s = sampler_create(&p, 8);
    mine[0].id = 4;
    float a[8] = {0};
    if (s) CHECK(sampler_sample(s, a, NULL, 0) == 3);
    float b[8] = {0, 0, 0, -50.5f, 0, 0, 0, 0};   /* 3's +50 bias and +1 for its repeat win again */
    if (s) CHECK(sampler_sample(s, b, NULL, 0) == 3);
    sampler_free(s);

    /* Sampled (not greedy) draws are counted too: with a huge presence
     * penalty, no id is drawn twice while unseen ones remain. */
    p = params_plain(1.0f, 42);
    p.presence_penalty = 2.0f;
    p.frequency_penalty = 2.0f;   /* together: 4 per repeat, enough to matter on flat rows */
    s = sampler_create(&p, 4);
    int seen[4] = {0}, repeats = 0;
    for (int i = 0; s && i < 4; i++) {
        float flat[4] = {0, 0, 0, 0};
        int32_t id = sampler_sample(s, flat, NULL, 0);
        repeats += seen[id]++ > 0;
    }
    CHECK(repeats <= 1);   /* exp(-4) odds per draw of a repeat; seed 42 draws none or one */
    sampler_free(s);
}

/* top_logprobs: the k best ids of a reference sort (value desc, id asc) and
 * their log softmax from a double-precision reference. */
static void test_log_softmax_top(void) {
    enum { V = 1000 };
    float row[V];
    random_logits(row, V, 2.0);
    row[10] = row[11] = 9.0f;   /* a tie: lower id first */
    double ref[V], maxv = -INFINITY, sum = 0;
    for (int i = 0; i < V; i++) if (row[i] > maxv) maxv = row[i];
    for (int i = 0; i < V; i++) sum += exp(row[i] - maxv);
    for (int i = 0; i < V; i++) ref[i] = row[i] - maxv - log(sum);
    int32_t ids[SAMPLER_MAX_TOP];
    float lps[SAMPLER_MAX_TOP];
    CHECK(log_softmax_top(row, V, 25, ids, lps) == SAMPLER_MAX_TOP);   /* capped at 20 */
    CHECK(ids[0] == 10 && ids[1] == 11);
    int used[V] = {0};
    for (int k = 0; k < SAMPLER_MAX_TOP; k++) {
        /* the k-th best by the reference order, among ids not yet taken */
        int best = -1;
        for (int i = 0; i < V; i++)
            if (!used[i] && (best < 0 || row[i] > row[best])) best = i;
        used[best] = 1;
        CHECK_MSG(ids[k] == best, "rank %d: got %d, want %d", k, (int)ids[k], best);
        CHECK_NEAR(lps[k], ref[best], 1e-5);
    }
    CHECK(log_softmax_top(row, 3, 5, ids, lps) == 3);
    CHECK(log_softmax_top(row, V, 0, ids, lps) == 0);
}

static void test_non_finite(void) {
    struct sampler_params p = params_plain(1.0f, 11);
    struct sampler *s = sampler_create(&p, 8);
    CHECK(s != NULL);
    if (!s) return;
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = NAN;
    a[5] = 0.0f;
    CHECK(sampler_sample(s, a, NULL, 0) == 5);
    for (int i = 0; i < 8; i++) a[i] = -INFINITY;
    int32_t id = sampler_sample(s, a, NULL, 0);
    CHECK(id >= 0 && id < 8);
    for (int i = 0; i < 8; i++) a[i] = 1.0f;
    a[6] = INFINITY;
    CHECK(sampler_sample(s, a, NULL, 0) == 6);
    sampler_free(s);

    /* Three +inf with top-k 2: ties go to the lower ids, 1 and 3, never 5. */
    p.top_k = 2;
    s = sampler_create(&p, 8);
    int hits[8] = {0};
    for (int d = 0; d < 400 && s; d++) {
        for (int i = 0; i < 8; i++) a[i] = i % 2 ? INFINITY : 0.0f;
        id = sampler_sample(s, a, NULL, 0);
        if (id >= 0 && id < 8) hits[id]++;
    }
    CHECK(hits[1] > 100 && hits[3] > 100 && hits[1] + hits[3] == 400);
    sampler_free(s);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Not a pass/fail test: prints the cost per call on the real vocabulary. */
static void bench(const char *what, const struct sampler_params *p) {
    enum { CALLS = 200 };
    float *l = malloc(BIG_VOCAB * sizeof(*l)), *row = malloc(BIG_VOCAB * sizeof(*l));
    struct sampler *s = sampler_create(p, BIG_VOCAB);
    if (!l || !row || !s) { CHECK(0); goto out; }
    random_logits(l, BIG_VOCAB, 3.0);
    double t0 = now_s();
    for (int i = 0; i < CALLS; i++) {
        memcpy(row, l, BIG_VOCAB * sizeof(*l));
        (void)sampler_sample(s, row, NULL, 0);
    }
    printf("bench %-36s %8.1f us/call\n", what, (now_s() - t0) / CALLS * 1e6);
out:
    free(l), free(row);
    sampler_free(s);
}

static void run_benches(void) {
    struct sampler_params p;
    sampler_params_default(&p);
    bench("defaults (k40 p0.95 min-p0.05)", &p);
    p.top_k = 0;
    p.min_p = 0;
    bench("top-p 0.95 only, no top-k", &p);
    p.top_p = 1.0f;
    bench("no filters", &p);
}

/* --------------------------------------------------- stop matcher tests --- */

struct run {
    char *out;        /* everything released */
    size_t len;
    int stopped;
    int stop_step;    /* feed index at which stop_feed returned 1, -1 if none */
    int bad_utf8;     /* set if a partial release ended inside a character */
};

/* A released prefix must not end inside a UTF-8 character. */
static int ends_mid_char(const char *s, size_t n) {
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        unsigned char b = (unsigned char)s[n - back];
        if ((b & 0xC0) == 0x80) continue;
        size_t need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
        return need > back;
    }
    return 0;
}

/* Feeds pieces in order (then finishes) and collects the output. */
static struct run feed_all(const char *const *stops, int n_stops, const char *const *pieces,
                           int n_pieces) {
    struct run r = {NULL, 0, 0, -1, 0};
    struct stop_matcher m;
    stop_init(&m, stops, n_stops);
    for (int i = 0; i < n_pieces; i++) {
        int rc = stop_feed(&m, pieces[i], strlen(pieces[i]), &r.out, &r.len);
        CHECK(rc == 0 || rc == 1);
        CHECK(r.out != NULL && strlen(r.out) == r.len);
        if (ends_mid_char(r.out, r.len)) r.bad_utf8 = 1;
        if (rc == 1 && r.stop_step < 0) r.stop_step = i;
        r.stopped = rc == 1;
    }
    stop_finish(&m, &r.out, &r.len);
    CHECK(m.n_held == 0);
    stop_free(&m);
    return r;
}

#define FEED(stops, ...)                                                                  \
    feed_all(stops, (int)(sizeof(stops) / sizeof(*stops)), (const char *const[]){__VA_ARGS__}, \
             (int)(sizeof((const char *const[]){__VA_ARGS__}) / sizeof(const char *)))

static void expect_run(const char *what, struct run r, const char *out, int stopped) {
    CHECK_MSG(r.out && strcmp(r.out, out) == 0, "%s: out '%s', want '%s'", what,
              r.out ? r.out : "(null)", out);
    CHECK_MSG(r.stopped == stopped, "%s: stopped %d, want %d", what, r.stopped, stopped);
    CHECK_MSG(!r.bad_utf8, "%s: a release split a character", what);
    free(r.out);
}

static void test_stop_basic(void) {
    static const char *const eos[] = {"</s>"};
    /* Across three feeds; the "<" is held until it is known to be a stop. */
    {
        struct stop_matcher m;
        char *out = NULL;
        size_t len = 0;
        stop_init(&m, eos, 1);
        CHECK(stop_feed(&m, "hello <", 7, &out, &len) == 0);
        CHECK(out && strcmp(out, "hello ") == 0);
        CHECK(stop_feed(&m, "/", 1, &out, &len) == 0);
        CHECK(out && strcmp(out, "hello ") == 0);
        CHECK(stop_feed(&m, "s> world", 8, &out, &len) == 1);
        CHECK(out && strcmp(out, "hello ") == 0 && len == 6);
        /* After a stop: nothing more comes out. */
        CHECK(stop_feed(&m, "more", 4, &out, &len) == 1);
        stop_finish(&m, &out, &len);
        CHECK(out && strcmp(out, "hello ") == 0);
        stop_free(&m);
        free(out);
    }
    /* A held prefix that turns out not to be a stop is released. */
    expect_run("false prefix", FEED(eos, "a </", "b>"), "a </b>", 0);
    /* A prefix held at the end comes out on finish. */
    {
        struct stop_matcher m;
        char *out = NULL;
        size_t len = 0;
        stop_init(&m, eos, 1);
        CHECK(stop_feed(&m, "x </s", 5, &out, &len) == 0);
        CHECK(out && strcmp(out, "x ") == 0);
        stop_finish(&m, &out, &len);
        CHECK(out && strcmp(out, "x </s") == 0 && len == 5);
        stop_free(&m);
        free(out);
    }
    expect_run("stop at start", FEED(eos, "</s>tail"), "", 1);
    expect_run("stop at start, split", FEED(eos, "</", "s", ">", "tail"), "", 1);
    static const char *const none[] = {"xyz"};
    expect_run("no stop", FEED(none, "hello ", "world"), "hello world", 0);
    expect_run("no stop strings", feed_all(NULL, 0, (const char *const[]){"abc"}, 1), "abc", 0);
    static const char *const empties[] = {"", NULL, "q"};
    expect_run("empty stops ignored", FEED(empties, "ab", "c"), "abc", 0);
    expect_run("empty stops, real one", FEED(empties, "abqc"), "ab", 1);
}

static void test_stop_overlaps(void) {
    static const char *const s[] = {"abc", "b"};
    expect_run("ab with abc,b", FEED(s, "ab"), "a", 1);
    expect_run("a|b with abc,b", FEED(s, "a", "b"), "a", 1);
    expect_run("a|c with abc,b", FEED(s, "a", "c"), "ac", 0);
    /* "a" alone is held (could become "abc"), then released on finish. */
    {
        struct stop_matcher m;
        char *out = NULL;
        size_t len = 0;
        stop_init(&m, s, 2);
        CHECK(stop_feed(&m, "xa", 2, &out, &len) == 0);
        CHECK(out && strcmp(out, "x") == 0);
        stop_finish(&m, &out, &len);
        CHECK(out && strcmp(out, "xa") == 0);
        stop_free(&m);
        free(out);
    }
    /* The stop that completes first wins, whatever the chunking: "bc"
     * completes before "abcd" does. */
    static const char *const t[] = {"abcd", "bc"};
    expect_run("abcd one chunk", FEED(t, "xabcdy"), "xa", 1);
    expect_run("abcd per byte", FEED(t, "x", "a", "b", "c", "d", "y"), "xa", 1);
    /* Same end: the longer one (earlier start) wins. */
    static const char *const u[] = {"c", "abc"};
    expect_run("same end", FEED(u, "zab", "cz"), "z", 1);
    /* A stop that is a repeat of a held prefix: "aab" with "ab". */
    static const char *const v[] = {"ab"};
    expect_run("aab", FEED(v, "a", "a", "b"), "a", 1);
}

static void test_stop_utf8(void) {
    /* A two-byte character split across feeds is never released half. */
    static const char *const none[] = {"zzz"};
    {
        struct stop_matcher m;
        char *out = NULL;
        size_t len = 0;
        stop_init(&m, none, 1);
        CHECK(stop_feed(&m, "caf\xc3", 4, &out, &len) == 0);
        CHECK(out && strcmp(out, "caf") == 0);
        CHECK(stop_feed(&m, "\xa9!", 2, &out, &len) == 0);
        CHECK(out && strcmp(out, "caf\xc3\xa9!") == 0);
        /* Four-byte emoji, one byte per feed. */
        const char *emoji = "\xf0\x9f\x98\x80";
        for (int i = 0; i < 3; i++) {
            CHECK(stop_feed(&m, emoji + i, 1, &out, &len) == 0);
            CHECK(len == 6);
        }
        CHECK(stop_feed(&m, emoji + 3, 1, &out, &len) == 0);
        CHECK(len == 10 && memcmp(out + 6, emoji, 4) == 0);
        stop_free(&m);
        free(out);
    }
    /* Multi-byte stop string: its first character is held as a prefix. */
    static const char *const zh[] = {"\xe7\xbb\x88\xe6\xad\xa2"};   /* 终止 */
    expect_run("zh stop", FEED(zh, "ok \xe7\xbb\x88", "\xe6\xad\xa2 more"), "ok ", 1);
    expect_run("zh no stop", FEED(zh, "ok \xe7\xbb\x88", "\xe4\xba\x86"),
               "ok \xe7\xbb\x88\xe4\xba\x86", 0);
    /* Stop "é" (c3 a9) must not fire on "è" (c3 a8). */
    static const char *const e_acute[] = {"\xc3\xa9"};
    expect_run("similar char", FEED(e_acute, "\xc3", "\xa8", "x\xc3", "\xa9y"), "\xc3\xa8x", 1);
    /* Stop string shares a lead byte with the text; release waits for the
     * byte after it but never splits the character. */
    expect_run("shared lead byte", FEED(e_acute, "a\xc3", "\xa8\xc3\xa9"), "a\xc3\xa8", 1);
}

/* Reference: on the whole text, the stop occurrence that ends first (longest
 * at equal ends); output is the text before it. */
static size_t ref_stop(const char *text, size_t n, const char *const *stops, int n_stops,
                       int *stopped) {
    for (size_t end = 1; end <= n; end++) {
        size_t best = 0;
        for (int i = 0; i < n_stops; i++) {
            size_t l = strlen(stops[i]);
            if (l && l <= end && l > best && memcmp(text + end - l, stops[i], l) == 0) best = l;
        }
        if (best) {
            *stopped = 1;
            return end - best;
        }
    }
    *stopped = 0;
    return n;
}

/* Random texts over a tiny alphabet (with a 2-byte character), random stop
 * sets and random cuts into feeds: the stream must always equal the
 * whole-text reference. */
static void test_stop_random(void) {
    static const char *const alphabet[] = {"a", "b", "c", "\xc3\xa9"};
    char text[64], stop_buf[3][8];
    const char *stops[3];
    char pieces_buf[64][64];
    const char *pieces[64];
    int failures = 0;
    lcg_state = 2024;
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = 0;
        int n_chars = 1 + (int)(lcg_next() % 20);
        for (int i = 0; i < n_chars; i++) {
            const char *a = alphabet[lcg_next() % 4];
            memcpy(text + n, a, strlen(a));
            n += strlen(a);
        }
        text[n] = '\0';
        int n_stops = (int)(lcg_next() % 4);
        for (int k = 0; k < n_stops; k++) {
            size_t sl = 0;
            int chars = (int)(lcg_next() % 3);   /* 0: an empty stop string */
            for (int i = 0; i < chars; i++) {
                const char *a = alphabet[lcg_next() % 4];
                memcpy(stop_buf[k] + sl, a, strlen(a));
                sl += strlen(a);
            }
            stop_buf[k][sl] = '\0';
            stops[k] = stop_buf[k];
        }
        /* Cut at random byte offsets (may split the 2-byte character). */
        int n_pieces = 0;
        for (size_t at = 0; at < n;) {
            size_t take = 1 + lcg_next() % 4;
            if (take > n - at) take = n - at;
            memcpy(pieces_buf[n_pieces], text + at, take);
            pieces_buf[n_pieces][take] = '\0';
            pieces[n_pieces] = pieces_buf[n_pieces];
            n_pieces++;
            at += take;
        }
        int want_stopped;
        size_t want = ref_stop(text, n, stops, n_stops, &want_stopped);
        struct run r = feed_all(stops, n_stops, pieces, n_pieces);
        int ok = r.out && r.len == want && memcmp(r.out, text, want) == 0 &&
                 r.stopped == want_stopped && !r.bad_utf8;
        if (!ok && failures++ < 5)
            fprintf(stderr, "random stop case %d: text '%s' got '%s' (stopped %d) want %zu bytes "
                    "(stopped %d)\n", iter, text, r.out ? r.out : "", r.stopped, want,
                    want_stopped);
        free(r.out);
    }
    CHECK_MSG(failures == 0, "%d random stop cases failed", failures);
}

/* log_softmax_at: exact on small cases, no overflow on large logits, and the
 * sum of a large vocabulary's tiny terms is not lost. */
static void test_log_softmax(void) {
    const float two[2] = {0.0f, logf(3.0f)};
    CHECK_NEAR(log_softmax_at(two, 2, 0), log(0.25), 1e-7);
    CHECK_NEAR(log_softmax_at(two, 2, 1), log(0.75), 1e-7);
    const float big[3] = {1000.0f, 1000.0f, -1000.0f};
    CHECK_NEAR(log_softmax_at(big, 3, 0), log(0.5), 1e-12);
    CHECK(log_softmax_at(big, 3, 2) < -1999.0 && isfinite(log_softmax_at(big, 3, 2)));
    enum { N = 50000 };
    static float flat[N];
    for (int i = 0; i < N; i++) flat[i] = -3.0f;
    CHECK_NEAR(log_softmax_at(flat, N, 123), -log((double)N), 1e-9);
}

int main(void) {
    test_log_softmax();
    test_defaults_and_create();
    test_greedy();
    test_top_k1_is_greedy();
    test_seeds();
    test_frequencies();
    test_top_p_min_p_exclusion();
    test_repeat_penalty();
    test_presence_frequency_bias();
    test_log_softmax_top();
    test_non_finite();
    test_stop_basic();
    test_stop_overlaps();
    test_stop_utf8();
    test_stop_random();
    run_benches();
    return check_report("test_sampler");
}
