/* Administration routes: the memory budget and the catalog's models.
 *
 * Every route here needs "Authorization: Bearer <admin_token>". With no token
 * configured the routes are disabled (403): an open admin API on a daemon
 * that binds beyond loopback would be a remote kill switch. Tokens are
 * compared in constant time.
 *
 * Catalog writes (SQLite commits, hashing a model file) run on libuv's work
 * pool; the loop only validates, dispatches and answers.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/bitstack.h"
#include "engine/governor.h"
#include "kernels/backend.h"
#include "server/admin_body.h"
#include "server/catalog_json.h"
#include "server/daemon.h"
#include "server/log.h"
#include "storage/catalog.h"

#define BUDGET_SETTING "memory_budget_bytes"

int admin_authorized(struct daemon *d, struct http_request *req) {
    if (!*d->cfg.admin_token) {
        http_respond_error(req, 403, "permission_error",
                           "admin routes are disabled: set admin_token (EBB_ADMIN_TOKEN) to enable them", NULL);
        return 0;
    }
    const char *auth = http_header(req, "Authorization");
    /* The scheme is case-insensitive (RFC 9110 §11.1), one or more spaces follow it. */
    const char *token = auth && !strncasecmp(auth, "Bearer ", 7) ? auth + 7 : NULL;
    while (token && *token == ' ') token++;
    if (!token || !secret_equal(token, d->cfg.admin_token)) {
        http_add_header(req, "WWW-Authenticate", "Bearer");
        http_respond_error(req, 401, "authentication_error",
                           auth ? "the admin token is not valid" : "an admin token is required (Authorization: Bearer ...)",
                           NULL);
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------ background jobs */

/* One catalog operation off the loop. The request stays valid until the
 * job answers it: the application's reference is given back only by the
 * completing http_respond* call (see server/http.h). */
struct admin_job {
    uv_work_t work;
    struct daemon *d;
    struct http_request *req;
    char name[CATALOG_NAME_MAX + 1];
    char path[4096];
    struct memory_policy policy, old_policy;   /* PUT /admin/memory: applied, and to go back to if saving fails */
    enum catalog_status status;
    struct catalog_model model;
    char err[1024];
};

static struct admin_job *job_new(struct daemon *d, struct http_request *req) {
    struct admin_job *j = calloc(1, sizeof *j);
    if (!j) {
        http_respond_error(req, 500, "server_error", "out of memory", NULL);
        return NULL;
    }
    j->d = d;
    j->req = req;
    j->work.data = j;
    return j;
}

static void job_free(struct admin_job *j) {
    catalog_model_free(&j->model);
    free(j);
}

static int status_of(enum catalog_status s) {
    switch (s) {
    case CATALOG_OK: return 200;
    case CATALOG_NOT_FOUND: return 404;
    case CATALOG_EXISTS: return 409;
    case CATALOG_INVALID: return 400;
    default: return 500;
    }
}

static const char *type_of(enum catalog_status s) {
    return s == CATALOG_NOT_FOUND ? "not_found_error" : s == CATALOG_ERROR ? "server_error" : "invalid_request_error";
}

/* ------------------------------------------------------------ memory */

/* A model's weights as the governor has them now: the configuration it
 * computes with (its own file, a packed variant, or a stack) with its bits
 * per weight and, for a BitStack, the resident part of the stack and the
 * perplexity the packer measured there; and the ladder it chooses from. */
static json_t *weights_state(const struct served_model *sm, const struct sched_stats *st) {
    const struct bitstack *s = served_stack(sm);
    uint64_t layer_params, all_params;
    served_param_counts(sm, &layer_params, &all_params);
    const struct served_variant *in_use = st->config > 0 ? &sm->variants[st->config - 1] : NULL;
    const char *kind = st->on_stack || sm->model.stack ? "bitstack" : in_use ? "packed" : "file";
    json_t *w = json_pack("{s:s, s:s, s:f}", "kind", kind, "path", in_use ? in_use->model->file.path : sm->path,
                          "bits_per_weight", (double)st->weight_bytes * 8.0 / (double)all_params);
    if (in_use) json_object_set_new(w, "variant_kind", json_string(in_use->kind));
    json_t *ladder = json_array();
    json_array_append_new(ladder, json_pack("{s:s, s:s, s:I}", "kind", sm->model.stack ? "bitstack" : "file",
                                            "path", sm->path, "weight_bytes",
                                            (json_int_t)sm->model.weight_bytes));
    for (int i = 0; i < sm->n_variants; i++) {
        const struct served_variant *v = &sm->variants[i];
        json_array_append_new(ladder, json_pack("{s:s, s:s, s:I, s:o}", "kind", v->kind, "path", v->model->file.path,
            /* a stack's weights at its least; it grows from there */
            "weight_bytes", (json_int_t)bitstack_least_weight_bytes(v->model),
            "perplexity", isnan(v->perplexity) ? json_null() : json_real(v->perplexity)));
    }
    json_object_set_new(w, "ladder", ladder);
    if (s) {   /* only the immutable parts of the stack are read here */
        const size_t blocks = bitstack_prefix_blocks(s, st->stack_bytes), n = (size_t)s->n_matrices * s->levels;
        const float ppl = bitstack_ppl_at(s, st->stack_bytes);
        json_object_set_new(w, "stack", json_pack("{s:i, s:I, s:I, s:I, s:I, s:I, s:o, s:f, s:f, s:o, s:o}",
            "levels", s->levels, "blocks_resident", (json_int_t)blocks, "blocks_total", (json_int_t)n,
            "resident_bytes", (json_int_t)st->stack_bytes, "min_bytes", (json_int_t)bitstack_min_bytes(s),
            "full_bytes", (json_int_t)bitstack_full_bytes(s),
            /* the W2G64 base the blocks sit on, always resident (null: a plain stack) */
            "base_bytes", s->base_bytes ? json_integer((json_int_t)s->base_bytes) : json_null(),
            "depth", (double)blocks / (double)s->n_matrices,
            /* the layer matrices as computed: the base and the blocks kept */
            "bits_per_weight", (double)(s->base_bytes + st->stack_bytes) * 8.0 / (double)layer_params,
            /* What the packer measured at this prefix, when the file says, and on what. */
            "perplexity", isfinite(ppl) ? json_real(ppl) : json_null(),
            "perplexity_text", s->n_checkpoints ? json_string(s->checkpoint_text) : json_null()));
    }
    return w;
}

/* The device models compute on (config `device`), with what ebb holds there
 * and what the device has free; NULL on the CPU. */
static json_t *device_state(struct daemon *d, size_t weights, size_t kv) {
    if (ebb_device_is_host(d->cfg.device)) return NULL;
    struct ebb_device_info info;
    char why[256] = "";
    json_t *dev = json_pack("{s:s, s:I, s:I}", "device", d->cfg.device, "weight_bytes", (json_int_t)weights,
                            "kv_allocated_bytes", (json_int_t)kv);
    if (ebb_device_memory(d->cfg.device, &info, why, sizeof why) == 0)
        json_object_update_new(dev, json_pack("{s:s, s:I, s:I}", "name", info.name, "total_bytes",
                                              (json_int_t)info.total_bytes, "free_bytes", (json_int_t)info.free_bytes));
    else
        json_object_set_new(dev, "unavailable", json_string(why));
    return dev;
}

static json_t *memory_state(struct daemon *d) {
    size_t reserved = 0, allocated = 0, weights = 0, device_weights = 0, device_kv = 0, kept = 0;
    json_t *models = json_array();
    for (struct served_model *sm = d->models; sm; sm = sm->next) {
        if (sm->state != SERVED_READY) continue;
        struct sched_stats st;
        sched_get_stats(sm->sched, &st);
        reserved += st.kv_reserved_bytes;
        allocated += st.kv_allocated_bytes;
        kept += st.prompt_cache_bytes;
        weights += st.weight_bytes;
        if (sm->model.placed) {
            device_weights += st.weight_bytes;
            device_kv += st.kv_allocated_bytes;
        }
        /* d->cfg does not change after start, so this is the precision
         * load_work gave the model's scheduler. */
        int kv_bits = config_kv_bits_for(&d->cfg, sm->name);
        json_array_append_new(models, json_pack("{s:s, s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:o}", "model", sm->name,
                                                "device", sm->model.placed ? d->cfg.device : "cpu",
                                                "kv_bits", kv_bits, "weight_bytes", (json_int_t)st.weight_bytes,
                                                "share_bytes", (json_int_t)st.memory_share, "kv_budget_bytes",
                                                (json_int_t)st.kv_budget_bytes, "kv_reserved_bytes",
                                                (json_int_t)st.kv_reserved_bytes, "kv_allocated_bytes",
                                                (json_int_t)st.kv_allocated_bytes, "prompt_cache_bytes",
                                                (json_int_t)st.prompt_cache_bytes, "weights", weights_state(sm, &st)));
    }
    /* The host's share of what is governed: device memory is not in the RSS. */
    const uint64_t rss = memory_process_rss();
    const uint64_t governed = (uint64_t)(weights - device_weights) + (allocated - device_kv);
    json_t *state = json_pack("{s:I, s:s, s:I, s:I, s:I, s:I, s:I, s:{s:I, s:I, s:I}, s:o}", "memory_budget_bytes",
                              (json_int_t)d->memory_budget, "mode",
                              d->memory.automatic ? "auto" : d->memory_budget ? "fixed" : "none", "minimum_bytes",
                              (json_int_t)served_memory_minimum(d), "weight_bytes", (json_int_t)weights,
                              "kv_reserved_bytes", (json_int_t)reserved, "kv_allocated_bytes", (json_int_t)allocated,
                              "prompt_cache_bytes", (json_int_t)kept, "resident", "weights",
                              (json_int_t)(weights - device_weights), "kv", (json_int_t)(allocated - device_kv),
                              "scratch_and_other", (json_int_t)(rss > governed ? rss - governed : 0), "models", models);
    json_t *device = device_state(d, device_weights, device_kv);
    if (device) json_object_set_new(state, "device", device);
    if (d->memory.automatic)
        json_object_set_new(state, "auto", json_pack("{s:I, s:I, s:s?}", "reserve_bytes",
                                                     (json_int_t)d->memory.reserve_bytes, "free_bytes",
                                                     (json_int_t)d->memory_free_bytes, "free_source",
                                                     d->memory_free_source));
    return state;
}

void route_admin_memory_get(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    respond_json(req, 200, memory_state(d));
}

static void persist_budget_work(uv_work_t *w) {
    struct admin_job *j = w->data;
    char text[48];
    memory_policy_format(&j->policy, text, sizeof text);
    j->status = catalog_setting_set(j->d->catalog, BUDGET_SETTING, text, j->err, sizeof j->err);
}

/* A budget that could not be saved is not kept: an error answer means
 * nothing changed. Back to the old policy, unless another PUT has set one
 * since. */
static void restore_budget(struct daemon *d, const struct memory_policy *applied, const struct memory_policy *old) {
    char why[512];
    if (!memcmp(&d->memory, applied, sizeof *applied) && memory_apply(d, old, why, sizeof why))
        log_warn("cannot restore the previous memory budget", "error=\"%s\"", why);
}

static void persist_budget_done(uv_work_t *w, int status) {
    (void)status;
    struct admin_job *j = w->data;
    struct daemon *d = j->d;
    char text[48];
    memory_policy_format(&j->policy, text, sizeof text);
    if (j->status != CATALOG_OK) {
        restore_budget(d, &j->policy, &j->old_policy);
        log_error("cannot persist the memory budget", "error=\"%s\"", j->err);
        char msg[sizeof j->err + 96];
        snprintf(msg, sizeof msg, "the memory budget was not changed (it stays %llu bytes): %s",
                 (unsigned long long)d->memory_budget, j->err);
        http_respond_error(j->req, 500, "server_error", msg, NULL);
    } else {
        log_info("memory budget set", "budget=%s bytes=%llu", text, (unsigned long long)d->memory_budget);
        respond_json(j->req, 200, memory_state(d));
    }
    job_free(j);
}

void route_admin_memory_put(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    struct memory_policy p;
    struct admin_body_error e;
    const char *key;
    if (admin_parse_memory(req->body, req->body_len, d->cfg.memory_reserve_bytes, &p, &key, &e)) {
        http_respond_error(req, 400, "invalid_request_error", e.message, *e.param ? e.param : NULL);
        return;
    }
    const char *param = p.automatic ? "reserve_bytes" : key;
    char err[768];
    /* More than the process can ever have is a typo, not a budget: the
     * kernel would end the daemon before the governor shrank anything. */
    uint64_t total;
    if (!governor_total_memory("", &total) && (p.automatic ? p.reserve_bytes >= total : p.bytes > total)) {
        snprintf(err, sizeof err, p.automatic ? "a reserve of %llu bytes leaves nothing of the %llu bytes this "
                                                "process can have (MemTotal, or its cgroup's memory.max)"
                                              : "a budget of %llu bytes is more than the %llu bytes this process can "
                                                "have (MemTotal, or its cgroup's memory.max)",
                 (unsigned long long)(p.automatic ? p.reserve_bytes : p.bytes), (unsigned long long)total);
        http_respond_error(req, 400, "invalid_request_error", err, param);
        return;
    }
    /* Apply first: a budget the models cannot live with is refused before
     * anything is saved, and changes nothing. */
    const struct memory_policy old = d->memory;
    if (memory_apply(d, &p, err, sizeof err)) {
        http_respond_error_code(req, 409, "invalid_request_error", "memory_budget_too_small", err, param);
        return;
    }
    struct admin_job *j = job_new(d, req);
    if (!j) { restore_budget(d, &p, &old); return; }
    j->policy = p;
    j->old_policy = old;
    if (uv_queue_work(&d->loop, &j->work, persist_budget_work, persist_budget_done)) {
        restore_budget(d, &p, &old);
        http_respond_error(req, 500, "server_error", "cannot queue the catalog write", NULL);
        job_free(j);
    }
}

/* ------------------------------------------------------------ models */

static const char *state_name(enum served_state s) {
    switch (s) {
    case SERVED_LOADING: return "loading";
    case SERVED_READY: return "ready";
    case SERVED_FAILED: return "failed";
    default: return "unloading";
    }
}

/* The catalog's description (as `ebb models list --json`) plus whether and
 * how it is being served. */
static json_t *model_json(struct daemon *d, const struct catalog_model *m) {
    char err[256];
    json_t *o = catalog_model_json(d->catalog, m, err, sizeof err);
    if (!o) return json_pack("{s:s, s:s}", "name", m->name, "error", err);
    struct served_model *sm = served_find(d, m->name);
    json_object_set_new(o, "sha256", m->source_sha256 ? json_string(m->source_sha256) : json_null());
    json_object_set_new(o, "state", json_string(sm ? state_name(sm->state) : "not_loaded"));
    if (sm && sm->state == SERVED_FAILED) json_object_set_new(o, "error", json_string(sm->error));
    return o;
}

void route_admin_models_get(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    struct catalog_model *list = NULL;
    size_t n = 0;
    char err[512];
    if (catalog_model_list(d->catalog, &list, &n, err, sizeof err) != CATALOG_OK) {
        http_respond_error(req, 500, "server_error", err, NULL);
        return;
    }
    json_t *data = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(data, model_json(d, &list[i]));
    catalog_model_list_free(list, n);
    respond_json(req, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

static void add_model_work(uv_work_t *w) {
    struct admin_job *j = w->data;
    j->status = catalog_model_add(j->d->catalog, j->path, *j->name ? j->name : NULL, &j->model, j->err, sizeof j->err);
}

static void unregister_work(uv_work_t *w) {
    struct admin_job *j = w->data;
    char err[512];
    j->status = catalog_model_remove(j->d->catalog, j->model.name, err, sizeof err);
    if (j->status != CATALOG_OK)
        snprintf(j->err + strlen(j->err), sizeof j->err - strlen(j->err), " (and removing its registration failed: %s)",
                 err);
}

static void unregister_done(uv_work_t *w, int status) {
    (void)status;
    struct admin_job *j = w->data;
    http_respond_error_code(j->req, 409, "invalid_request_error", "memory_budget_exceeded", j->err, "path");
    job_free(j);
}

/* The answer to POST /admin/models waits for the load, so the client learns
 * whether the model serves. One the memory budget cannot take is refused
 * with 409 and left out of the catalog: nothing changed. */
static void model_loaded(struct served_model *sm, void *arg) {
    struct admin_job *j = arg;
    if (!sm->over_budget) {
        respond_json(j->req, 201, model_json(j->d, &j->model));
        job_free(j);
        return;
    }
    snprintf(j->err, sizeof j->err, "%s", sm->error);
    served_unload(sm);
    if (uv_queue_work(&j->d->loop, &j->work, unregister_work, unregister_done)) unregister_done(&j->work, 0);
}

static void add_model_done(uv_work_t *w, int status) {
    (void)status;
    struct admin_job *j = w->data;
    if (j->status != CATALOG_OK) {
        http_respond_error(j->req, status_of(j->status), type_of(j->status), j->err, j->status == CATALOG_EXISTS ? "name" : "path");
    } else {
        log_info("model registered", "model=%s path=%s", j->model.name, j->model.source_path);
        if (!j->d->stopping &&
            !served_load(j->d, j->model.name, j->model.source_path, j->model.created_at, model_loaded, j))
            return;   /* model_loaded answers */
        respond_json(j->req, 201, model_json(j->d, &j->model));
    }
    job_free(j);
}

void route_admin_models_post(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    char path[sizeof ((struct admin_job *)0)->path], name[CATALOG_NAME_MAX + 1];
    struct admin_body_error e;
    if (admin_parse_model_add(req->body, req->body_len, path, sizeof path, name, sizeof name, &e)) {
        http_respond_error(req, 400, "invalid_request_error", e.message, *e.param ? e.param : NULL);
        return;
    }
    struct admin_job *j = job_new(d, req);
    if (!j) return;
    memcpy(j->path, path, strlen(path) + 1);
    memcpy(j->name, name, strlen(name) + 1);
    if (uv_queue_work(&d->loop, &j->work, add_model_work, add_model_done)) {
        http_respond_error(req, 500, "server_error", "cannot queue the catalog write", NULL);
        job_free(j);
    }
}

static void remove_model_work(uv_work_t *w) {
    struct admin_job *j = w->data;
    j->status = catalog_model_remove(j->d->catalog, j->name, j->err, sizeof j->err);
}

static void remove_model_done(uv_work_t *w, int status) {
    (void)status;
    struct admin_job *j = w->data;
    if (j->status != CATALOG_OK) {
        http_respond_error(j->req, status_of(j->status), type_of(j->status), j->err, NULL);
    } else {
        struct served_model *sm = served_find(j->d, j->name);
        if (sm) served_unload(sm);
        log_info("model removed", "model=%s", j->name);
        respond_json(j->req, 200, json_pack("{s:s, s:s, s:b}", "name", j->name, "object", "model", "deleted", 1));
    }
    job_free(j);
}

void route_admin_models_delete(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    char name[256], err[256];
    if (http_path_segment(req, "/admin/models/", name, sizeof name)) {
        http_respond_error(req, 400, "invalid_request_error",
                           "the model name in the path is not one path segment of at most 255 bytes "
                           "(percent-escapes must be valid and not %00)", "name");
        return;
    }
    if (catalog_name_check(name, err, sizeof err)) {
        http_respond_error(req, 400, "invalid_request_error", err, "name");
        return;
    }
    struct admin_job *j = job_new(d, req);
    if (!j) return;
    memcpy(j->name, name, strlen(name) + 1);   /* catalog_name_check bounds it to fit */
    if (uv_queue_work(&d->loop, &j->work, remove_model_work, remove_model_done)) {
        http_respond_error(req, 500, "server_error", "cannot queue the catalog write", NULL);
        job_free(j);
    }
}
