/* Prometheus registry: see metrics.h for the contract.
 *
 * Layout: the registry is a growing array of families; a family is a growing
 * array of series pointers (pointers, so growth never moves a series that a
 * caller holds). A series owns copies of its label values and either one
 * double (counter, gauge) or per-bucket counts plus sum and count
 * (histogram). Buckets are stored non-cumulative -- an observation touches
 * one slot -- and made cumulative while rendering.
 *
 * Lookup of a series by label values is a linear scan: families here have a
 * handful of series (models x finish reasons, routes x codes), and the hot
 * paths are expected to keep the series pointer anyway. */
#include "server/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double metrics_latency_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                          1, 2.5, 5, 10, 30, 60};
const int metrics_latency_buckets_n = (int)(sizeof metrics_latency_buckets / sizeof metrics_latency_buckets[0]);

struct metric_series {
    struct metric *family;
    char **values;           /* n_labels copies */
    double value;            /* counter, gauge */
    uint64_t *buckets;       /* histogram: n_bounds + 1 slots, last is +Inf */
    double sum;
    uint64_t count;
};

struct metric {
    enum metric_type type;
    char *name;
    char *help;
    int n_labels;
    char *labels[METRICS_MAX_LABELS];
    double *bounds;
    int n_bounds;
    pthread_mutex_t lock;
    struct metric_series **series;
    size_t n_series, cap_series;
};

struct metrics {
    pthread_mutex_t lock;
    struct metric **families;
    size_t n, cap;
};

/* ---- names ---- */

static int valid_metric_name(const char *s) {
    if (strncmp(s, "ebb_", 4)) return 0;
    for (const char *p = s; *p; p++) {
        int ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' || *p == ':' ||
                 (p != s && *p >= '0' && *p <= '9');
        if (!ok) return 0;
    }
    return 1;
}

static int valid_label_name(const char *s, enum metric_type type) {
    if (!*s || !strncmp(s, "__", 2)) return 0;
    if (type == METRIC_HISTOGRAM && !strcmp(s, "le")) return 0;
    for (const char *p = s; *p; p++) {
        int ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
                 (p != s && *p >= '0' && *p <= '9');
        if (!ok) return 0;
    }
    return 1;
}

/* ---- registry ---- */

struct metrics *metrics_new(void) {
    struct metrics *reg = calloc(1, sizeof *reg);
    if (!reg) return NULL;
    pthread_mutex_init(&reg->lock, NULL);
    return reg;
}

static void series_free(struct metric_series *s, int n_labels) {
    if (!s) return;
    if (s->values)
        for (int i = 0; i < n_labels; i++) free(s->values[i]);
    free(s->values);
    free(s->buckets);
    free(s);
}

static void family_free(struct metric *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n_series; i++) series_free(m->series[i], m->n_labels);
    free(m->series);
    for (int i = 0; i < m->n_labels; i++) free(m->labels[i]);
    free(m->name);
    free(m->help);
    free(m->bounds);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void metrics_free(struct metrics *reg) {
    if (!reg) return;
    for (size_t i = 0; i < reg->n; i++) family_free(reg->families[i]);
    free(reg->families);
    pthread_mutex_destroy(&reg->lock);
    free(reg);
}

static struct metric_series *series_new(struct metric *m, const char *const *values) {
    struct metric_series *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->family = m;
    if (m->n_labels) {
        s->values = calloc((size_t)m->n_labels, sizeof *s->values);
        if (!s->values) goto oom;
        for (int i = 0; i < m->n_labels; i++)
            if (!(s->values[i] = strdup(values[i] ? values[i] : ""))) goto oom;
    }
    if (m->type == METRIC_HISTOGRAM && !(s->buckets = calloc((size_t)m->n_bounds + 1, sizeof *s->buckets)))
        goto oom;
    return s;
oom:
    series_free(s, m->n_labels);
    return NULL;
}

/* Appends a series; called with m->lock held. */
static int family_push(struct metric *m, struct metric_series *s) {
    if (m->n_series == m->cap_series) {
        size_t cap = m->cap_series ? m->cap_series * 2 : 4;
        struct metric_series **p = realloc(m->series, cap * sizeof *p);
        if (!p) return -1;
        m->series = p;
        m->cap_series = cap;
    }
    m->series[m->n_series++] = s;
    return 0;
}

static struct metric *family_register(struct metrics *reg, enum metric_type type, const char *name,
                                      const char *help, int n_labels, const char *const *label_names,
                                      const double *bounds, int n_bounds) {
    if (!reg || !name || !valid_metric_name(name)) {
        fprintf(stderr, "metrics: invalid metric name '%s' (must match ebb_[a-zA-Z0-9_:]*)\n", name ? name : "(null)");
        return NULL;
    }
    if (n_labels < 0 || n_labels > METRICS_MAX_LABELS || (n_labels && !label_names)) {
        fprintf(stderr, "metrics: %s: bad label count %d\n", name, n_labels);
        return NULL;
    }
    for (int i = 0; i < n_labels; i++) {
        if (!label_names[i] || !valid_label_name(label_names[i], type)) {
            fprintf(stderr, "metrics: %s: invalid label name '%s'\n", name, label_names[i] ? label_names[i] : "(null)");
            return NULL;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(label_names[i], label_names[j])) {
                fprintf(stderr, "metrics: %s: duplicate label '%s'\n", name, label_names[i]);
                return NULL;
            }
    }
    if (type == METRIC_HISTOGRAM) {
        if (n_bounds < 1 || !bounds) {
            fprintf(stderr, "metrics: %s: a histogram needs at least one bucket\n", name);
            return NULL;
        }
        for (int i = 0; i < n_bounds; i++)
            if (!isfinite(bounds[i]) || (i && !(bounds[i] > bounds[i - 1]))) {
                fprintf(stderr, "metrics: %s: buckets must be finite and strictly increasing\n", name);
                return NULL;
            }
    }

    struct metric *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->lock, NULL);
    m->type = type;
    m->n_labels = n_labels;
    m->name = strdup(name);
    m->help = strdup(help ? help : "");
    int ok = m->name && m->help;
    for (int i = 0; i < n_labels && ok; i++) ok = (m->labels[i] = strdup(label_names[i])) != NULL;
    if (ok && type == METRIC_HISTOGRAM) {
        m->n_bounds = n_bounds;
        ok = (m->bounds = malloc((size_t)n_bounds * sizeof *bounds)) != NULL;
        if (ok) memcpy(m->bounds, bounds, (size_t)n_bounds * sizeof *bounds);
    }
    if (ok && n_labels == 0) {   /* the single series exists from the start */
        struct metric_series *s = series_new(m, NULL);
        ok = s && family_push(m, s) == 0;
        if (!ok) series_free(s, 0);
    }
    if (!ok) { family_free(m); return NULL; }

    pthread_mutex_lock(&reg->lock);
    struct metric *result = m;
    for (size_t i = 0; i < reg->n; i++)
        if (!strcmp(reg->families[i]->name, name)) {
            fprintf(stderr, "metrics: %s registered twice\n", name);
            result = NULL;
        }
    if (result && reg->n == reg->cap) {
        size_t cap = reg->cap ? reg->cap * 2 : 16;
        struct metric **p = realloc(reg->families, cap * sizeof *p);
        if (p) { reg->families = p; reg->cap = cap; }
        else result = NULL;
    }
    if (result) reg->families[reg->n++] = m;
    pthread_mutex_unlock(&reg->lock);
    if (!result) family_free(m);
    return result;
}

struct metric *metrics_counter(struct metrics *reg, const char *name, const char *help,
                               int n_labels, const char *const *label_names) {
    return family_register(reg, METRIC_COUNTER, name, help, n_labels, label_names, NULL, 0);
}

struct metric *metrics_gauge(struct metrics *reg, const char *name, const char *help,
                             int n_labels, const char *const *label_names) {
    return family_register(reg, METRIC_GAUGE, name, help, n_labels, label_names, NULL, 0);
}

struct metric *metrics_histogram(struct metrics *reg, const char *name, const char *help,
                                 int n_labels, const char *const *label_names,
                                 const double *bounds, int n_bounds) {
    return family_register(reg, METRIC_HISTOGRAM, name, help, n_labels, label_names, bounds, n_bounds);
}

/* ---- series ---- */

static int series_matches(const struct metric_series *s, int n, const char *const *values) {
    for (int i = 0; i < n; i++)
        if (strcmp(s->values[i], values[i] ? values[i] : "")) return 0;
    return 1;
}

struct metric_series *metric_series(struct metric *m, const char *const *values) {
    if (!m) return NULL;
    if (m->n_labels && !values) return NULL;
    pthread_mutex_lock(&m->lock);
    struct metric_series *found = NULL;
    for (size_t i = 0; i < m->n_series && !found; i++)
        if (series_matches(m->series[i], m->n_labels, values)) found = m->series[i];
    if (!found && (found = series_new(m, values)) && family_push(m, found) != 0) {
        series_free(found, m->n_labels);
        found = NULL;
    }
    pthread_mutex_unlock(&m->lock);
    return found;
}

int metrics_drop_series(struct metrics *reg, const char *label, const char *value) {
    int dropped = 0;
    pthread_mutex_lock(&reg->lock);
    for (size_t f = 0; f < reg->n; f++) {
        struct metric *m = reg->families[f];
        int at = -1;
        for (int l = 0; l < m->n_labels && at < 0; l++)
            if (!strcmp(m->labels[l], label)) at = l;
        if (at < 0) continue;
        pthread_mutex_lock(&m->lock);
        size_t kept = 0;
        for (size_t i = 0; i < m->n_series; i++) {
            if (!strcmp(m->series[i]->values[at], value)) {
                series_free(m->series[i], m->n_labels);
                dropped++;
            } else {
                m->series[kept++] = m->series[i];
            }
        }
        m->n_series = kept;
        pthread_mutex_unlock(&m->lock);
    }
    pthread_mutex_unlock(&reg->lock);
    return dropped;
}

void metric_series_inc(struct metric_series *s, double v) {
    if (!s || isnan(v)) return;
    struct metric *m = s->family;
    if (m->type == METRIC_HISTOGRAM || (m->type == METRIC_COUNTER && v < 0)) return;
    pthread_mutex_lock(&m->lock);
    s->value += v;
    pthread_mutex_unlock(&m->lock);
}

void metric_series_set(struct metric_series *s, double v) {
    if (!s || s->family->type != METRIC_GAUGE) return;
    pthread_mutex_lock(&s->family->lock);
    s->value = v;
    pthread_mutex_unlock(&s->family->lock);
}

void metric_series_observe(struct metric_series *s, double v) {
    if (!s || s->family->type != METRIC_HISTOGRAM || isnan(v)) return;
    struct metric *m = s->family;
    int b = 0;
    while (b < m->n_bounds && v > m->bounds[b]) b++;   /* le: v <= bound */
    pthread_mutex_lock(&m->lock);
    s->buckets[b]++;
    s->sum += v;
    s->count++;
    pthread_mutex_unlock(&m->lock);
}

double metric_series_value(struct metric_series *s) {
    if (!s) return 0;
    pthread_mutex_lock(&s->family->lock);
    double v = s->family->type == METRIC_HISTOGRAM ? (double)s->count : s->value;
    pthread_mutex_unlock(&s->family->lock);
    return v;
}

void metric_inc(struct metric *m, const char *const *values, double v) {
    metric_series_inc(metric_series(m, values), v);
}

void metric_set(struct metric *m, const char *const *values, double v) {
    metric_series_set(metric_series(m, values), v);
}

void metric_observe(struct metric *m, const char *const *values, double v) {
    metric_series_observe(metric_series(m, values), v);
}

/* ---- rendering ---- */

struct text {
    char *p;
    size_t len, cap;
    int oom;
};

static void text_put(struct text *t, const char *s, size_t n) {
    if (t->oom) return;
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 4096;
        while (cap < t->len + n + 1) cap *= 2;
        char *p = realloc(t->p, cap);
        if (!p) { t->oom = 1; return; }
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = '\0';
}

static void text_str(struct text *t, const char *s) { text_put(t, s, strlen(s)); }

/* Shortest decimal that reads back as the same double; Go's ParseFloat
 * spellings for the infinities and NaN, as the format requires. */
static void text_number(struct text *t, double v) {
    char buf[40];
    if (isnan(v)) { text_str(t, "NaN"); return; }
    if (isinf(v)) { text_str(t, v > 0 ? "+Inf" : "-Inf"); return; }
    if (v == floor(v) && fabs(v) < 1e15) {   /* integers plainly: 10, not 1e+01 */
        snprintf(buf, sizeof buf, "%.0f", v);
        text_str(t, buf[0] == '-' && !strcmp(buf, "-0") ? "0" : buf);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    text_str(t, buf);
}

static void text_u64(struct text *t, uint64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
    text_str(t, buf);
}

/* HELP text escapes backslash and newline; label values also the quote. */
static void text_escaped(struct text *t, const char *s, int quote) {
    for (; *s; s++) {
        if (*s == '\\') text_put(t, "\\\\", 2);
        else if (*s == '\n') text_put(t, "\\n", 2);
        else if (quote && *s == '"') text_put(t, "\\\"", 2);
        else text_put(t, s, 1);
    }
}

/* name{l1="v1",...,extra="x"} -- `extra` (the "le" label) may be NULL. */
static void text_sample_name(struct text *t, const struct metric *m, const char *suffix,
                             const struct metric_series *s, const char *extra_name, const char *extra_value) {
    text_str(t, m->name);
    text_str(t, suffix);
    if (!m->n_labels && !extra_name) return;
    text_put(t, "{", 1);
    for (int i = 0; i < m->n_labels; i++) {
        if (i) text_put(t, ",", 1);
        text_str(t, m->labels[i]);
        text_put(t, "=\"", 2);
        text_escaped(t, s->values[i], 1);
        text_put(t, "\"", 1);
    }
    if (extra_name) {
        if (m->n_labels) text_put(t, ",", 1);
        text_str(t, extra_name);
        text_put(t, "=\"", 2);
        text_str(t, extra_value);
        text_put(t, "\"", 1);
    }
    text_put(t, "}", 1);
}

static void render_family(struct text *t, struct metric *m) {
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    text_str(t, "# HELP ");
    text_str(t, m->name);
    text_put(t, " ", 1);
    text_escaped(t, m->help, 0);
    text_str(t, "\n# TYPE ");
    text_str(t, m->name);
    text_put(t, " ", 1);
    text_str(t, type_names[m->type]);
    text_put(t, "\n", 1);

    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; i < m->n_series; i++) {
        const struct metric_series *s = m->series[i];
        if (m->type != METRIC_HISTOGRAM) {
            text_sample_name(t, m, "", s, NULL, NULL);
            text_put(t, " ", 1);
            text_number(t, s->value);
            text_put(t, "\n", 1);
            continue;
        }
        uint64_t cumulative = 0;
        for (int b = 0; b <= m->n_bounds; b++) {
            char le[40];
            if (b < m->n_bounds) {
                struct text lt = {0};
                text_number(&lt, m->bounds[b]);
                snprintf(le, sizeof le, "%s", lt.p ? lt.p : "0");
                free(lt.p);
            } else {
                snprintf(le, sizeof le, "+Inf");
            }
            cumulative += s->buckets[b];
            text_sample_name(t, m, "_bucket", s, "le", le);
            text_put(t, " ", 1);
            text_u64(t, cumulative);
            text_put(t, "\n", 1);
        }
        text_sample_name(t, m, "_sum", s, NULL, NULL);
        text_put(t, " ", 1);
        text_number(t, s->sum);
        text_put(t, "\n", 1);
        text_sample_name(t, m, "_count", s, NULL, NULL);
        text_put(t, " ", 1);
        text_u64(t, s->count);
        text_put(t, "\n", 1);
    }
    pthread_mutex_unlock(&m->lock);
}

char *metrics_render(struct metrics *reg, size_t *len) {
    struct text t = {0};
    text_put(&t, "", 0);   /* an empty registry renders as "" rather than NULL */
    pthread_mutex_lock(&reg->lock);
    for (size_t i = 0; i < reg->n; i++) render_family(&t, reg->families[i]);
    pthread_mutex_unlock(&reg->lock);
    if (t.oom) { free(t.p); return NULL; }
    if (len) *len = t.len;
    return t.p;
}
