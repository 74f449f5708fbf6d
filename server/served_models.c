/* Models being served.
 *
 * A served model goes LOADING -> READY (or FAILED) -> UNLOADING -> freed.
 * Loading (reading and dequantizing the GGUF, starting the scheduler's
 * engine thread) runs on libuv's work pool so the loop keeps answering
 * /health and other models' requests meanwhile; /ready turns 200 once a model
 * is READY.
 *
 * Lifetime is reference counted on the loop thread: the list holds one
 * reference and every request in flight holds one. Unloading takes the model
 * off the list (new requests get 404), cancels its running work, and the
 * last reference to go schedules the teardown (joining the engine thread,
 * freeing weights) on the work pool.
 *
 * The memory budget covers resident weights plus KV caches. Weights are
 * fixed until BitStack lands, so the budget left after them is what the KV
 * caches may reserve, split evenly across the models being served.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/completion.h"
#include "server/daemon.h"
#include "server/log.h"
#include "storage/catalog.h"

/* The file must still be the one the catalog registered (verify_models):
 * a damaged or replaced file is refused, never served. Runs on the work
 * pool, so hashing does not hold up the loop. */
static int served_check_file(struct daemon *d, struct served_model *sm) {
    struct catalog_model row;
    enum catalog_status st = catalog_model_get(d->catalog, sm->name, &row, sm->error, sizeof sm->error);
    if (st == CATALOG_OK) {
        st = catalog_model_check_file(&row, (enum catalog_check)d->cfg.verify_models, sm->error, sizeof sm->error);
        catalog_model_free(&row);
    }
    return st == CATALOG_OK ? 0 : -1;
}

static void load_work(uv_work_t *w) {
    struct served_model *sm = w->data;
    struct daemon *d = sm->d;
    double t0 = ebb_now_seconds();
    if (served_check_file(d, sm)) return;
    if (model_load(&sm->model, sm->path, (enum model_weights)d->cfg.weights, sm->error, sizeof sm->error)) return;
    struct sched_config sc = {
        .max_running = d->cfg.max_running,
        .max_waiting = d->cfg.queue_length,
        .max_ctx = d->cfg.max_context,
        .kv_budget_bytes = 0,   /* set by served_set_budget once on the loop */
        .kv_bits = config_kv_bits_for(&d->cfg, sm->name),  /* model_kv_bits, else kv_bits */
        .threads = d->cfg.threads,
    };
    const char *kv_problem = kv_bits_problem(&sm->model.cfg, sc.kv_bits);
    if (kv_problem) {
        snprintf(sm->error, sizeof sm->error, "kv_bits %d: %s", sc.kv_bits, kv_problem);
        model_free(&sm->model);
        return;
    }
    sm->sched = sched_create(&sm->model, &sc);
    if (!sm->sched) {
        snprintf(sm->error, sizeof sm->error, "cannot start the engine thread");
        model_free(&sm->model);
        return;
    }
    log_info("model loaded", "model=%s seconds=%.2f weight_bytes=%zu kv_bits=%d", sm->name, ebb_now_seconds() - t0,
             sm->model.weight_bytes, sc.kv_bits);
}

static void load_done(uv_work_t *w, int status) {
    struct served_model *sm = w->data;
    struct daemon *d = sm->d;
    if (status == 0 && sm->sched && sm->state == SERVED_LOADING) {
        /* Counted as resident to check the budget with it; refused, it
         * leaves the budget as it was (its memory goes at teardown). */
        sm->state = SERVED_READY;
        char err[400];
        if (served_budget_holds_a_request(d, d->memory_budget, err, sizeof err)) {
            sm->state = SERVED_FAILED;
            sm->over_budget = true;
            snprintf(sm->error, sizeof sm->error, "loading '%.128s' (%zu bytes of weights) would exceed the memory "
                     "budget: %s", sm->name, sm->model.weight_bytes, err);
            log_error("model refused", "model=%s error=\"%s\"", sm->name, sm->error);
            /* Its memory goes now, not when it is removed: an idle engine
             * thread joins at once and the weights are a mapping or a few
             * large blocks. */
            sched_destroy(sm->sched, 0);
            sm->sched = NULL;
            model_free(&sm->model);
        } else {
            const char *labels[] = {sm->name};
            metric_set(d->m_weights, labels, (double)sm->model.weight_bytes);
            if (served_set_budget(d, d->memory_budget, err, sizeof err))   /* re-split with the new model */
                log_warn("memory budget not re-split after a model was loaded", "error=\"%s\"", err);
        }
    } else if (!sm->sched) {
        if (sm->state == SERVED_LOADING) sm->state = SERVED_FAILED;
        log_error("model failed to load", "model=%s error=\"%s\"", sm->name, sm->error);
    }
    if (sm->on_loaded) sm->on_loaded(sm, sm->on_loaded_arg);
    sm->on_loaded = NULL;
    served_unref(sm);   /* the load's own reference */
}

static void series_for(struct daemon *d, struct served_model *sm) {
    const char *m[] = {sm->name};
    sm->m_running = metric_series(d->m_running, m);
    sm->m_waiting = metric_series(d->m_waiting, m);
    sm->m_kv_bytes = metric_series(d->m_kv_bytes, m);
    sm->m_kv_use = metric_series(d->m_kv_use, m);
    sm->m_weights = metric_series(d->m_weights, m);
    sm->m_prompt_tokens = metric_series(d->m_prompt_tokens, m);
    sm->m_gen_tokens = metric_series(d->m_gen_tokens, m);
    sm->m_ttft = metric_series(d->m_ttft, m);
    sm->m_itl = metric_series(d->m_itl, m);
    sm->m_e2e = metric_series(d->m_e2e, m);
    sm->m_queue = metric_series(d->m_queue, m);
    sm->m_preemptions = metric_series(d->m_preemptions, m);
}

int served_load(struct daemon *d, const char *name, const char *path, int64_t created,
                void (*on_loaded)(struct served_model *sm, void *arg), void *on_loaded_arg) {
    struct served_model *sm = calloc(1, sizeof *sm);
    if (!sm) return -1;
    snprintf(sm->name, sizeof sm->name, "%s", name);
    snprintf(sm->path, sizeof sm->path, "%s", path);
    sm->d = d;
    sm->created = created ? created : (int64_t)time(NULL);
    sm->state = SERVED_LOADING;
    sm->refs = 2;   /* the list's and the load's */
    sm->on_loaded = on_loaded;
    sm->on_loaded_arg = on_loaded_arg;
    sm->work.data = sm;
    series_for(d, sm);
    if (uv_queue_work(&d->loop, &sm->work, load_work, load_done)) {
        free(sm);
        return -1;
    }
    sm->next = d->models;
    d->models = sm;
    log_info("loading model", "model=%s path=%s", sm->name, sm->path);
    return 0;
}

struct served_model *served_find(struct daemon *d, const char *name) {
    if (!name || !*name) {
        const char *def = d->cfg.default_model;
        if (*def) return served_find(d, def);
        return d->models && !d->models->next ? d->models : NULL;
    }
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (!strcmp(sm->name, name)) return sm;
    return NULL;
}

void served_ref(struct served_model *sm) { sm->refs++; }

static void teardown_work(uv_work_t *w) {
    struct served_model *sm = w->data;
    if (sm->sched) sched_destroy(sm->sched, 0);
    sm->sched = NULL;
    if (sm->state != SERVED_FAILED && sm->model.layers) model_free(&sm->model);
}

static void teardown_done(uv_work_t *w, int status) {
    (void)status;
    struct served_model *sm = w->data;
    struct daemon *d = sm->d;
    log_info("model unloaded", "model=%s", sm->name);
    /* Its metric series go with it, unless a model of the same name was
     * added meanwhile (it shares them). Nothing holds them now: the last
     * request ended before this teardown was scheduled. */
    int name_reused = 0;
    for (struct served_model *o = d->models; o; o = o->next) name_reused |= !strcmp(o->name, sm->name);
    if (!name_reused) metrics_drop_series(d->metrics, "model", sm->name);
    free(sm);
    d->teardowns--;
    daemon_maybe_finish(d);
}

void served_unref(struct served_model *sm) {
    if (--sm->refs > 0) return;
    /* Joining the engine thread and freeing hundreds of MB of weights
     * happens off the loop. */
    sm->work.data = sm;
    sm->d->teardowns++;
    if (uv_queue_work(&sm->d->loop, &sm->work, teardown_work, teardown_done)) {
        teardown_work(&sm->work);
        teardown_done(&sm->work, 0);
    }
}

void served_unload(struct served_model *sm) {
    struct daemon *d = sm->d;
    for (struct served_model **p = &d->models; *p; p = &(*p)->next)
        if (*p == sm) { *p = sm->next; break; }
    sm->next = NULL;
    sm->state = SERVED_UNLOADING;
    const char *labels[] = {sm->name};
    metric_set(d->m_weights, labels, 0);
    metric_set(d->m_kv_bytes, labels, 0);
    metric_set(d->m_running, labels, 0);
    metric_set(d->m_waiting, labels, 0);
    completion_cancel_model(sm);
    /* Its share of the KV budget goes back to the models that remain. */
    char err[256];
    if (d->memory_budget && !d->stopping && served_set_budget(d, d->memory_budget, err, sizeof err))
        log_warn("memory budget not re-split after a model was removed", "error=\"%s\"", err);
    served_unref(sm);   /* the list's reference; requests in flight hold theirs */
}

bool served_any_ready(struct daemon *d) {
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) return true;
    return false;
}

int served_max_context(const struct served_model *sm) {
    int train = sm->model.cfg.n_ctx_train;
    int cfg = sm->d->cfg.max_context;
    return cfg > 0 && cfg < train ? cfg : train;
}

size_t served_weight_bytes(struct daemon *d) {
    size_t total = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) total += sm->model.weight_bytes;
    return total;
}

int served_set_budget(struct daemon *d, uint64_t bytes, char *err, size_t errlen) {
    size_t weights = served_weight_bytes(d);
    int n_ready = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next) n_ready += sm->state == SERVED_READY;
    if (bytes && bytes <= weights) {
        snprintf(err, errlen, "a budget of %llu bytes cannot hold the resident weights (%zu bytes) "
                 "and any KV cache", (unsigned long long)bytes, weights);
        return -1;
    }
    size_t per_model = bytes && n_ready ? (size_t)((bytes - weights) / (uint64_t)n_ready) : 0;
    d->memory_budget = bytes;
    metric_set(d->m_budget, NULL, (double)bytes);
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) sched_set_kv_budget(sm->sched, per_model);
    return 0;
}

int served_budget_holds_a_request(struct daemon *d, uint64_t bytes, char *err, size_t errlen) {
    const size_t weights = served_weight_bytes(d);
    int n_ready = 0;
    size_t need_most = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) {
            n_ready++;
            const size_t need = sched_kv_bytes_for(sm->sched, 2);
            if (need > need_most) need_most = need;
        }
    if (!bytes || !n_ready) return 0;
    const uint64_t least = (uint64_t)weights + (uint64_t)need_most * (uint64_t)n_ready;
    if (bytes >= least) return 0;
    snprintf(err, errlen, "a budget of %llu bytes leaves %llu bytes of KV cache per model after the resident weights "
             "(%zu bytes%s), and the smallest request (one prompt token and one generated) needs %zu: give at "
             "least %llu bytes", (unsigned long long)bytes,
             (unsigned long long)(bytes > weights ? (bytes - weights) / (uint64_t)n_ready : 0), weights,
             n_ready > 1 ? ", the rest split evenly among the loaded models" : "", need_most,
             (unsigned long long)least);
    return -1;
}

void served_refresh_metrics(struct daemon *d) {
    for (struct served_model *sm = d->models; sm; sm = sm->next) {
        if (sm->state != SERVED_READY) continue;
        struct sched_stats st;
        sched_get_stats(sm->sched, &st);
        metric_series_set(sm->m_running, st.running);
        metric_series_set(sm->m_waiting, st.waiting);
        metric_series_set(sm->m_kv_bytes, (double)st.kv_allocated_bytes);
        metric_series_set(sm->m_kv_use, st.kv_budget_bytes ? (double)st.kv_reserved_bytes / (double)st.kv_budget_bytes : 0);
        metric_series_set(sm->m_weights, (double)sm->model.weight_bytes);
        metric_series_inc(sm->m_preemptions, (double)st.preemptions - metric_series_value(sm->m_preemptions));
    }
}
