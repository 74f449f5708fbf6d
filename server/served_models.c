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
 * The memory budget covers resident weights plus KV caches. The governor's
 * arithmetic (engine/governor.h) splits it into a share per model; each
 * model's scheduler keeps its KV and, for a BitStack file, its stack prefix
 * inside its share. Shares are recomputed whenever the budget or the set of
 * models changes, and on every "auto" reading (routes_admin.c).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/bitstack.h"
#include "engine/governor.h"
#include "engine/grammar.h"
#include "kernels/backend.h"
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

static int same_shape(const struct model_config *a, const struct model_config *b) {
    return !strcmp(a->arch, b->arch) && a->n_layer == b->n_layer && a->n_embd == b->n_embd &&
           a->n_head == b->n_head && a->n_head_kv == b->n_head_kv && a->head_dim == b->head_dim &&
           a->n_ff == b->n_ff && a->n_vocab == b->n_vocab && a->rope_dim == b->rope_dim &&
           a->rope_base == b->rope_base && a->rope_style == b->rope_style;
}

/* A variant that can stand in for its model: its weights used in place
 * from the file (a w4a16 file is dequantized to f32 copies at load, which
 * could not give their memory back). */
static int ladder_kind(const char *kind) { return strncmp(kind, "w4a16", 5) != 0; }

static void free_variants(struct served_model *sm) {
    for (int i = 0; i < sm->n_variants; i++) {
        model_free(sm->variants[i].model);
        free(sm->variants[i].model);
    }
    sm->n_variants = 0;
}

/* Why a loaded variant cannot stand in for the model, or NULL. */
static const char *variant_problem(const struct model *v, const struct model *m, int is_stack) {
    if (!same_shape(&v->cfg, &m->cfg)) return "its shape is not the model's";
    if (!v->stack != !is_stack) return is_stack ? "it is not a bitstack file" : "it is a bitstack file";
    if (!is_stack && v->weight_bytes >= m->weight_bytes) return "it is not smaller than the model";
    return NULL;
}

static int by_weight_bytes_down(const void *a, const void *b) {
    const struct served_variant *x = a, *y = b;
    const size_t p = x->model->weight_bytes, q = y->model->weight_bytes;
    return p > q ? -1 : p < q;
}

/* The model's ladder (engine/governor.h): the variants the catalog has of
 * it (ebb pack registers them) that can stand in for it, loaded (mapped;
 * their pages are read when first used). A packed file is a rung when it
 * is smaller than the rung above it and no smaller rung measured a
 * perplexity as good; a BitStack is the bottom (the newest, when there are
 * several) when its least is below the smallest packed rung. A variant
 * that cannot be used is left out with a warning; the model is served
 * either way. None when weights are f32 (dense copies cannot give memory
 * back) or the model is a stack itself. */
static void load_variants(struct daemon *d, struct served_model *sm) {
    sm->n_variants = 0;
    if (d->cfg.weights != MODEL_WEIGHTS_NATIVE || sm->model.stack) return;
    char err[1024];
    struct catalog_model row;
    if (catalog_model_get(d->catalog, sm->name, &row, err, sizeof err) != CATALOG_OK) return;
    struct catalog_variant *v = NULL;
    size_t n = 0;
    const enum catalog_status st = catalog_variant_list(d->catalog, row.id, &v, &n, err, sizeof err);
    catalog_model_free(&row);
    if (st != CATALOG_OK) return;
    struct served_variant packed[SCHED_MAX_VARIANTS], stack = {0};
    int n_packed = 0;
    for (size_t i = n; i-- > 0;) {   /* ordered by id: newest first */
        const int is_stack = !strcmp(v[i].kind, "bitstack");
        if (!ladder_kind(v[i].kind)) {
            log_info("variant not used", "model=%s kind=%s path=%s error=\"its weights are dequantized at load\"",
                     sm->name, v[i].kind, v[i].path);
            continue;
        }
        if (is_stack && stack.model) continue;   /* an older stack: the newest is used */
        if (!is_stack && n_packed == SCHED_MAX_VARIANTS - 1) {
            log_warn("variant not used", "model=%s kind=%s path=%s error=\"more than %d packed variants\"", sm->name,
                     v[i].kind, v[i].path, SCHED_MAX_VARIANTS - 1);
            continue;
        }
        struct model *m = calloc(1, sizeof *m);
        const char *problem = !m ? "out of memory"
                              : model_load(m, v[i].path, MODEL_WEIGHTS_NATIVE, err, sizeof err) ? err : NULL;
        const int loaded = m && !problem;
        if (loaded) problem = variant_problem(m, &sm->model, is_stack);
        if (problem) {
            log_warn("variant not used", "model=%s kind=%s path=%s error=\"%s\"", sm->name, v[i].kind, v[i].path,
                     problem);
            if (loaded) model_free(m);
            free(m);
            continue;
        }
        struct served_variant sv = {.model = m, .perplexity = v[i].has_perplexity ? v[i].perplexity : NAN};
        snprintf(sv.kind, sizeof sv.kind, "%s", v[i].kind);
        if (is_stack) stack = sv;
        else packed[n_packed++] = sv;
    }
    catalog_variant_list_free(v, n);
    /* Largest first; a rung must be smaller than the one above it and
     * better measured than every smaller one. */
    qsort(packed, (size_t)n_packed, sizeof *packed, by_weight_bytes_down);
    double best_below = INFINITY;
    for (int i = n_packed; i-- > 0;) {
        struct served_variant *pv = &packed[i];
        const int same_size = i > 0 && packed[i - 1].model->weight_bytes == pv->model->weight_bytes;
        const int dominated = !isnan(pv->perplexity) && pv->perplexity >= best_below;
        if (dominated || same_size) {
            log_warn("variant not used", "model=%s kind=%s path=%s error=\"%s\"", sm->name, pv->kind,
                     pv->model->file.path, dominated ? "a smaller variant measured as well" : "another is the same size");
            model_free(pv->model);
            free(pv->model);
            pv->model = NULL;
        } else if (!isnan(pv->perplexity)) {
            best_below = pv->perplexity;
        }
    }
    for (int i = 0; i < n_packed; i++)
        if (packed[i].model) sm->variants[sm->n_variants++] = packed[i];
    if (stack.model) {
        const size_t above = sm->n_variants ? sm->variants[sm->n_variants - 1].model->weight_bytes
                                            : sm->model.weight_bytes;
        if (bitstack_least_weight_bytes(stack.model) < above) {
            sm->variants[sm->n_variants++] = stack;
        } else {
            log_warn("variant not used", "model=%s kind=bitstack path=%s error=\"its least is not below a packed "
                     "variant\"", sm->name, stack.model->file.path);
            model_free(stack.model);
            free(stack.model);
        }
    }
    for (int i = 0; i < sm->n_variants; i++)
        log_info("variant loaded", "model=%s kind=%s path=%s weight_bytes=%zu least_bytes=%zu", sm->name,
                 sm->variants[i].kind, sm->variants[i].model->file.path, sm->variants[i].model->weight_bytes,
                 bitstack_least_weight_bytes(sm->variants[i].model));
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
        .draft_always = d->cfg.draft_policy == CONFIG_DRAFT_ALWAYS,
        .prompt_cache_bytes = d->cfg.prompt_cache_bytes,
    };
    const char *kv_problem = kv_bits_problem(&sm->model.cfg, sc.kv_bits);
    if (kv_problem) {
        snprintf(sm->error, sizeof sm->error, "kv_bits %d: %s", sc.kv_bits, kv_problem);
        model_free(&sm->model);
        return;
    }
    char why[400];
    if (model_use_device(&sm->model, d->cfg.device, why, sizeof why)) {
        snprintf(sm->error, sizeof sm->error, "device %s: %s", d->cfg.device, why);
        model_free(&sm->model);
        return;
    }
    /* The governor's ladder (packed variants, a BitStack stack) is host
     * memory; a model on a device keeps the file it was loaded from. */
    if (sm->model.placed)
        log_info("model placed", "model=%s device=%s backend=\"%s\" variants=\"not used on a device\" "
                 "context_compression=\"not on a device\"", sm->name, d->cfg.device, sm->model.be->name);
    else
        load_variants(d, sm);
    for (int i = 0; i < sm->n_variants; i++) sc.variants[i] = sm->variants[i].model;
    sc.n_variants = sm->n_variants;
    sm->sched = sched_create(&sm->model, &sc);
    if (!sm->sched) {
        snprintf(sm->error, sizeof sm->error, "cannot start the engine thread");
        free_variants(sm);
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
        if (served_budget_check(d, d->memory_budget, err, sizeof err)) {
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
            free_variants(sm);
            model_free(&sm->model);
        } else {
            const char *labels[] = {sm->name};
            metric_set(d->m_weights, labels, (double)sm->model.weight_bytes);   /* the engine has not fitted yet */
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
    sm->m_stack_blocks = metric_series(d->m_stack_blocks, m);
    sm->m_bpw = metric_series(d->m_bpw, m);
    const char *grow[] = {sm->name, "grow"}, *shrink[] = {sm->name, "shrink"};
    sm->m_grows = metric_series(d->m_weight_changes, grow);
    sm->m_shrinks = metric_series(d->m_weight_changes, shrink);
    sm->m_bytes_loaded = metric_series(d->m_bytes_loaded, m);
    sm->m_bytes_freed = metric_series(d->m_bytes_freed, m);
    sm->m_swap = metric_series(d->m_swap, m);
    sm->m_pc_hits = metric_series(d->m_pc_hits, m);
    sm->m_pc_tokens = metric_series(d->m_pc_tokens, m);
    sm->m_pc_evictions = metric_series(d->m_pc_evictions, m);
    sm->m_pc_entries = metric_series(d->m_pc_entries, m);
    sm->m_pc_bytes = metric_series(d->m_pc_bytes, m);
    static const char *const tiers[3] = {"kept", "demoted", "dropped"};
    for (int mode = COMPRESS_DEMOTE; mode <= COMPRESS_DROP; mode++) {
        const char *mm[] = {sm->name, compress_mode_name((enum compress_mode)mode)};
        sm->m_cmp_requests[mode] = metric_series(d->m_cmp_requests, mm);
        sm->m_cmp_saved[mode] = metric_series(d->m_cmp_saved, mm);
        sm->m_cmp_seconds[mode] = metric_series(d->m_cmp_seconds, mm);
        for (int t = 0; t < 3; t++) {
            const char *mt[] = {sm->name, compress_mode_name((enum compress_mode)mode), tiers[t]};
            sm->m_cmp_tokens[mode][t] = metric_series(d->m_cmp_tokens, mt);
        }
    }
    const char *spec[] = {sm->name, draft_source_name(DRAFT_NGRAM)};
    sm->m_drafts = metric_series(d->m_drafts, spec);
    sm->m_draft_tokens = metric_series(d->m_draft_tokens, spec);
    sm->m_accepted = metric_series(d->m_accepted, spec);
    sm->m_accepted_mean = metric_series(d->m_accepted_mean, spec);
    for (int i = 0; i < DRAFT_MAX; i++) {
        char pos[16];
        snprintf(pos, sizeof pos, "%d", i);
        const char *at[] = {sm->name, draft_source_name(DRAFT_NGRAM), pos};
        sm->m_accepted_at[i] = metric_series(d->m_accepted_at, at);
    }
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
    free_variants(sm);
    grammar_vocab_free(sm->grammar_vocab);
    sm->grammar_vocab = NULL;
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

static const char *vocab_piece(void *ud, int32_t id, size_t *len) {
    return tokenizer_piece(((const struct model *)ud)->tok, id, len);
}
static int vocab_is_end(void *ud, int32_t id) { return generate_is_end_token(ud, id); }
static int vocab_is_special(void *ud, int32_t id) { return tokenizer_is_control(((const struct model *)ud)->tok, id); }

const struct grammar_vocab *served_grammar_vocab(struct served_model *sm) {
    if (!sm->grammar_vocab) {
        const double t0 = ebb_now_seconds();
        sm->grammar_vocab = grammar_vocab_new(sm->model.cfg.n_vocab, vocab_piece, vocab_is_end, vocab_is_special,
                                              &sm->model);
        if (sm->grammar_vocab)
            log_info("grammar vocabulary built", "model=%s ms=%.1f", sm->name, (ebb_now_seconds() - t0) * 1e3);
    }
    return sm->grammar_vocab;
}

int served_max_context(const struct served_model *sm) {
    int train = sm->model.cfg.n_ctx_train;
    int cfg = sm->d->cfg.max_context;
    return cfg > 0 && cfg < train ? cfg : train;
}

size_t served_weight_bytes(struct daemon *d) {
    size_t total = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) {
            struct sched_stats st;
            sched_get_stats(sm->sched, &st);
            total += st.weight_bytes;
        }
    return total;
}

/* The governor's view of the READY models, in list order: a new array
 * (count in *n; NULL with *n = 0 when there are none or memory is short). */
static struct governor_model *governed(struct daemon *d, int *n) {
    *n = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next) *n += sm->state == SERVED_READY;
    struct governor_model *gm = *n ? calloc((size_t)*n, sizeof *gm) : NULL;
    if (!gm) { *n = 0; return NULL; }
    int i = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) sched_governor_model(sm->sched, &gm[i++]);
    return gm;
}

uint64_t served_memory_minimum(struct daemon *d) {
    int n;
    struct governor_model *gm = governed(d, &n);
    const uint64_t least = governor_minimum(gm, n);
    free(gm);
    return least;
}

/* served_budget_check on the governor's view of the models. */
static int budget_problem(const struct governor_model *gm, int n, uint64_t bytes, char *err, size_t errlen) {
    const uint64_t least = governor_minimum(gm, n);
    if (!bytes || bytes >= least) return 0;
    uint64_t fixed = 0, stack = 0;
    for (int i = 0; i < n; i++) {
        fixed += gm[i].fixed_bytes;
        stack += gm[i].stack_min_bytes;
    }
    const uint64_t kv = least - fixed - stack;
    snprintf(err, errlen, "a budget of %llu bytes is below the least the served models need: %llu bytes of weights "
             "that cannot shrink, %llu bytes for the least BitStack prefix (one level of every matrix; none on a base), "
             "and %llu bytes of KV cache (what "
             "running requests hold, or at least the smallest request: one prompt token and one generated); give at "
             "least %llu bytes", (unsigned long long)bytes, (unsigned long long)fixed, (unsigned long long)stack,
             (unsigned long long)kv, (unsigned long long)least);
    return -1;
}

int served_budget_check(struct daemon *d, uint64_t bytes, char *err, size_t errlen) {
    int n;
    struct governor_model *gm = governed(d, &n);
    const int rc = budget_problem(gm, n, bytes, err, errlen);
    free(gm);
    return rc;
}

int served_set_budget(struct daemon *d, uint64_t bytes, char *err, size_t errlen) {
    int n;
    struct governor_model *gm = governed(d, &n);
    if (budget_problem(gm, n, bytes, err, errlen)) {
        free(gm);
        return -1;
    }
    uint64_t *share = n ? calloc((size_t)n, sizeof *share) : NULL;
    if (n && !share) {
        free(gm);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    governor_split(bytes, gm, n, share);
    d->memory_budget = bytes;
    metric_set(d->m_budget, NULL, (double)bytes);
    int i = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) sched_set_memory(sm->sched, share[i++]);
    free(share);
    free(gm);
    return 0;
}

const struct bitstack *served_stack(const struct served_model *sm) {
    if (sm->model.stack) return sm->model.stack;
    return sm->n_variants ? sm->variants[sm->n_variants - 1].model->stack : NULL;
}

void served_param_counts(const struct served_model *sm, uint64_t *layer, uint64_t *all) {
    const struct model *m = &sm->model;
    const struct model_config *c = &m->cfg;
    *layer = 0;
    for (int k = 0; k < BITSTACK_KINDS; k++) {
        int rows, cols;
        bitstack_kind_shape(c, (enum bitstack_kind)k, &rows, &cols);
        *layer += (uint64_t)rows * (uint64_t)cols * (uint64_t)c->n_layer;
    }
    /* The embedding, and the head unless it is the embedding's rows. */
    const int tied = m->output.data == m->embd.data && !m->output.stack;
    *all = *layer + (uint64_t)c->n_vocab * (uint64_t)c->n_embd * (tied ? 1u : 2u);
}

/* Counters kept by the engine advance by the difference since the last
 * scrape. */
static void advance(struct metric_series *s, uint64_t total) {
    metric_series_inc(s, (double)total - metric_series_value(s));
}

void served_refresh_metrics(struct daemon *d) {
    uint64_t weights = 0, kv = 0, device_weights = 0, device_kv = 0;   /* host's and GPU's */
    for (struct served_model *sm = d->models; sm; sm = sm->next) {
        if (sm->state != SERVED_READY) continue;
        struct sched_stats st;
        sched_get_stats(sm->sched, &st);
        *(sm->model.placed ? &device_weights : &weights) += st.weight_bytes;
        *(sm->model.placed ? &device_kv : &kv) += st.kv_allocated_bytes;
        uint64_t layer, all;
        served_param_counts(sm, &layer, &all);
        metric_series_set(sm->m_bpw, (double)st.weight_bytes * 8.0 / (double)all);
        const struct bitstack *stack = served_stack(sm);
        if (stack) metric_series_set(sm->m_stack_blocks, (double)bitstack_prefix_blocks(stack, st.stack_bytes));
        advance(sm->m_grows, st.stack_grows);
        advance(sm->m_shrinks, st.stack_shrinks);
        advance(sm->m_bytes_loaded, st.stack_bytes_loaded);
        advance(sm->m_bytes_freed, st.stack_bytes_freed);
        double swaps[64];
        const int n = sched_take_swap_times(sm->sched, swaps, 64);
        for (int i = 0; i < n; i++) metric_series_observe(sm->m_swap, swaps[i]);
        metric_series_set(sm->m_running, st.running);
        metric_series_set(sm->m_waiting, st.waiting);
        metric_series_set(sm->m_kv_bytes, (double)st.kv_allocated_bytes);
        metric_series_set(sm->m_kv_use, st.kv_budget_bytes ? (double)st.kv_reserved_bytes / (double)st.kv_budget_bytes : 0);
        metric_series_set(sm->m_weights, (double)st.weight_bytes);
        advance(sm->m_preemptions, st.preemptions);
        advance(sm->m_pc_hits, st.prompt_cache_hits);
        advance(sm->m_pc_tokens, st.prompt_cache_tokens);
        advance(sm->m_pc_evictions, st.prompt_cache_evictions);
        metric_series_set(sm->m_pc_entries, st.prompt_cache_entries);
        metric_series_set(sm->m_pc_bytes, (double)st.prompt_cache_bytes);
        advance(sm->m_drafts, st.drafts);
        advance(sm->m_draft_tokens, st.draft_tokens);
        advance(sm->m_accepted, st.accepted_tokens);
        for (int i = 0; i < DRAFT_MAX; i++) advance(sm->m_accepted_at[i], st.accepted_at[i]);
        metric_series_set(sm->m_accepted_mean, st.drafts ? (double)st.accepted_tokens / (double)st.drafts : 0);
        for (int mode = COMPRESS_DEMOTE; mode <= COMPRESS_DROP; mode++) {
            const struct sched_compress_stats *c = &st.compress[mode];
            advance(sm->m_cmp_requests[mode], c->requests);
            advance(sm->m_cmp_saved[mode], c->bytes_saved);
            advance(sm->m_cmp_tokens[mode][0], c->kept);
            advance(sm->m_cmp_tokens[mode][1], c->demoted);
            advance(sm->m_cmp_tokens[mode][2], c->dropped);
        }
    }
    const uint64_t rss = memory_process_rss();
    const char *w[] = {"weights"}, *k[] = {"kv"}, *o[] = {"scratch_and_other"};
    metric_set(d->m_resident, w, (double)weights);
    metric_set(d->m_resident, k, (double)kv);
    metric_set(d->m_resident, o, rss > weights + kv ? (double)(rss - weights - kv) : 0);
    metric_set(d->m_minimum, NULL, (double)served_memory_minimum(d));
    struct ebb_device_info info;
    char why[256];
    if (!ebb_device_is_host(d->cfg.device) && ebb_device_memory(d->cfg.device, &info, why, sizeof why) == 0) {
        const char *dw[] = {"weights"}, *dk[] = {"kv"}, *df[] = {"free"}, *dt[] = {"total"};
        metric_set(d->m_device, dw, (double)device_weights);
        metric_set(d->m_device, dk, (double)device_kv);
        metric_set(d->m_device, df, (double)info.free_bytes);
        metric_set(d->m_device, dt, (double)info.total_bytes);
    }
}
