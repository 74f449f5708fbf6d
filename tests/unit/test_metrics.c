/* The Prometheus registry, checked on its rendered text line by line:
 * HELP/TYPE headers, counters and gauges with and without labels, label
 * value and HELP escaping, histogram buckets (inclusive upper bounds,
 * cumulative counts, +Inf equal to _count), number spelling, refusal of
 * invalid names, and exact totals under concurrent updates.
 * The expected lines are written out by hand from the text format 0.0.4
 * specification, not produced by the code under test. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "server/metrics.h"
#include "tests/unit/check.h"

/* True when `text` has `line` as one whole line. */
static int has_line(const char *text, const char *line) {
    size_t n = strlen(line);
    for (const char *p = text; p && *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len == n && !memcmp(p, line, n)) return 1;
        p = nl ? nl + 1 : NULL;
    }
    return 0;
}

/* Index of the line equal to `line`, or -1: to check ordering. */
static int line_index(const char *text, const char *line) {
    size_t n = strlen(line);
    int idx = 0;
    for (const char *p = text; p && *p; idx++) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len == n && !memcmp(p, line, n)) return idx;
        p = nl ? nl + 1 : NULL;
    }
    return -1;
}

/* The value of the sample whose name-and-labels part is exactly `series`. */
static double sample_value(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        const char *nl = strchr(p, '\n');
        if (!strncmp(p, series, n) && p[n] == ' ') return strtod(p + n + 1, NULL);
        p = nl ? nl + 1 : NULL;
    }
    return NAN;
}

static int count_lines(const char *text) {
    int n = 0;
    for (const char *p = text; *p; p++) n += *p == '\n';
    return n;
}

static char *render(struct metrics *reg) {
    size_t len = 0;
    char *text = metrics_render(reg, &len);
    CHECK(text != NULL);
    if (text) {
        CHECK(len == strlen(text));
        CHECK(len == 0 || text[len - 1] == '\n');   /* every line ends with a newline */
    }
    return text ? text : calloc(1, 1);
}

static void test_counter_and_gauge(void) {
    struct metrics *reg = metrics_new();
    struct metric *c = metrics_counter(reg, "ebb_things_total", "Things counted.", 0, NULL);
    struct metric *g = metrics_gauge(reg, "ebb_level", "A level.", 0, NULL);
    CHECK(c && g);

    char *t = render(reg);
    /* Unlabelled families exist from the start with a zero sample. */
    CHECK(has_line(t, "# HELP ebb_things_total Things counted."));
    CHECK(has_line(t, "# TYPE ebb_things_total counter"));
    CHECK(has_line(t, "ebb_things_total 0"));
    CHECK(has_line(t, "# HELP ebb_level A level."));
    CHECK(has_line(t, "# TYPE ebb_level gauge"));
    CHECK(has_line(t, "ebb_level 0"));
    CHECK(count_lines(t) == 6);
    /* HELP before TYPE before the sample; families in registration order. */
    CHECK(line_index(t, "# HELP ebb_things_total Things counted.") == 0);
    CHECK(line_index(t, "# TYPE ebb_things_total counter") == 1);
    CHECK(line_index(t, "ebb_things_total 0") == 2);
    CHECK(line_index(t, "# HELP ebb_level A level.") == 3);
    free(t);

    metric_inc(c, NULL, 1);
    metric_inc(c, NULL, 2.5);
    metric_inc(c, NULL, -10);    /* counters never go down: ignored */
    metric_inc(c, NULL, NAN);    /* ignored */
    metric_set(c, NULL, 100);    /* set is for gauges: ignored on a counter */
    metric_set(g, NULL, -2.25);
    metric_inc(g, NULL, 1);      /* gauges may add */
    t = render(reg);
    CHECK(has_line(t, "ebb_things_total 3.5"));
    CHECK(has_line(t, "ebb_level -1.25"));
    free(t);

    /* Number spelling: integers plainly, fractions in the shortest form that
     * reads back exactly, and Go's spellings of the special values. */
    metric_set(g, NULL, 0.1);
    t = render(reg);
    CHECK(has_line(t, "ebb_level 0.1"));
    free(t);
    metric_set(g, NULL, 1e21);
    t = render(reg);
    CHECK(has_line(t, "ebb_level 1e+21"));
    free(t);
    metric_set(g, NULL, INFINITY);
    t = render(reg);
    CHECK(has_line(t, "ebb_level +Inf"));
    free(t);
    metric_set(g, NULL, -INFINITY);
    t = render(reg);
    CHECK(has_line(t, "ebb_level -Inf"));
    free(t);
    metric_set(g, NULL, NAN);
    t = render(reg);
    CHECK(has_line(t, "ebb_level NaN"));
    free(t);
    metric_set(g, NULL, 1.0 / 3.0);
    t = render(reg);
    CHECK(sample_value(t, "ebb_level") == 1.0 / 3.0);   /* round-trips exactly */
    free(t);
    metrics_free(reg);
}

static void test_labels_and_escaping(void) {
    struct metrics *reg = metrics_new();
    static const char *const names[] = {"model", "reason"};
    struct metric *c = metrics_counter(reg, "ebb_requests_total", "Requests.\nSecond line with \\ backslash.",
                                       2, names);
    CHECK(c != NULL);

    char *t = render(reg);
    /* No series yet: only the headers, HELP escaped (\\ and \n, quotes kept). */
    CHECK(has_line(t, "# HELP ebb_requests_total Requests.\\nSecond line with \\\\ backslash."));
    CHECK(has_line(t, "# TYPE ebb_requests_total counter"));
    CHECK(count_lines(t) == 2);
    free(t);

    const char *v1[] = {"smol", "stop"};
    const char *v2[] = {"smol", "length"};
    const char *v3[] = {"we\"ird\\mo\ndel", "stop"};
    metric_inc(c, v1, 1);
    metric_inc(c, v1, 1);
    metric_inc(c, v2, 1);
    metric_inc(c, v3, 4);
    t = render(reg);
    CHECK(has_line(t, "ebb_requests_total{model=\"smol\",reason=\"stop\"} 2"));
    CHECK(has_line(t, "ebb_requests_total{model=\"smol\",reason=\"length\"} 1"));
    CHECK(has_line(t, "ebb_requests_total{model=\"we\\\"ird\\\\mo\\ndel\",reason=\"stop\"} 4"));
    CHECK(count_lines(t) == 5);
    /* Series in order of first use. */
    CHECK(line_index(t, "ebb_requests_total{model=\"smol\",reason=\"stop\"} 2") <
          line_index(t, "ebb_requests_total{model=\"smol\",reason=\"length\"} 1"));
    free(t);

    /* A series pointer stays valid while many more series are created. */
    struct metric_series *s = metric_series(c, v1);
    CHECK(s != NULL);
    for (int i = 0; i < 200; i++) {
        char model[16];
        snprintf(model, sizeof model, "m%d", i);
        const char *v[] = {model, "stop"};
        metric_inc(c, v, 1);
    }
    CHECK(metric_series(c, v1) == s);
    metric_series_inc(s, 3);
    CHECK(metric_series_value(s) == 5);
    t = render(reg);
    CHECK(has_line(t, "ebb_requests_total{model=\"smol\",reason=\"stop\"} 5"));
    CHECK(has_line(t, "ebb_requests_total{model=\"m199\",reason=\"stop\"} 1"));
    CHECK(count_lines(t) == 205);
    free(t);
    metrics_free(reg);
}

static void test_histogram(void) {
    struct metrics *reg = metrics_new();
    static const char *const names[] = {"model"};
    static const double bounds[] = {0.1, 0.5, 1, 2.5};
    struct metric *h = metrics_histogram(reg, "ebb_latency_seconds", "Latency.", 1, names, bounds, 4);
    CHECK(h != NULL);
    const char *m[] = {"x"};
    /* 0.1 lands in le="0.1": upper bounds are inclusive. */
    const double obs[] = {0.05, 0.1, 0.3, 0.7, 0.9, 5};
    double sum = 0;
    for (int i = 0; i < 6; i++) { metric_observe(h, m, obs[i]); sum += obs[i]; }
    metric_observe(h, m, NAN);   /* ignored */
    metric_inc(h, m, 1);         /* not a histogram operation: ignored */

    char *t = render(reg);
    CHECK(has_line(t, "# HELP ebb_latency_seconds Latency."));
    CHECK(has_line(t, "# TYPE ebb_latency_seconds histogram"));
    CHECK(has_line(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"0.1\"} 2"));
    CHECK(has_line(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"0.5\"} 3"));
    CHECK(has_line(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"1\"} 5"));
    CHECK(has_line(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"2.5\"} 5"));
    CHECK(has_line(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"+Inf\"} 6"));
    CHECK(has_line(t, "ebb_latency_seconds_count{model=\"x\"} 6"));
    CHECK(sample_value(t, "ebb_latency_seconds_sum{model=\"x\"}") == sum);
    /* Buckets in increasing le order, then _sum, then _count. */
    int i01 = line_index(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"0.1\"} 2");
    int iinf = line_index(t, "ebb_latency_seconds_bucket{model=\"x\",le=\"+Inf\"} 6");
    int icount = line_index(t, "ebb_latency_seconds_count{model=\"x\"} 6");
    CHECK(i01 == 2 && iinf == 6 && icount == 8);
    CHECK(count_lines(t) == 9);
    free(t);

    /* An unlabelled histogram renders its empty buckets at once. */
    struct metric *h0 = metrics_histogram(reg, "ebb_empty_seconds", "Empty.", 0, NULL, bounds, 2);
    CHECK(h0 != NULL);
    t = render(reg);
    CHECK(has_line(t, "ebb_empty_seconds_bucket{le=\"0.1\"} 0"));
    CHECK(has_line(t, "ebb_empty_seconds_bucket{le=\"0.5\"} 0"));
    CHECK(has_line(t, "ebb_empty_seconds_bucket{le=\"+Inf\"} 0"));
    CHECK(has_line(t, "ebb_empty_seconds_sum 0"));
    CHECK(has_line(t, "ebb_empty_seconds_count 0"));
    free(t);

    /* Cumulativeness over many random observations: each bucket equals the
     * number of observations <= its bound, counted here independently. */
    const double *lb = metrics_latency_buckets;
    int nb = metrics_latency_buckets_n;
    struct metric *h2 = metrics_histogram(reg, "ebb_random_seconds", "Random.", 0, NULL, lb, nb);
    CHECK(h2 != NULL);
    unsigned long long expect[32] = {0};
    unsigned x = 12345;
    for (int i = 0; i < 5000; i++) {
        x = x * 1103515245u + 12345u;
        double v = (double)(x >> 8) / (double)(1u << 24) * 70.0;   /* 0 .. 70 s */
        if (i % 97 == 0 && nb > 3) v = lb[i % nb];                 /* exact bounds too */
        metric_observe(h2, NULL, v);
        for (int b = 0; b < nb; b++) if (v <= lb[b]) expect[b]++;
    }
    t = render(reg);
    double prev = -1;
    for (int b = 0; b < nb; b++) {
        char series[96], le[32];
        snprintf(le, sizeof le, "%g", lb[b]);
        snprintf(series, sizeof series, "ebb_random_seconds_bucket{le=\"%s\"}", le);
        double got = sample_value(t, series);
        CHECK_MSG(got == (double)expect[b], "%s: got %g want %llu", series, got, expect[b]);
        CHECK(got >= prev);
        prev = got;
    }
    CHECK(sample_value(t, "ebb_random_seconds_bucket{le=\"+Inf\"}") == 5000);
    CHECK(sample_value(t, "ebb_random_seconds_count") == 5000);
    free(t);
    metrics_free(reg);
}

static void test_invalid_registrations(void) {
    struct metrics *reg = metrics_new();
    static const char *const le[] = {"le"};
    static const char *const dup[] = {"a", "a"};
    static const char *const reserved[] = {"__x"};
    static const char *const dash[] = {"bad-label"};
    static const double unsorted[] = {1, 0.5};
    static const double inf[] = {1, INFINITY};
    static const double ok_bounds[] = {1};
    fprintf(stderr, "(the following registration errors are expected)\n");
    CHECK(metrics_counter(reg, "requests_total", "no prefix", 0, NULL) == NULL);
    CHECK(metrics_counter(reg, "ebb_bad-name", "dash", 0, NULL) == NULL);
    CHECK(metrics_counter(reg, "ebb_9", "fine: digits after the first char", 0, NULL) != NULL);
    CHECK(metrics_gauge(reg, "ebb_g", "dup labels", 2, dup) == NULL);
    CHECK(metrics_gauge(reg, "ebb_g2", "reserved", 1, reserved) == NULL);
    CHECK(metrics_gauge(reg, "ebb_g3", "dash", 1, dash) == NULL);
    CHECK(metrics_histogram(reg, "ebb_h", "le label", 1, le, ok_bounds, 1) == NULL);
    CHECK(metrics_gauge(reg, "ebb_h_le_ok", "le is fine outside histograms", 1, le) != NULL);
    CHECK(metrics_histogram(reg, "ebb_h2", "unsorted", 0, NULL, unsorted, 2) == NULL);
    CHECK(metrics_histogram(reg, "ebb_h3", "inf bound", 0, NULL, inf, 2) == NULL);
    CHECK(metrics_histogram(reg, "ebb_h4", "no buckets", 0, NULL, ok_bounds, 0) == NULL);
    CHECK(metrics_counter(reg, "ebb_once", "first", 0, NULL) != NULL);
    CHECK(metrics_counter(reg, "ebb_once", "second", 0, NULL) == NULL);
    CHECK(metrics_counter(reg, "ebb_many", "too many labels", METRICS_MAX_LABELS + 1, dup) == NULL);
    char *t = render(reg);
    CHECK(has_line(t, "ebb_once 0"));
    CHECK(!strstr(t, "second"));
    CHECK(!strstr(t, "ebb_h2"));
    free(t);
    metrics_free(reg);

    /* An empty registry renders as an empty text, not NULL. */
    reg = metrics_new();
    t = render(reg);
    CHECK(t[0] == '\0');
    free(t);
    metrics_free(reg);
}

struct worker_arg {
    struct metric *c, *h;
    int id;
};

static void *worker(void *p) {
    struct worker_arg *a = p;
    char model[8];
    snprintf(model, sizeof model, "m%d", a->id % 2);
    const char *v[] = {model};
    struct metric_series *hs = metric_series(a->h, v);
    for (int i = 0; i < 50000; i++) {
        metric_inc(a->c, v, 1);
        metric_series_observe(hs, (i % 10) * 0.1);
    }
    return NULL;
}

static void test_concurrent_updates(void) {
    struct metrics *reg = metrics_new();
    static const char *const names[] = {"model"};
    static const double bounds[] = {0.25, 0.55};
    struct metric *c = metrics_counter(reg, "ebb_tokens_total", "Tokens.", 1, names);
    struct metric *h = metrics_histogram(reg, "ebb_itl_seconds", "ITL.", 1, names, bounds, 2);
    pthread_t th[4];
    struct worker_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct worker_arg){c, h, i};
        pthread_create(&th[i], NULL, worker, &args[i]);
    }
    /* Render while the workers run: every intermediate text must still be
     * internally consistent (+Inf bucket == _count). */
    for (int k = 0; k < 50; k++) {
        char *t = render(reg);
        double inf = sample_value(t, "ebb_itl_seconds_bucket{model=\"m0\",le=\"+Inf\"}");
        double cnt = sample_value(t, "ebb_itl_seconds_count{model=\"m0\"}");
        CHECK((isnan(inf) && isnan(cnt)) || inf == cnt);
        free(t);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    char *t = render(reg);
    CHECK(has_line(t, "ebb_tokens_total{model=\"m0\"} 100000"));
    CHECK(has_line(t, "ebb_tokens_total{model=\"m1\"} 100000"));
    /* Values 0,0.1,..,0.9 each 1/10 of the time; 0.25 takes 0,0.1,0.2 and
     * 0.55 adds 0.3,0.4,0.5. */
    CHECK(has_line(t, "ebb_itl_seconds_bucket{model=\"m0\",le=\"0.25\"} 30000"));
    CHECK(has_line(t, "ebb_itl_seconds_bucket{model=\"m0\",le=\"0.55\"} 60000"));
    CHECK(has_line(t, "ebb_itl_seconds_bucket{model=\"m1\",le=\"+Inf\"} 100000"));
    CHECK(has_line(t, "ebb_itl_seconds_count{model=\"m1\"} 100000"));
    free(t);
    metrics_free(reg);
}

int main(void) {
    test_counter_and_gauge();
    test_labels_and_escaping();
    test_histogram();
    test_invalid_registrations();
    test_concurrent_updates();
    return check_report("test_metrics");
}
