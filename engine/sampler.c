/* Token sampling and stop-string matching.
 *
 * Sampler. A call works on a list of candidates (logit, id). The list starts
 * as the whole vocabulary in id order and shrinks stage by stage, in the
 * order fixed by sampler.h:
 *
 *   logit bias          adds each entry's bias to the caller's logits.
 *   repetition penalty  edits the caller's logits in place, once per distinct
 *                       id in the window (CTRL / llama.cpp rule: a positive
 *                       logit is divided by the penalty, a negative one
 *                       multiplied), deduplicated with a stamp array so the
 *                       call needs no clearing pass and no allocation.
 *   presence/frequency  OpenAI's rule, logit -= frequency * count + presence,
 *                       over the ids this sampler returned: their counts and
 *                       the list of distinct ids are kept as they are drawn,
 *                       so a call costs the distinct ids generated, not a
 *                       scan of the vocabulary or of the history.
 *   greedy              temperature <= 0 or top_k == 1: plain argmax, lowest
 *                       id on ties, no PRNG draw consumed.
 *   top-k               a bounded min-heap of k entries keeps the best k in
 *                       O(n log k); nearly every token is rejected by one
 *                       compare against the heap root, so k = 40 over 49152
 *                       ids costs about one pass over the logits, read in
 *                       place. The heap is then sorted.
 *   temperature+softmax one pass, exp((v - max) / T), sum in double.
 *   top-p, min-p        both keep a prefix of the list sorted by probability,
 *                       so the pair keeps the shorter of the two prefixes.
 *                       That lets min-p run first, in one pass with no sort
 *                       (its threshold is relative to the maximum, which
 *                       top-p never removes), and top-p only has to order
 *                       the survivors. top-p's running sum still uses the
 *                       softmax probabilities from before min-p, exactly as
 *                       if it had run first, so the result is the documented
 *                       order's. When the list is not already sorted (top-k
 *                       off), top-p buckets probabilities on a log scale and
 *                       sorts only the bucket where the mass crosses top_p,
 *                       instead of sorting the whole vocabulary.
 *   draw                one uniform double in [0, total mass) from
 *                       xoshiro256** (state seeded by splitmix64 from seed),
 *                       scanned against the running sum.
 *
 * Ordering is a strict total order: higher value first, then lower id. So
 * ties never depend on the selection algorithm, and a seed plus a sequence of
 * logits always gives the same ids. NaN logits count as -inf and +inf as the
 * largest float, so a broken row degrades to a valid id instead of NaN math.
 * All buffers are allocated once in sampler_create, sized for the vocabulary.
 *
 * Stop matcher. Decoded text is appended to a hold buffer. After each feed:
 * if some stop string occurs in it, the occurrence that ends first wins (the
 * longest one among those ending at the same byte), the text before it is
 * released and the matcher is done. Choosing by end rather than start makes
 * the result independent of how the text was cut into feeds: fed byte by
 * byte, the stop that completes first is the one that fires. Otherwise the
 * earliest suffix of the buffer that is still a proper prefix of a stop
 * string is kept back and everything before it is released, cut back further
 * if needed so that no UTF-8 character is split. Held text stays short (at
 * most the longest stop string plus a partial character), so the quadratic
 * scans are cheap.
 */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/utf8.h"

/* ---------------------------------------------------------------- PRNG --- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform in [0, 1) with 53 random bits. */
static double xoshiro_uniform(uint64_t s[4]) {
    return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------- sampler --- */

struct cand {
    float v;     /* logit, then probability after softmax */
    int32_t id;
};

/* Top-p without top-k buckets probabilities by their float bit pattern: for
 * non-negative floats it grows with the value, so bits >> 19 (exponent plus
 * four mantissa bits) orders buckets exactly like probabilities, each bucket
 * spanning a factor of 2^(1/16). p <= 1 keeps the index under 0x7f1. */
#define PROB_BUCKET_SHIFT 19
#define N_PROB_BUCKETS ((0x3f800000u >> PROB_BUCKET_SHIFT) + 1)

struct sampler {
    struct sampler_params p;
    int n_vocab;
    uint64_t rng[4];
    struct cand *all;      /* n_vocab: the full candidate list */
    struct cand *top;      /* n_vocab: output of top-k / top-p */
    uint32_t *seen;        /* n_vocab: stamp of the call that last penalised an id */
    uint32_t stamp;
    struct logit_bias *bias;   /* p.bias, owned copy */
    uint32_t *count;       /* n_vocab, when presence/frequency is on: times returned */
    int32_t *counted;      /* the distinct ids with count > 0, n_counted of them */
    int n_counted;
    double bucket_mass[N_PROB_BUCKETS];
    int bucket_count[N_PROB_BUCKETS];
};

void sampler_params_default(struct sampler_params *p) {
    p->temperature = 0.8f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->min_p = 0.05f;
    p->repeat_penalty = 1.0f;
    p->repeat_last_n = 64;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->bias = NULL;
    p->n_bias = 0;
    p->seed = 0;
}

struct sampler *sampler_create(const struct sampler_params *p, int n_vocab) {
    if (n_vocab <= 0) return NULL;
    struct sampler *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    if (p) s->p = *p;
    else sampler_params_default(&s->p);
    s->n_vocab = n_vocab;
    uint64_t x = s->p.seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    s->all = malloc((size_t)n_vocab * sizeof(*s->all));
    s->top = malloc((size_t)n_vocab * sizeof(*s->top));
    s->seen = calloc((size_t)n_vocab, sizeof(*s->seen));
    int fail = !s->all || !s->top || !s->seen;
    if (s->p.n_bias > 0 && s->p.bias) {
        s->bias = malloc((size_t)s->p.n_bias * sizeof(*s->bias));
        if (s->bias) memcpy(s->bias, s->p.bias, (size_t)s->p.n_bias * sizeof(*s->bias));
        fail |= !s->bias;
    } else {
        s->p.n_bias = 0;
    }
    s->p.bias = s->bias;
    if (s->p.presence_penalty != 0.0f || s->p.frequency_penalty != 0.0f) {
        s->count = calloc((size_t)n_vocab, sizeof(*s->count));
        s->counted = malloc((size_t)n_vocab * sizeof(*s->counted));
        fail |= !s->count || !s->counted;
    }
    if (fail) {
        sampler_free(s);
        return NULL;
    }
    return s;
}

void sampler_free(struct sampler *s) {
    if (!s) return;
    free(s->all);
    free(s->top);
    free(s->seen);
    free(s->bias);
    free(s->count);
    free(s->counted);
    free(s);
}

static void apply_bias(const struct sampler *s, float *logits) {
    for (int i = 0; i < s->p.n_bias; i++) {
        const int32_t id = s->bias[i].id;
        if (id >= 0 && id < s->n_vocab) logits[id] += s->bias[i].bias;
    }
}

static void apply_presence_frequency(const struct sampler *s, float *logits) {
    for (int i = 0; s->count && i < s->n_counted; i++) {
        const int32_t id = s->counted[i];
        logits[id] -= s->p.frequency_penalty * (float)s->count[id] + s->p.presence_penalty;
    }
}

/* The id the sampler returns: counted for the presence/frequency penalties. */
static int32_t returned(struct sampler *s, int32_t id) {
    if (s->count && id >= 0 && id < s->n_vocab && s->count[id]++ == 0) s->counted[s->n_counted++] = id;
    return id;
}

static void apply_repeat_penalty(struct sampler *s, float *logits, const int32_t *history,
                                 int n_history) {
    float penalty = s->p.repeat_penalty;
    if (penalty == 1.0f || !(penalty > 0.0f) || !history || n_history <= 0) return;
    int window = s->p.repeat_last_n;
    if (window == 0) return;
    if (window < 0 || window > n_history) window = n_history;   /* < 0: whole history */

    if (++s->stamp == 0) {   /* wrapped: old stamps could collide, start over */
        memset(s->seen, 0, (size_t)s->n_vocab * sizeof(*s->seen));
        s->stamp = 1;
    }
    for (int i = n_history - window; i < n_history; i++) {
        int32_t id = history[i];
        if (id < 0 || id >= s->n_vocab || s->seen[id] == s->stamp) continue;
        s->seen[id] = s->stamp;
        float v = logits[id];
        logits[id] = v > 0.0f ? v / penalty : v * penalty;
    }
}

/* Lowest id among the largest logits; NaNs are skipped. */
static int32_t argmax(const float *logits, int n) {
    int32_t best = -1;
    float best_v = 0.0f;
    for (int i = 0; i < n; i++) {
        float v = logits[i];
        if (isnan(v)) continue;
        if (best < 0 || v > best_v) {
            best = i;
            best_v = v;
        }
    }
    return best < 0 ? 0 : best;
}

/* NaN counts as -inf, +inf as the largest float (keeps v - max finite). */
static inline float sane(float v) {
    if (isnan(v)) return -INFINITY;
    return v > FLT_MAX ? FLT_MAX : v;
}

/* Strict total order used everywhere: higher value first, then lower id. */
static inline int better(const struct cand *a, const struct cand *b) {
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int cmp_better_first(const void *a, const void *b) {
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

/* Min-heap on "better": the root is the worst entry kept so far. */
static void heap_sift_down(struct cand *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && better(&h[w], &h[l])) w = l;
        if (r < n && better(&h[w], &h[r])) w = r;
        if (w == i) return;
        struct cand t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* Writes the best k logits to dst[0..k), best first. 1 <= k <= n. Reads the
 * logits directly: ids only grow during the scan, so a newcomer beats the
 * root only with a strictly larger value, and a NaN never compares larger. */
static void select_top_k(const float *logits, int n, struct cand *dst, int k) {
    for (int i = 0; i < k; i++) {
        dst[i].v = sane(logits[i]);
        dst[i].id = i;
    }
    for (int i = k / 2 - 1; i >= 0; i--) heap_sift_down(dst, k, i);
    for (int i = k; i < n; i++) {
        /* the second test only runs on a win; it stops a later +inf from
         * displacing an earlier one (both clamp to FLT_MAX) */
        if (logits[i] > dst[0].v && sane(logits[i]) > dst[0].v) {
            dst[0].v = sane(logits[i]);
            dst[0].id = i;
            heap_sift_down(dst, k, 0);
        }
    }
    /* Heap sort: repeatedly move the worst to the end, giving best first. */
    for (int end = k - 1; end > 0; end--) {
        struct cand t = dst[0];
        dst[0] = dst[end];
        dst[end] = t;
        heap_sift_down(dst, end, 0);
    }
}

/* Turns values into probabilities of softmax(v / T). Returns 0 if no
 * candidate has a finite value (then there is nothing to weigh). */
static int softmax_with_temperature(struct cand *c, int n, float temperature) {
    float max = c[0].v;
    for (int i = 1; i < n; i++)
        if (c[i].v > max) max = c[i].v;
    if (!(max > -INFINITY)) return 0;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        float e = expf((c[i].v - max) / temperature);
        c[i].v = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) c[i].v *= inv;
    return 1;
}

/* Keeps, in place and in order, the candidates whose probability is at least
 * min_p times the largest. Returns the new count (>= 1). */
static int filter_min_p(struct cand *c, int n, float min_p) {
    float max = 0.0f;
    for (int i = 0; i < n; i++)
        if (c[i].v > max) max = c[i].v;
    float threshold = min_p * max;
    int kept = 0;
    for (int i = 0; i < n; i++)
        if (c[i].v >= threshold) c[kept++] = c[i];
    return kept;
}

/* Length of the shortest prefix of sorted c whose mass, added to base,
 * reaches top_p; n if it never does (rounding). */
static int top_p_prefix(const struct cand *c, int n, double base, float top_p) {
    double cum = base;
    for (int i = 0; i < n; i++) {
        cum += c[i].v;
        if (cum >= top_p) return i + 1;
    }
    return n;
}

static inline unsigned prob_bucket(float p) {
    uint32_t bits;
    memcpy(&bits, &p, sizeof(bits));
    return bits >> PROB_BUCKET_SHIFT;
}

/* Top-p on an unsorted list, without sorting it: find the bucket where the
 * mass (best buckets first) reaches top_p; every candidate in a better bucket
 * is kept, and only the crossing bucket is sorted to find where to stop.
 * Writes the kept candidates to s->top and returns their count. A very flat
 * distribution puts everything in one bucket and degrades to a full sort,
 * which is what such a row needs anyway. */
static int filter_top_p_unsorted(struct sampler *s, const struct cand *c, int n, float top_p) {
    memset(s->bucket_mass, 0, sizeof(s->bucket_mass));
    memset(s->bucket_count, 0, sizeof(s->bucket_count));
    for (int i = 0; i < n; i++) {
        unsigned b = prob_bucket(c[i].v);
        s->bucket_mass[b] += c[i].v;
        s->bucket_count[b]++;
    }
    double above = 0.0;   /* mass of the buckets better than the crossing one */
    int n_above = 0, cross = -1;
    for (int b = N_PROB_BUCKETS - 1; b >= 0 && cross < 0; b--) {
        if (!s->bucket_count[b]) continue;
        if (above + s->bucket_mass[b] >= top_p) cross = b;
        else above += s->bucket_mass[b], n_above += s->bucket_count[b];
    }
    if (cross < 0) {
        /* All of it falls short of top_p (min-p removed the rest, or
         * rounding): keep everything. */
        memcpy(s->top, c, (size_t)n * sizeof(*c));
        return n;
    }
    int n_cross = s->bucket_count[cross], a = 0, x = n_above;
    for (int i = 0; i < n; i++) {
        unsigned b = prob_bucket(c[i].v);
        if (b > (unsigned)cross) s->top[a++] = c[i];
        else if (b == (unsigned)cross) s->top[x++] = c[i];
    }
    qsort(s->top + n_above, (size_t)n_cross, sizeof(*s->top), cmp_better_first);
    return n_above + top_p_prefix(s->top + n_above, n_cross, above, top_p);
}

/* Draws an id with probability proportional to c[i].v. */
static int32_t draw(struct sampler *s, const struct cand *c, int n) {
    double total = 0.0;
    for (int i = 0; i < n; i++) total += c[i].v;
    double r = xoshiro_uniform(s->rng) * total;
    double cum = 0.0;
    int last = 0;
    for (int i = 0; i < n; i++) {
        if (c[i].v <= 0.0f) continue;
        cum += c[i].v;
        last = i;
        if (r < cum) return c[i].id;
    }
    return c[last].id;   /* rounding left r at the very top: the last live one */
}

double log_softmax_at(const float *logits, int n, int32_t id) {
    float max = logits[0];
    for (int i = 1; i < n; i++) if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - max);
    return ((double)logits[id] - max) - log(sum);
}

int log_softmax_top(const float *logits, int n, int k, int32_t *ids, float *logprobs) {
    if (k > n) k = n;
    if (k <= 0) return 0;
    struct cand best[SAMPLER_MAX_TOP];
    if (k > SAMPLER_MAX_TOP) k = SAMPLER_MAX_TOP;
    select_top_k(logits, n, best, k);
    float max = sane(logits[0]);
    for (int i = 1; i < n; i++) if (sane(logits[i]) > max) max = sane(logits[i]);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)sane(logits[i]) - max);
    const double lse = log(sum);
    for (int i = 0; i < k; i++) {
        ids[i] = best[i].id;
        logprobs[i] = (float)(((double)best[i].v - max) - lse);
    }
    return k;
}

void sampler_adjust(struct sampler *s, float *logits, const int32_t *history, int n_history) {
    apply_bias(s, logits);
    apply_repeat_penalty(s, logits, history, n_history);
    apply_presence_frequency(s, logits);
}

int sampler_is_greedy(const struct sampler *s) { return !(s->p.temperature > 0.0f) || s->p.top_k == 1; }

int32_t sampler_argmax(const float *logits, int n) { return argmax(logits, n); }

int32_t sampler_sample(struct sampler *s, float *logits, const int32_t *history, int n_history) {
    sampler_adjust(s, logits, history, n_history);
    return sampler_pick(s, logits);
}

int32_t sampler_pick(struct sampler *s, float *logits) {
    const struct sampler_params *p = &s->p;
    int n = s->n_vocab;
    if (sampler_is_greedy(s)) return returned(s, argmax(logits, n));

    struct cand *list;
    int sorted = p->top_k > 0 && p->top_k < n;
    if (sorted) {
        list = s->top;
        n = p->top_k;
        select_top_k(logits, s->n_vocab, list, n);
    } else {
        list = s->all;
        for (int i = 0; i < n; i++) {
            list[i].v = sane(logits[i]);
            list[i].id = i;
        }
    }
    if (!softmax_with_temperature(list, n, p->temperature))
        return returned(s, argmax(logits, s->n_vocab));   /* no finite logit: nothing to weigh */
    if (p->min_p > 0.0f) n = filter_min_p(list, n, p->min_p);
    if (p->top_p < 1.0f && n > 1) {
        if (sorted) {
            n = top_p_prefix(list, n, 0.0, p->top_p);
        } else {
            n = filter_top_p_unsorted(s, list, n, p->top_p);
            list = s->top;
        }
    }
    return returned(s, draw(s, list, n));
}

/* -------------------------------------------------------- stop matcher --- */

void stop_init(struct stop_matcher *m, const char *const *stops, int n) {
    m->stops = stops;
    m->n = stops ? n : 0;
    m->held = NULL;
    m->n_held = m->cap_held = 0;
    m->stopped = 0;
}

void stop_free(struct stop_matcher *m) {
    free(m->held);
    m->held = NULL;
    m->n_held = m->cap_held = 0;
}

/* Appends len bytes to *out, keeping it NUL-terminated. Always leaves *out a
 * valid string (allocating "" if it was NULL). Returns 0, or -1 on OOM. */
static int out_append(char **out, size_t *out_len, const char *text, size_t len) {
    if (*out && len == 0) return 0;
    size_t have = *out ? *out_len : 0;
    char *p = realloc(*out, have + len + 1);
    if (!p) return -1;
    if (len) memcpy(p + have, text, len);
    p[have + len] = '\0';
    *out = p;
    *out_len = have + len;
    return 0;
}

static int held_append(struct stop_matcher *m, const char *text, size_t len) {
    if (m->n_held + len > m->cap_held) {
        size_t cap = m->cap_held ? m->cap_held : 64;
        while (cap < m->n_held + len) cap *= 2;
        char *p = realloc(m->held, cap);
        if (!p) return -1;
        m->held = p;
        m->cap_held = cap;
    }
    if (len) memcpy(m->held + m->n_held, text, len);
    m->n_held += len;
    return 0;
}

/* Drops the first n bytes of the hold buffer. */
static void held_consume(struct stop_matcher *m, size_t n) {
    memmove(m->held, m->held + n, m->n_held - n);
    m->n_held -= n;
}

/* Finds the stop occurrence that ends first (longest on a tie). Returns 1
 * and its start in *start, or 0. */
static int find_stop(const struct stop_matcher *m, size_t *start) {
    const char *h = m->held;
    for (size_t end = 1; end <= m->n_held; end++) {
        size_t best_len = 0;
        for (int i = 0; i < m->n; i++) {
            const char *stop = m->stops[i];
            if (!stop) continue;
            size_t len = strlen(stop);
            if (len == 0 || len > end || len <= best_len) continue;
            if (memcmp(h + end - len, stop, len) == 0) best_len = len;
        }
        if (best_len) {
            *start = end - best_len;
            return 1;
        }
    }
    return 0;
}

/* Start of the earliest suffix that is a proper prefix of some stop string;
 * n_held if none. */
static size_t hold_point(const struct stop_matcher *m) {
    for (size_t i = 0; i < m->n_held; i++) {
        size_t rest = m->n_held - i;
        for (int k = 0; k < m->n; k++) {
            const char *stop = m->stops[k];
            if (!stop) continue;
            size_t len = strlen(stop);
            if (rest < len && memcmp(m->held + i, stop, rest) == 0) return i;
        }
    }
    return m->n_held;
}

/* Moves cut back so that buf[0..cut) does not end inside a character. Looks
 * back at most three bytes: longer runs of continuation bytes are invalid
 * UTF-8 anyway and are released as they are. */
static size_t utf8_safe_cut(const char *buf, size_t cut) {
    for (size_t back = 1; back <= 3 && back <= cut; back++) {
        unsigned char b = (unsigned char)buf[cut - back];
        if ((b & 0xC0) == 0x80) continue;          /* continuation: keep looking */
        uint8_t lo, hi;
        return (size_t)utf8_lead(b, &lo, &hi) > back ? cut - back : cut;
    }
    return cut;
}

int stop_feed(struct stop_matcher *m, const char *text, size_t len, char **out, size_t *out_len) {
    if (out_append(out, out_len, NULL, 0) < 0) return -1;
    if (m->stopped) return 1;
    if (held_append(m, text, len) < 0) return -1;

    size_t start;
    if (find_stop(m, &start)) {
        if (out_append(out, out_len, m->held, start) < 0) return -1;
        m->n_held = 0;
        m->stopped = 1;
        return 1;
    }
    size_t cut = utf8_safe_cut(m->held, hold_point(m));
    if (cut == 0) return 0;
    if (out_append(out, out_len, m->held, cut) < 0) return -1;
    held_consume(m, cut);
    return 0;
}

int stop_finish(struct stop_matcher *m, char **out, size_t *out_len) {
    if (out_append(out, out_len, m->held, m->stopped ? 0 : m->n_held) < 0) return -1;
    m->n_held = 0;
    return 0;
}
