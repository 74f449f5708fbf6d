/* A small Prometheus registry rendered in the text exposition format 0.0.4.
 *
 * A registry holds metric families (counter, gauge, histogram). A family has
 * a fixed list of label names chosen at registration; each distinct tuple of
 * label values is a series, created on first use and kept until the registry
 * is freed or metrics_drop_series removes it, so a series pointer stays valid and hot paths can look it up once
 * and then update it without any string work.
 *
 * Threads: any thread may update, any thread may render. Each family has a
 * mutex that guards its series list and values; an update is one short
 * critical section (a few adds), so the engine thread updating per token and
 * the loop thread rendering for a scrape never wait long, and a histogram's
 * buckets, _sum and _count are always rendered consistent with each other.
 * Registration takes the registry lock; do it at start-up.
 *
 * Names must match [a-zA-Z_:][a-zA-Z0-9_:]* and start with "ebb_"; label
 * names [a-zA-Z_][a-zA-Z0-9_]*, not "le" nor "__"-prefixed. Invalid names,
 * duplicate families or unsorted buckets make registration return NULL
 * (these are programming errors, reported on stderr). Label values are
 * arbitrary strings and are escaped on output. A family without labels has
 * its single series from the start, so it renders 0 before any update;
 * labelled series appear once touched (use metric_series() to pre-create). */
#ifndef EBB_SERVER_METRICS_H
#define EBB_SERVER_METRICS_H
#include <stddef.h>

struct metrics;          /* the registry */
struct metric;           /* one family */
struct metric_series;    /* one label tuple of a family */

enum metric_type { METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM };

#define METRICS_MAX_LABELS 8

struct metrics *metrics_new(void);
void metrics_free(struct metrics *reg);

/* `label_names` has `n_labels` entries (0..METRICS_MAX_LABELS), copied. */
struct metric *metrics_counter(struct metrics *reg, const char *name, const char *help,
                               int n_labels, const char *const *label_names);
struct metric *metrics_gauge(struct metrics *reg, const char *name, const char *help,
                             int n_labels, const char *const *label_names);
/* `bounds`: `n_bounds` strictly increasing finite upper bounds; the +Inf
 * bucket is implied. Copied. */
struct metric *metrics_histogram(struct metrics *reg, const char *name, const char *help,
                                 int n_labels, const char *const *label_names,
                                 const double *bounds, int n_bounds);

/* The series for `values` (one string per label name; NULL when the family
 * has no labels), created on first use. NULL only when out of memory. */
struct metric_series *metric_series(struct metric *m, const char *const *values);

/* Removes every series, of every family with a label `label`, whose value
 * for it is `value` (a model that is gone: its series would otherwise stay
 * forever, and the exposition grow with every model ever loaded). Series
 * pointers to them become invalid: call it once nothing holds one. Returns
 * how many went. */
int metrics_drop_series(struct metrics *reg, const char *label, const char *value);

/* Updates on a series. Counters only go up: a negative or NaN increment is
 * ignored. set/add apply to gauges, observe to histograms; applying one to
 * the wrong type is ignored. */
void metric_series_inc(struct metric_series *s, double v);     /* counter or gauge: += v */
void metric_series_set(struct metric_series *s, double v);     /* gauge */
void metric_series_observe(struct metric_series *s, double v); /* histogram */

/* Convenience: look up the series by label values and update it. */
void metric_inc(struct metric *m, const char *const *values, double v);
void metric_set(struct metric *m, const char *const *values, double v);
void metric_observe(struct metric *m, const char *const *values, double v);

/* Reads back a counter/gauge value (tests, and gauges derived from others);
 * a histogram series reports its _count. */
double metric_series_value(struct metric_series *s);

/* Renders every family in registration order. Returns a malloc'd,
 * NUL-terminated text (caller frees) and its length in *len, or NULL when
 * out of memory. */
char *metrics_render(struct metrics *reg, size_t *len);

/* Default latency buckets in seconds (5 ms .. 60 s), for request durations. */
extern const double metrics_latency_buckets[];
extern const int metrics_latency_buckets_n;
#endif
