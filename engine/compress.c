/* Context compression: SnapKV scores, the selection, and the call into the
 * cache's compaction; see compress.h for the design. */
#include "engine/compress.h"

#include <assert.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/backend.h"

struct compress_params compress_defaults(void) {
    return (struct compress_params){
        .mode = COMPRESS_OFF, .select = COMPRESS_SNAPKV, .budget = 0.25f, .low_budget = -1,
        .min_prompt = COMPRESS_MIN_PROMPT, .low_key_bits = 4, .lookahead = COMPRESS_LOOKAHEAD};
}

const char *const compress_mode_names[] = {[COMPRESS_OFF] = "off", [COMPRESS_DEMOTE] = "demote",
                                           [COMPRESS_DROP] = "drop", NULL};
const char *const compress_select_names[] = {[COMPRESS_SNAPKV] = "snapkv", [COMPRESS_SNAPKV_HEAD] = "snapkv_head",
                                             [COMPRESS_RANDOM] = "random", [COMPRESS_RECENT] = "recent",
                                             [COMPRESS_RECONSTRUCT] = "reconstruct", NULL};

static int name_index(const char *const *names, const char *s) {
    for (int i = 0; s && names[i]; i++)
        if (strcmp(s, names[i]) == 0) return i;
    return -1;
}

int compress_mode_parse(const char *s) { return name_index(compress_mode_names, s); }

int compress_select_parse(const char *s) { return name_index(compress_select_names, s); }

const char *compress_mode_name(enum compress_mode m) {
    return (unsigned)m <= COMPRESS_DROP ? compress_mode_names[m] : "?";
}

int compress_point(const struct compress_params *p, int n_prompt) {
    return p->at > 0 && p->at < n_prompt ? p->at : n_prompt;
}

int compress_window(const struct compress_params *p, int at) {
    for (int i = 0; i < p->n_earlier; i++)
        if (p->earlier[i].at == at) return p->earlier[i].window > 0 ? p->earlier[i].window : COMPRESS_WINDOW;
    return p->window > 0 && p->window < COMPRESS_WINDOW ? p->window : COMPRESS_WINDOW;
}

int compress_next_point(const struct compress_params *p, int n_prompt, int from) {
    for (int i = 0; i < p->n_earlier; i++)
        if (p->earlier[i].at - compress_window(p, p->earlier[i].at) >= from) return p->earlier[i].at;
    const int last = compress_point(p, n_prompt);
    return last - compress_window(p, last) >= from ? last : 0;
}

int compress_wanted(const struct compress_params *p, int n_prompt) {
    return p->mode != COMPRESS_OFF && n_prompt >= p->min_prompt && n_prompt >= 2 * KV_PAGE_TOKENS + COMPRESS_WINDOW;
}

/* Whether a selection ranks rows by scores (the others ignore them). */
static int scoring(enum compress_select s) {
    return s == COMPRESS_SNAPKV || s == COMPRESS_SNAPKV_HEAD || s == COMPRESS_RECONSTRUCT;
}

/* The lookahead's length at point `at`: as asked, no further than the
 * context, and no longer than one pass the cache's window can take (the
 * lookahead's passes keep the point's window pages, kv_cache_hold_window). */
int compress_lookahead_tokens(const struct compress_params *p) {
    if (!scoring(p->select)) return 0;   /* nothing scores */
    return p->lookahead <= 0 ? 0 : p->lookahead < COMPRESS_MAX_LOOKAHEAD ? p->lookahead : COMPRESS_MAX_LOOKAHEAD;
}

/* Where a recording's compression point is: its window's end. */
static int recording_point(const struct kv_observation *o) { return o->from + o->n - o->past; }

static int lookahead_at(const struct compress_params *p, const struct kv_cache *kv, int at) {
    int n = compress_lookahead_tokens(p);
    if (n > kv->n_ctx - at) n = kv->n_ctx - at;
    if (n > kv_cache_max_pass(kv)) n = kv_cache_max_pass(kv);
    return n > 0 ? n : 0;
}

int compress_lookahead_reach(const struct compress_params *p, int n_prompt) {
    const int first = p->n_earlier > 0 ? p->earlier[0].at : compress_point(p, n_prompt);
    const int ahead = p->select == COMPRESS_RECONSTRUCT ? COMPRESS_RECONSTRUCT_PASS : compress_lookahead_tokens(p);
    return ahead > 0 && compress_wanted(p, compress_point(p, n_prompt)) ? first + ahead : 0;
}

int compress_context(const struct compress_params *p, int n_prompt, int n_ctx, int n_max) {
    int reach = compress_lookahead_reach(p, n_prompt);
    if (reach > n_max) reach = n_max;
    return reach > n_ctx ? reach : n_ctx;
}

size_t compress_observation_bytes(const struct model_config *cfg, const struct compress_params *p, int n_prompt) {
    if (!compress_wanted(p, n_prompt)) return 0;
    const int q_dim = cfg->n_head * cfg->head_dim;
    if (p->select == COMPRESS_RECONSTRUCT)   /* a pass is longer than a lookahead */
        return kv_observation_bytes(cfg->n_layer, COMPRESS_WINDOW + COMPRESS_RECONSTRUCT_PASS, q_dim,
                                    (size_t)cfg->n_layer * cfg->n_head_kv * (size_t)n_prompt);
    return kv_observation_bytes(cfg->n_layer, COMPRESS_WINDOW + compress_lookahead_tokens(p), q_dim, 0);
}

/* The longest reconstruction pass a cache can take past point `at`: what
 * one pass may append with the point's window held, and what the context
 * has room for; 0 when that is too short to be worth a cue. */
static int reconstruct_pass_at(const struct kv_cache *kv, int at) {
    int n = COMPRESS_RECONSTRUCT_PASS;
    if (n > kv_cache_max_pass(kv)) n = kv_cache_max_pass(kv);
    if (n > kv->n_ctx - at) n = kv->n_ctx - at;
    return n >= 4 * COMPRESS_RECONSTRUCT_TAIL ? n : 0;
}

enum kv_status compress_prepare(struct kv_cache *kv, const struct model_config *cfg, const struct compress_params *p,
                                int n_prompt) {
    /* A cache in a device's memory is not compressed (the scoring and the
     * compact store are host code): the request runs with its whole cache. */
    if (!compress_wanted(p, n_prompt) || kv->be->memory) {
        kv_cache_forget_observation(kv);
        return KV_OK;
    }
    const int q_dim = cfg->n_head * cfg->head_dim, pass = kv->compact ? 0 : reconstruct_pass_at(kv, n_prompt);
    /* Only a cache not compressed yet looks ahead or reconstructs (see
     * compress.h); a reconstruction's passes write where the lookahead's
     * tokens go, before them, and leave scores. */
    const int window = compress_window(p, n_prompt), ahead = kv->compact ? 0 : lookahead_at(p, kv, n_prompt);
    const int rebuild = p->select == COMPRESS_RECONSTRUCT && pass > 0, past = rebuild && pass > ahead ? pass : ahead;
    const size_t n_scores = rebuild ? (size_t)cfg->n_layer * cfg->n_head_kv * (size_t)n_prompt : 0;
    const enum kv_status rc = kv_cache_observe(kv, n_prompt - window, window + past, q_dim, n_scores);
    if (rc == KV_OK) {
        kv->obs->past = past;
        kv->obs->ahead = ahead;
    }
    return rc;
}

/* Rows kept per head, of the `keepable` rows before the boundary that may
 * be (all but a store's demoted ones): the budget less what the recent
 * window already keeps, never fewer than the sinks. */
static int keep_count(const struct compress_params *p, int n_prompt, int boundary, int keepable) {
    const long want = p->budget_tokens > 0 ? p->budget_tokens : lroundf(p->budget * (float)n_prompt);
    long keep = want - (n_prompt - boundary);
    if (keep < KV_SINK_TOKENS) keep = KV_SINK_TOKENS;
    return keep > keepable ? keepable : (int)keep;
}

/* Rows of the `rows` before the boundary demoted per head: none when
 * dropping, all that are not kept by default, else the low budget's
 * share. */
static int low_count(const struct compress_params *p, int n_prompt, int rows, int n_keep) {
    if (p->mode == COMPRESS_DROP) return 0;
    const int rest = rows - n_keep;
    if (p->low_budget < 0) return rest;
    const long n = lroundf(p->low_budget * (float)n_prompt);
    return n < rest ? (int)n : rest;
}

/* ------------------------------------------------------------ scoring */

/* Every head of a layer gets the layer's summed scores. */
static void share_layer(float *scores, int n_kvh, int rows) {
    for (int p = 0; p < rows; p++) {
        float total = 0;
        for (int h = 0; h < n_kvh; h++) total += scores[(size_t)h * rows + p];
        for (int h = 0; h < n_kvh; h++) scores[(size_t)h * rows + p] = total;
    }
}

/* The largest of s[p - COMPRESS_POOL / 2 .. p + COMPRESS_POOL / 2] within
 * [lo, hi): a kept token keeps its neighbours. */
static float pooled(const float *s, int p, int lo, int hi) {
    float m = 0;
    for (int d = -COMPRESS_POOL / 2; d <= COMPRESS_POOL / 2; d++)
        if (p + d >= lo && p + d < hi && s[p + d] > m) m = s[p + d];
    return m;
}

/* The scoring's work items, one per (layer, KV head), claimed by the
 * pool's workers; each worker has its own attention scratch, weights and
 * sums, and each item's scores are computed the same way whoever runs it,
 * so the result does not depend on the number of threads. */
struct score_job {
    const struct kv_cache *kv;
    const struct model_config *cfg;
    const struct ebb_backend *be;
    int rows, n_items;
    int seg_keep, seg_low;     /* a compact store's kept and demoted rows: pooled apart */
    int from, to;              /* a reconstruction's chunk; to == 0: the window scores */
    float *scores;
    float *buffers;            /* per worker: scratch, weights, sums */
    size_t per_worker;
    atomic_int next;
};

static void score_item(const struct score_job *j, int item, float *scratch, float *w, float *sum) {
    const struct kv_cache *kv = j->kv;
    const struct kv_observation *o = kv->obs;
    const struct model_config *cfg = j->cfg;
    const int hd = cfg->head_dim, group = cfg->n_head / cfg->n_head_kv, n_kvh = cfg->n_head_kv;
    const int block = kv_block_tokens(cfg), n_ctx = kv->n_past, rows = j->rows;
    const int layer = item / n_kvh, h = item % n_kvh;
    const float scale = 1.0f / sqrtf((float)hd);
    const int n_q = n_ctx - o->from;   /* the window's, and a lookahead's if it ran */
    memset(sum, 0, (size_t)rows * sizeof(float));
    for (int t0 = 0; t0 < n_q; t0 += block) {
        const int n = n_q - t0 < block ? n_q - t0 : block;
        const float *q = o->q + ((size_t)layer * o->n + (size_t)t0) * o->q_dim + (size_t)h * group * hd;
        kv_attend_weights(kv, j->be, layer, h, q, (size_t)o->q_dim, n, group, o->from + t0, scale, NULL, scratch, w,
                          (size_t)n_ctx);
        for (int k = 0; k < n * group; k++)
            for (int p = 0; p < rows; p++) sum[p] += w[(size_t)k * n_ctx + p];
    }
    /* Neighbours are pooled within a segment: a store's kept rows, its
     * demoted rows, the positions after it (each in order of position). */
    float *out = j->scores + (size_t)item * rows;
    for (int p = 0; p < rows; p++) {
        const int lo = p < j->seg_keep ? 0 : p < j->seg_low ? j->seg_keep : j->seg_low;
        const int hi = p < j->seg_keep ? j->seg_keep : p < j->seg_low ? j->seg_low : rows;
        out[p] = pooled(sum, p, lo, hi) / (float)group;
    }
}

/* A reconstruction pass's queries (the recording's, from its start to
 * n_past) against the chunk [from, to) they wrote again: each query's
 * weights renormalised over the sinks, the chunk and the pass's own
 * positions up to the query's, the most kept per position in the
 * recording's scores[item * point + position]. */
static void reconstruct_item(const struct score_job *j, int item, float *scratch, float *w) {
    const struct kv_cache *kv = j->kv;
    const struct kv_observation *o = kv->obs;
    const struct model_config *cfg = j->cfg;
    const int hd = cfg->head_dim, group = cfg->n_head / cfg->n_head_kv, n_kvh = cfg->n_head_kv;
    const int block = kv_block_tokens(cfg), n_ctx = kv->n_past, at = recording_point(o), n_q = n_ctx - at;
    const int layer = item / n_kvh, h = item % n_kvh, sinks = j->from < KV_SINK_TOKENS ? j->from : KV_SINK_TOKENS;
    const float scale = 1.0f / sqrtf((float)hd);
    const struct kv_reading among_rows = {j->from, j->to, at};   /* all the weights below are read */
    float *best = o->scores + (size_t)item * at;   /* n_scores: every item's point positions */
    for (int t0 = 0; t0 < n_q; t0 += block) {
        const int n = n_q - t0 < block ? n_q - t0 : block;
        const float *q = o->q + ((size_t)layer * o->n + (size_t)(at - o->from + t0)) * o->q_dim + (size_t)h * group * hd;
        kv_attend_weights(kv, j->be, layer, h, q, (size_t)o->q_dim, n, group, at + t0, scale, &among_rows, scratch, w,
                          (size_t)n_ctx);
        for (int k = 0; k < n * group; k++) {
            const float *wk = w + (size_t)k * n_ctx;
            const int own = at + t0 + k / group;
            float among = 0;
            for (int p = 0; p < sinks; p++) among += wk[p];
            for (int p = j->from; p < j->to; p++) among += wk[p];
            for (int p = at; p <= own; p++) among += wk[p];
            if (!(among > 0)) continue;
            for (int p = j->from; p < j->to; p++)
                if (wk[p] / among > best[p]) best[p] = wk[p] / among;
        }
    }
}

static void score_task(void *arg, int part, int n_parts) {
    (void)n_parts;
    struct score_job *j = arg;
    const struct model_config *cfg = j->cfg;
    float *scratch = j->buffers + (size_t)part * j->per_worker;
    float *w = scratch + kv_attend_scratch(cfg, j->kv->n_past);
    float *sum = w + (size_t)kv_block_tokens(cfg) * (cfg->n_head / cfg->n_head_kv) * (size_t)j->kv->n_past;
    for (int item; (item = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        if (j->to > 0) reconstruct_item(j, item, scratch, w);
        else score_item(j, item, scratch, w, sum);
    }
}

/* The job's per-worker buffers, then the items over pool. -1 when out of
 * memory. */
static int run_score_job(struct score_job *job, struct ebb_pool *pool) {
    const struct model_config *cfg = job->cfg;
    const int workers = pool ? ebb_pool_threads(pool) : 1, n_ctx = job->kv->n_past;
    job->per_worker = kv_attend_scratch(cfg, n_ctx) +
                      (size_t)kv_block_tokens(cfg) * (cfg->n_head / cfg->n_head_kv) * (size_t)n_ctx +
                      (size_t)(job->rows > 0 ? job->rows : 1);
    if (!(job->buffers = malloc((size_t)workers * job->per_worker * sizeof(float)))) return -1;
    if (pool) ebb_pool_run(pool, score_task, job, workers);
    else score_task(job, 0, 1);
    free(job->buffers);
    job->buffers = NULL;
    return 0;
}

int compress_reconstruction(struct kv_cache *kv, int cue, int *end, int *chunk) {
    struct kv_observation *o = kv->obs;
    if (!o || !o->scores || recording_point(o) != kv->n_past || kv->compact) return 0;
    *end = kv_cache_compact_limit_at(kv, kv->n_past);
    *chunk = o->past - cue;
    if (*chunk < COMPRESS_RECONSTRUCT_TAIL) {   /* a vocabulary whose cues fill the pass */
        o->scores = NULL;
        o->n_scores = 0;
        return 0;
    }
    return *end > 0;
}

int compress_score_reconstruction(struct kv_cache *kv, const struct model_config *cfg, const struct ebb_backend *be,
                                  struct ebb_pool *pool, int from, int to) {
    const struct kv_observation *o = kv->obs;
    if (!o || !o->scores || from < 0 || to <= from || to > recording_point(o) || kv->n_past <= recording_point(o) ||
        kv->n_past > o->from + o->n)
        return -1;
    struct score_job job = {kv, cfg, be, 0, cfg->n_layer * cfg->n_head_kv, 0, 0, from, to, NULL, NULL, 0, 0};
    return run_score_job(&job, pool);
}

/* scores[(layer * n_head_kv + h) * rows + r]: the window's attention to
 * row r of those a compaction at boundary decides (kv_cache_compact_rows),
 * summed over its queries, averaged over the query heads of KV head h,
 * then max-pooled; per_layer: summed over the layer's KV heads. Split
 * over pool (NULL: the calling thread). -1 when out of memory. */
static int snapkv_scores(const struct kv_cache *kv, const struct model_config *cfg, const struct ebb_backend *be,
                         struct ebb_pool *pool, int boundary, int per_layer, float *scores) {
    const int n_kvh = cfg->n_head_kv, rows = kv_cache_compact_rows(kv, boundary);
    const struct kv_compact_info ci = kv_cache_compact_info(kv);
    struct score_job job = {kv, cfg, be, rows, cfg->n_layer * n_kvh, ci.n_keep, ci.n_keep + ci.n_low, 0, 0,
                            scores, NULL, 0, 0};
    if (run_score_job(&job, pool)) return -1;
    if (per_layer)
        for (int layer = 0; layer < cfg->n_layer; layer++)
            share_layer(scores + (size_t)layer * n_kvh * rows, n_kvh, rows);
    return 0;
}

/* A candidate position and its score; sorted highest first, ties to the
 * earlier position. */
struct candidate {
    float score;
    int pos;
};

static int by_score(const void *a, const void *b) {
    const struct candidate *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->pos - y->pos;
}

/* The reconstruction's scores (the recording's, per point position) for
 * the rows before boundary, max-pooled as the window's; per_layer as
 * snapkv_scores. */
static void reconstruction_scores(const struct kv_cache *kv, const struct model_config *cfg, int boundary,
                                  int per_layer, float *scores) {
    const struct kv_observation *o = kv->obs;
    const int n_kvh = cfg->n_head_kv, n_items = cfg->n_layer * n_kvh;
    for (int item = 0; item < n_items; item++) {
        const float *best = o->scores + (size_t)item * recording_point(o);
        float *out = scores + (size_t)item * boundary;
        for (int p = 0; p < boundary; p++) out[p] = pooled(best, p, 0, boundary);
    }
    if (per_layer)
        for (int layer = 0; layer < cfg->n_layer; layer++)
            share_layer(scores + (size_t)layer * n_kvh * boundary, n_kvh, boundary);
}

/* Each row's rank among the item's, as a share: 1 the best, near 0 the
 * worst. */
static int rank_share(float *s, int rows) {
    struct candidate *order = malloc((size_t)rows * sizeof *order);
    if (!order) return -1;
    for (int p = 0; p < rows; p++) order[p] = (struct candidate){s[p], p};
    qsort(order, (size_t)rows, sizeof *order, by_score);
    for (int r = 0; r < rows; r++) s[order[r].pos] = 1.0f - (float)r / (float)rows;
    free(order);
    return 0;
}

/* The window's scores (the lookahead's with them) joined with the
 * reconstruction's: a row ranks as high as the better of its two ranks,
 * so the budget goes to what either would keep first (see compress.h for
 * why a union of ranks and not a sum of scores). -1 when out of memory. */
static int with_reconstruction(const struct kv_cache *kv, const struct model_config *cfg, int boundary,
                               int per_layer, float *scores) {
    const int n_items = cfg->n_layer * cfg->n_head_kv;
    float *rebuilt = malloc((size_t)n_items * boundary * sizeof(float));
    if (!rebuilt) return -1;
    reconstruction_scores(kv, cfg, boundary, per_layer, rebuilt);
    int rc = 0;
    for (int item = 0; item < n_items && rc == 0; item++) {
        float *w = scores + (size_t)item * boundary, *r = rebuilt + (size_t)item * boundary;
        rc = rank_share(w, boundary) || rank_share(r, boundary) ? -1 : 0;
        for (int p = 0; rc == 0 && p < boundary; p++) w[p] = w[p] > r[p] ? w[p] : r[p];
    }
    free(rebuilt);
    return rc;
}

/* ---------------------------------------------------------- selection */

static uint64_t next_random(uint64_t *s) {   /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}


int compress_select_tiers(const struct compress_params *p, const float *scores, int n_heads, int rows, int n_keep,
                          int n_low, int low_from, int low_to, uint8_t *tiers) {
    const int n_cand = rows - KV_SINK_TOKENS;
    struct candidate *order = malloc((size_t)(n_cand > 0 ? n_cand : 1) * sizeof *order);
    if (!order) return -1;
    uint64_t rng = p->seed;
    int free_slots = n_keep - KV_SINK_TOKENS;
    if (free_slots < 0) free_slots = 0;
    if (n_low > n_cand - free_slots) n_low = n_cand - free_slots;
    for (int h = 0; h < n_heads; h++) {
        uint8_t *t = tiers + (size_t)h * rows;
        for (int i = 0; i < rows; i++) t[i] = i < KV_SINK_TOKENS ? KV_TIER_KEEP : KV_TIER_DROP;
        /* Candidates in order of preference. */
        for (int i = 0; i < n_cand; i++) {
            const int pos = p->select == COMPRESS_RECENT ? rows - 1 - i : KV_SINK_TOKENS + i;
            order[i] = (struct candidate){scores ? scores[(size_t)h * rows + pos] : 0, pos};
        }
        if (p->select == COMPRESS_RANDOM) {
            for (int i = 0; i < n_cand - 1; i++) {   /* Fisher-Yates */
                const int j = i + (int)(next_random(&rng) % (uint64_t)(n_cand - i));
                const struct candidate x = order[i];
                order[i] = order[j];
                order[j] = x;
            }
        } else if (scoring(p->select)) {
            qsort(order, (size_t)n_cand, sizeof *order, by_score);
        }
        /* The best that may be kept are; of the rest, the best demoted. */
        for (int i = 0, kept = 0; i < n_cand && kept < free_slots; i++)
            if (order[i].pos < low_from || order[i].pos >= low_to) {
                t[order[i].pos] = KV_TIER_KEEP;
                kept++;
            }
        for (int i = 0, low = 0; i < n_cand && low < n_low; i++)
            if (t[order[i].pos] == KV_TIER_DROP) {
                t[order[i].pos] = KV_TIER_LOW;
                low++;
            }
    }
    free(order);
    return 0;
}

/* ------------------------------------------------------------- stage */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A lookahead's rows (compress_look_ahead) go once they have been scored:
 * the cache is at its point again, as if they had never been written. */
static void forget_lookahead(struct kv_cache *kv, int n_prompt) {
    if (kv->n_past == n_prompt) return;
    const int back = kv_cache_truncate(kv, n_prompt);
    assert(back == 0);   /* the window was held at n_prompt (compress_look_ahead) */
    (void)back;
    kv_cache_hold_window(kv, -1);
}

int compress_apply(struct kv_cache *kv, const struct model_config *cfg, const struct ebb_backend *be,
                   struct ebb_pool *pool, const struct compress_params *p, struct compress_report *report) {
    const double t0 = now_ms();
    memset(report, 0, sizeof *report);
    const struct kv_observation *o = kv->obs;
    const int point = o ? recording_point(o) : kv->n_past, looked = o && o->ahead > 0 && kv->n_past == point + o->ahead;
    const struct kv_compact_info was = kv_cache_compact_info(kv);
    const int n_prompt = looked ? point : kv->n_past, boundary = kv_cache_compact_limit_at(kv, n_prompt);
    const int rows = boundary >= was.boundary ? kv_cache_compact_rows(kv, boundary) : 0;
    const int keepable = rows - was.n_low;   /* a demoted row is never kept again */
    const int n_keep = boundary > 0 && rows > 0 ? keep_count(p, n_prompt, boundary, keepable) : 0;
    const int scored = scoring(p->select);
    /* A cache compressed before (a conversation's next turn) was not
     * reconstructed: the window alone scores it. */
    const int rebuilt = o && o->scores && !kv->compact;
    const int per_layer = p->select != COMPRESS_SNAPKV_HEAD;
    const int n_heads = cfg->n_layer * cfg->n_head_kv;
    float *scores = NULL;
    int rc = 0;
    if (!compress_wanted(p, n_prompt) || boundary <= 0 || rows <= 0 || n_keep >= keepable ||
        (scored && (!o || point != n_prompt))) {
        kv_cache_forget_observation(kv);
        rc = 1;   /* nothing to do */
    } else if (scored && (!(scores = malloc((size_t)n_heads * rows * sizeof(float))) ||
                          snapkv_scores(kv, cfg, be, pool, boundary, per_layer, scores) ||
                          (rebuilt && with_reconstruction(kv, cfg, boundary, per_layer, scores)))) {
        rc = -1;
    }
    forget_lookahead(kv, n_prompt);
    report->n_prompt = n_prompt;
    report->kept = n_prompt - (was.boundary - was.n_keep);
    report->bytes_before = report->bytes_after = kv_cache_body_bytes(kv);
    uint8_t *tiers = rc == 0 ? malloc((size_t)n_heads * rows) : NULL;
    if (rc == 0)
        rc = tiers && compress_select_tiers(p, scores, n_heads, rows, n_keep, low_count(p, n_prompt, rows, n_keep),
                                            was.n_keep, was.n_keep + was.n_low, tiers) == 0
                 ? kv_cache_compact(kv, be, boundary, tiers, p->low_key_bits == KV_LOW_BITS ? KV_LOW_BITS : 4)
                 : -1;
    free(scores);
    free(tiers);
    if (rc) return rc > 0 ? 0 : -1;
    const struct kv_compact_info ci = kv_cache_compact_info(kv);
    report->applied = 1;
    report->mode = p->mode;
    report->boundary = boundary;
    report->kept = ci.n_keep + (n_prompt - boundary);
    report->demoted = ci.n_low;
    report->dropped = boundary - ci.n_keep - ci.n_low;
    report->bytes_after = kv_cache_body_bytes(kv);
    report->ms = now_ms() - t0;
    return 0;
}
