/* The daemon's metrics: every family it exports, in one table, and
 * GET /metrics.
 *
 * Each row names a family (type, name, help, labels, histogram buckets) and
 * the struct daemon field that keeps its pointer, by offsetof, so adding a
 * metric is one row plus one field; the row count is checked against
 * DAEMON_N_METRICS (daemon.h) at compile time, as config.c checks its table.
 * Families render in table order. Hot paths never look a family up by name:
 * per-model series are resolved once when a model is added
 * (served_models.c), and the rest update through the field.
 *
 * Some figures are kept elsewhere and copied in just before rendering: the
 * connection counts (the http layer's own counters; counters advance by the
 * difference since the last scrape) and the per-model gauges
 * (served_refresh_metrics).
 */
#include <stddef.h>
#include <stdlib.h>

#include "server/daemon.h"

struct family {
    enum metric_type type;
    const char *name, *help;
    int n_labels;                  /* the first n_labels of `labels` */
    const char *const *labels;
    const double *buckets;         /* histograms; NULL: metrics_latency_buckets */
    int n_buckets;
    size_t field;                  /* offsetof(struct daemon, the struct metric * it fills) */
};

static const char *const route_code[] = {"route", "code"};
static const char *const model[] = {"model"};
static const char *const model_reason[] = {"model", "reason"};
static const char *const model_direction[] = {"model", "direction"};
static const char *const kind[] = {"kind"};
static const char *const model_source[] = {"model", "source"};
static const char *const model_source_position[] = {"model", "source", "position"};
static const char *const model_mode[] = {"model", "mode"};
static const char *const model_mode_tier[] = {"model", "mode", "tier"};
static const double swap_buckets[] = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1};
#define SWAP_BUCKETS swap_buckets, (int)(sizeof swap_buckets / sizeof swap_buckets[0])
static const double itl_buckets[] = {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2};
#define ITL_BUCKETS itl_buckets, (int)(sizeof itl_buckets / sizeof itl_buckets[0])
#define LATENCY NULL, 0
#define AT(member) offsetof(struct daemon, member)

static const struct family families[] = {
    {METRIC_COUNTER, "ebb_http_requests_total", "HTTP requests by route and status code.", 2, route_code,
     NULL, 0, AT(m_requests)},
    {METRIC_HISTOGRAM, "ebb_http_request_duration_seconds",
     "Time from the first request byte to the end of the response.", 1, route_code, LATENCY, AT(m_duration)},
    {METRIC_COUNTER, "ebb_http_requests_aborted_total", "Requests whose client disconnected before the response ended.",
     1, route_code, NULL, 0, AT(m_aborted)},
    {METRIC_GAUGE, "ebb_http_connections_open", "Open client connections.", 0, NULL, NULL, 0, AT(m_conn_open)},
    {METRIC_COUNTER, "ebb_http_connections_total", "Accepted client connections.", 0, NULL, NULL, 0, AT(m_conn_total)},
    {METRIC_COUNTER, "ebb_http_connections_rejected_total",
     "Connections refused because the connection limit was reached.", 0, NULL, NULL, 0, AT(m_conn_rejected)},
    {METRIC_GAUGE, "ebb_requests_running", "Sequences being generated.", 1, model, NULL, 0, AT(m_running)},
    {METRIC_GAUGE, "ebb_requests_waiting", "Sequences queued for a batch slot or memory.", 1, model, NULL, 0,
     AT(m_waiting)},
    {METRIC_COUNTER, "ebb_requests_finished_total",
     "Finished sequences by finish reason (stop, length, cancelled, error, evicted: the budget shrank below it).", 2, model_reason, NULL, 0,
     AT(m_finished)},
    {METRIC_COUNTER, "ebb_prompt_tokens_total", "Prompt tokens processed.", 1, model, NULL, 0, AT(m_prompt_tokens)},
    {METRIC_COUNTER, "ebb_generation_tokens_total", "Tokens generated.", 1, model, NULL, 0, AT(m_gen_tokens)},
    {METRIC_HISTOGRAM, "ebb_time_to_first_token_seconds", "From arrival to the first generated token.", 1, model,
     LATENCY, AT(m_ttft)},
    {METRIC_HISTOGRAM, "ebb_inter_token_latency_seconds", "Time between consecutive tokens.", 1, model, ITL_BUCKETS,
     AT(m_itl)},
    {METRIC_HISTOGRAM, "ebb_request_latency_seconds", "From arrival to the last token.", 1, model, LATENCY,
     AT(m_e2e)},
    {METRIC_HISTOGRAM, "ebb_request_queue_seconds", "From arrival to admission into a batch.", 1, model, LATENCY,
     AT(m_queue)},
    {METRIC_COUNTER, "ebb_preemptions_total",
     "Running sequences sent back to the queue to free KV cache memory (recomputed later).", 1, model, NULL, 0,
     AT(m_preemptions)},
    {METRIC_GAUGE, "ebb_kv_cache_bytes", "KV cache bytes allocated.", 1, model, NULL, 0, AT(m_kv_bytes)},
    {METRIC_GAUGE, "ebb_kv_cache_usage_ratio", "KV cache reserved over its budget (0 without one).", 1, model, NULL,
     0, AT(m_kv_use)},
    {METRIC_GAUGE, "ebb_resident_weight_bytes", "Model weight bytes resident in memory.", 1, model, NULL, 0,
     AT(m_weights)},
    {METRIC_GAUGE, "ebb_memory_budget_bytes", "Memory budget (0: none).", 0, NULL, NULL, 0, AT(m_budget)},
    {METRIC_GAUGE, "ebb_memory_minimum_bytes",
     "The least budget the served models accept now (fixed weights, one BitStack level, the KV held).", 0, NULL,
     NULL, 0, AT(m_minimum)},
    {METRIC_GAUGE, "ebb_resident_bytes",
     "Resident memory by kind: weights, kv (allocated pages), scratch_and_other (the rest of the process's RSS).", 1,
     kind, NULL, 0, AT(m_resident)},
    {METRIC_GAUGE, "ebb_device_memory_bytes",
     "On the GPU models compute on (config device): weights and kv that ebb holds there, free and total as the "
     "device reports them.", 1, kind, NULL, 0, AT(m_device)},
    {METRIC_GAUGE, "ebb_stack_blocks_resident", "BitStack blocks resident (a prefix of the file's order).", 1, model,
     NULL, 0, AT(m_stack_blocks)},
    {METRIC_GAUGE, "ebb_weight_bits_per_weight", "Resident weight bits per parameter.", 1, model, NULL, 0, AT(m_bpw)},
    {METRIC_COUNTER, "ebb_weight_changes_total", "Changes of the resident BitStack prefix by direction (grow, shrink).",
     2, model_direction, NULL, 0, AT(m_weight_changes)},
    {METRIC_COUNTER, "ebb_weight_bytes_loaded_total", "Bytes of BitStack blocks brought into the resident prefix.", 1,
     model, NULL, 0, AT(m_bytes_loaded)},
    {METRIC_COUNTER, "ebb_weight_bytes_freed_total", "Bytes of BitStack blocks released from the resident prefix.", 1,
     model, NULL, 0, AT(m_bytes_freed)},
    {METRIC_HISTOGRAM, "ebb_weight_swap_seconds", "Time the engine spent changing the resident prefix (between steps).",
     1, model, SWAP_BUCKETS, AT(m_swap)},
    /* Speculative decoding, with vLLM's names for its counters. */
    {METRIC_COUNTER, "ebb_spec_decode_num_drafts_total", "Verification passes that carried drafted tokens.", 2,
     model_source, NULL, 0, AT(m_drafts)},
    {METRIC_COUNTER, "ebb_spec_decode_num_draft_tokens_total", "Drafted tokens verified.", 2, model_source, NULL, 0,
     AT(m_draft_tokens)},
    {METRIC_COUNTER, "ebb_spec_decode_num_accepted_tokens_total", "Drafted tokens the model accepted.", 2,
     model_source, NULL, 0, AT(m_accepted)},
    {METRIC_COUNTER, "ebb_spec_decode_num_accepted_tokens_per_pos_total",
     "Drafted tokens accepted at each position of a draft (0: the first).", 3, model_source_position, NULL, 0,
     AT(m_accepted_at)},
    {METRIC_GAUGE, "ebb_spec_decode_mean_accepted_length",
     "Drafted tokens accepted per verification pass with drafts, since start.", 2, model_source, NULL, 0,
     AT(m_accepted_mean)},
    /* Context compression (engine/compress.h), by mode. */
    {METRIC_COUNTER, "ebb_context_compression_requests_total", "Compressions of a prompt's KV cache (a conversation compressed again at a new turn counts again).", 2,
     model_mode, NULL, 0, AT(m_cmp_requests)},
    {METRIC_COUNTER, "ebb_context_compression_tokens_total",
     "Compressed prompts' tokens by tier: kept at the cache's precision, demoted to 2 bits, dropped.", 3,
     model_mode_tier, NULL, 0, AT(m_cmp_tokens)},
    {METRIC_COUNTER, "ebb_context_compression_kv_bytes_saved_total", "KV cache bytes compression released.", 2,
     model_mode, NULL, 0, AT(m_cmp_saved)},
    {METRIC_HISTOGRAM, "ebb_context_compression_seconds", "Time of the compression stage (scoring and compaction).",
     2, model_mode, SWAP_BUCKETS, AT(m_cmp_seconds)},
    /* The prompt cache (engine/scheduler.h). */
    {METRIC_COUNTER, "ebb_prompt_cache_hits_total",
     "Requests that started from a kept KV cache of their prompt's start.", 1, model, NULL, 0, AT(m_pc_hits)},
    {METRIC_COUNTER, "ebb_prompt_cache_tokens_total", "Prompt tokens taken from kept KV caches instead of computed.",
     1, model, NULL, 0, AT(m_pc_tokens)},
    {METRIC_COUNTER, "ebb_prompt_cache_evictions_total",
     "Kept KV caches let go for memory or for the prompt cache's size (prompt_cache_bytes).", 1, model, NULL, 0,
     AT(m_pc_evictions)},
    {METRIC_GAUGE, "ebb_prompt_cache_entries", "KV caches of finished requests kept now.", 1, model, NULL, 0,
     AT(m_pc_entries)},
    {METRIC_GAUGE, "ebb_prompt_cache_bytes", "KV cache bytes the kept caches reserve (part of the KV budget).", 1,
     model, NULL, 0, AT(m_pc_bytes)},
};
#define N_FAMILIES ((int)(sizeof families / sizeof families[0]))
_Static_assert(sizeof families / sizeof families[0] == DAEMON_N_METRICS, "DAEMON_N_METRICS matches the table");

int daemon_metrics_register(struct daemon *d) {
    struct metrics *reg = d->metrics = metrics_new();
    if (!reg) return -1;
    for (int i = 0; i < N_FAMILIES; i++) {
        const struct family *f = &families[i];
        struct metric **slot = (struct metric **)((char *)d + f->field);
        if (f->type == METRIC_COUNTER) *slot = metrics_counter(reg, f->name, f->help, f->n_labels, f->labels);
        else if (f->type == METRIC_GAUGE) *slot = metrics_gauge(reg, f->name, f->help, f->n_labels, f->labels);
        else if (f->buckets)
            *slot = metrics_histogram(reg, f->name, f->help, f->n_labels, f->labels, f->buckets, f->n_buckets);
        else
            *slot = metrics_histogram(reg, f->name, f->help, f->n_labels, f->labels, metrics_latency_buckets,
                                      metrics_latency_buckets_n);
        if (!*slot) return -1;
    }
    return 0;
}

/* Connection figures live in the http layer; copy them into the registry
 * just before rendering (counters advance by the difference). */
static void refresh_connection_metrics(struct daemon *d) {
    struct http_stats st;
    http_server_stats(d->http, &st);
    metric_set(d->m_conn_open, NULL, (double)st.connections_open);
    metric_inc(d->m_conn_total, NULL, (double)(st.connections_accepted - d->seen_accepted));
    metric_inc(d->m_conn_rejected, NULL, (double)(st.connections_rejected - d->seen_rejected));
    d->seen_accepted = st.connections_accepted;
    d->seen_rejected = st.connections_rejected;
}

void route_metrics(struct daemon *d, struct http_request *req) {
    refresh_connection_metrics(d);
    served_refresh_metrics(d);
    size_t len = 0;
    char *text = metrics_render(d->metrics, &len);
    if (!text) {
        http_respond_error(req, 500, "server_error", "out of memory rendering metrics", NULL);
        return;
    }
    http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}
