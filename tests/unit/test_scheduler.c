/* Scheduler tests on the real default model.
 *
 * The central property of continuous batching: a request's tokens do not
 * depend on what else shares its batches. Greedy generations of several
 * prompts run together (mixed prefill and decode, prompts of different
 * lengths, staggered arrival) must equal each prompt run alone through
 * generate(). Also: cancellation frees the KV cache, the queue bound and the
 * memory budget refuse or defer work, and shutdown finishes every request.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "emulated_device.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tokenizer.h"

#define MAX_OUT 256

struct collected {
    pthread_mutex_t lock;
    int32_t ids[MAX_OUT];
    int n_ids;
    char text[4096];
    size_t text_len;
    int done;
    enum finish_reason finish;
    int n_prompt, n_generated;
    struct sched_timing timing;
};

static void on_token(void *ud, const struct gen_token *tok, double t) {
    (void)t;
    struct collected *c = ud;
    const int32_t id = tok->id;
    const char *text = tok->text;
    const size_t len = tok->len;
    pthread_mutex_lock(&c->lock);
    if (c->n_ids < MAX_OUT) c->ids[c->n_ids++] = id;
    if (c->text_len + len < sizeof c->text) {
        memcpy(c->text + c->text_len, text, len);
        c->text_len += len;
    }
    pthread_mutex_unlock(&c->lock);
}

static void on_done(void *ud, enum finish_reason finish, int n_prompt, int n_generated,
                    const struct sched_timing *timing) {
    struct collected *c = ud;
    pthread_mutex_lock(&c->lock);
    c->finish = finish;
    c->n_prompt = n_prompt;
    c->n_generated = n_generated;
    c->timing = *timing;
    CHECK(timing->finished >= timing->queued);
    c->done = 1;
    pthread_mutex_unlock(&c->lock);
}

static int is_done(struct collected *c) {
    pthread_mutex_lock(&c->lock);
    int d = c->done;
    pthread_mutex_unlock(&c->lock);
    return d;
}

static void wait_done(struct collected *c) {
    for (int i = 0; i < 60000 && !is_done(c); i++) usleep(1000);
    CHECK_MSG(is_done(c), "request did not finish in 60 s");
}

struct alone { int32_t ids[MAX_OUT]; int n; };
static int collect_alone(void *ud, int32_t id, const char *text, size_t len) {
    (void)text; (void)len;
    struct alone *a = ud;
    if (a->n < MAX_OUT) a->ids[a->n++] = id;
    return 0;
}

static int encode_chat(struct model *m, const char *msg, int32_t **ids) {
    struct chat_msg cm = {"user", msg};
    char *prompt = chat_render(m->tok, &cm, 1, 1);
    int n = tokenizer_encode(m->tok, prompt, strlen(prompt), 1, ids);
    free(prompt);
    return n;
}

static struct gen_params greedy(int max_tokens) {
    struct gen_params p = {.max_tokens = max_tokens};
    sampler_params_default(&p.sampling);
    p.sampling.temperature = 0;
    return p;
}

/* Each prompt's greedy tokens through generate() alone: the reference. */
static void run_alone(struct model *m, int32_t *const *ids, const int *n_ids, int n, const struct gen_params *p,
                      struct alone *alone) {
    struct model_run *run = model_run_new(m, 2);
    CHECK(run != NULL);
    if (!run) return;
    for (int i = 0; i < n; i++) {
        memset(&alone[i], 0, sizeof alone[i]);
        struct gen_result res;
        CHECK(generate(run, ids[i], n_ids[i], p, collect_alone, &alone[i], &res) == 0);
    }
    model_run_free(run);
}

/* Submits every prompt into out[i]; the one after `stagger` arrives late
 * (joins a running batch; -1: none). */
static void submit_all(struct sched *s, int32_t *const *ids, const int *n_ids, int n, const struct gen_params *p,
                       struct collected *out, int stagger) {
    for (int i = 0; i < n; i++) {
        memset(&out[i], 0, sizeof out[i]);
        pthread_mutex_init(&out[i].lock, NULL);
        struct sched_request_desc d = {ids[i], n_ids[i], *p, {on_token, on_done}, &out[i]};
        uint64_t id;
        CHECK(sched_submit(s, &d, &id) == SCHED_OK);
        if (i == stagger) usleep(20000);
    }
}

/* kv_bits 4 too: its quantized positions must not depend on the batching
 * either (the long prompt reaches past the full-precision window). */
static void test_batched_equals_alone(struct model *m, int kv_bits, int speculative, float temperature) {
    static const char *prompts[] = {
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why each is prime. Be thorough and careful, "
        "and write at least two sentences about each of them so that the answer is long.",
        "Hi",
        "Translate 'good morning' into Spanish, French and German.",
        "Summarize this in one sentence. The lighthouse stood on a rock at the mouth of the bay for two "
        "hundred years. Its keepers lived in a small stone house beside it, trimming the wick each evening "
        "and polishing the great lens each morning. Ships coming home from the north watched for its beam, "
        "which turned once every twelve seconds, and fishermen from the village set their clocks by it. In "
        "winter the storms threw spray over the lantern room, and the keepers kept a log of every wind and "
        "every wreck. When the light was finally automated, the last keeper took the log books to the "
        "village library, where they can still be read: long columns of weather, a few names of ships, and "
        "now and then a line about a seal on the rocks or a child who rowed out with bread. The house is a "
        "museum now, and on clear nights the old lens still turns above it.",
    };
    enum { N = sizeof prompts / sizeof prompts[0] };
    const int max_tokens = 24;
    struct alone alone[N];
    int32_t *ids[N];
    int n_ids[N];
    struct gen_params p = greedy(max_tokens);
    p.kv_bits = kv_bits;
    p.sampling.temperature = temperature;   /* sampled: a fixed seed draws the same tokens too */
    p.sampling.seed = 20261205;
    for (int i = 0; i < N; i++) {
        n_ids[i] = encode_chat(m, prompts[i], &ids[i]);
        CHECK(n_ids[i] > 0);
    }
    run_alone(m, ids, n_ids, N, &p, alone);
    /* Speculating, every n-gram draft is verified: the tokens must still be
     * the ones decoded one at a time alone. */
    p.speculative = speculative;
    struct sched_config cfg = {.max_running = 4, .max_waiting = 16, .max_ctx = 0, .kv_budget_bytes = 0,
                               .kv_bits = kv_bits, .draft_always = speculative};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) return;
    struct collected out[N];
    submit_all(s, ids, n_ids, N, &p, out, 1);
    for (int i = 0; i < N; i++) wait_done(&out[i]);
    for (int i = 0; i < N; i++) {
        CHECK_MSG(out[i].n_ids == alone[i].n, "prompt %d: %d tokens batched, %d alone", i, out[i].n_ids, alone[i].n);
        int same = out[i].n_ids == alone[i].n && !memcmp(out[i].ids, alone[i].ids, (size_t)alone[i].n * sizeof(int32_t));
        CHECK_MSG(same, "kv_bits %d%s, prompt %d: batched tokens differ from alone", kv_bits,
                  speculative ? ", speculative" : "", i);
        CHECK(out[i].n_prompt == n_ids[i]);
        CHECK(out[i].finish == FINISH_STOP || out[i].finish == FINISH_LENGTH);
        free(ids[i]);
        pthread_mutex_destroy(&out[i].lock);
    }
    struct sched_stats st;
    sched_get_stats(s, &st);
    /* on_done comes just before the engine frees the request's cache. */
    for (int i = 0; i < 1000 && (st.kv_allocated_bytes || st.kv_reserved_bytes || st.running); i++) {
        usleep(1000);
        sched_get_stats(s, &st);
    }
    CHECK(st.running == 0 && st.waiting == 0);
    CHECK_MSG(st.kv_allocated_bytes == 0 && st.kv_reserved_bytes == 0, "KV not returned: %zu/%zu",
              st.kv_allocated_bytes, st.kv_reserved_bytes);
    CHECK(st.steps > 0);
    if (speculative) {
        printf("kv_bits %d, temperature %.1f, speculative: %llu passes with drafts, %llu drafted, %llu accepted\n", kv_bits, temperature,
               (unsigned long long)st.drafts, (unsigned long long)st.draft_tokens,
               (unsigned long long)st.accepted_tokens);
        CHECK(st.drafts > 0 && st.accepted_tokens < st.draft_tokens);
        CHECK(st.accepted_tokens > 0 || temperature > 0);
        CHECK(st.accepted_at[0] >= st.accepted_at[1]);
    } else {
        CHECK(st.drafts == 0);
    }
    sched_destroy(s, 1);
}

static void test_cancel_and_limits(struct model *m) {
    int32_t *ids;
    int n = encode_chat(m, "Tell me a very long story about a dragon.", &ids);
    struct gen_params p = greedy(400);
    struct sched_config cfg = {.max_running = 1, .max_waiting = 2, .max_ctx = 1024, .kv_budget_bytes = 0};
    struct sched *s = sched_create(m, &cfg);
    if (!s) { CHECK(0); free(ids); return; }
    struct collected a, b, c, d;
    struct collected *all[] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; i++) { memset(all[i], 0, sizeof a); pthread_mutex_init(&all[i]->lock, NULL); }
    uint64_t ida, idb, idc, idd;
    struct sched_request_desc da = {ids, n, p, {on_token, on_done}, &a};
    CHECK(sched_submit(s, &da, &ida) == SCHED_OK);
    usleep(100000);
    da.ud = &b;
    CHECK(sched_submit(s, &da, &idb) == SCHED_OK);
    da.ud = &c;
    CHECK(sched_submit(s, &da, &idc) == SCHED_OK);
    da.ud = &d;
    CHECK_MSG(sched_submit(s, &da, &idd) == SCHED_QUEUE_FULL, "queue bound of 2 must refuse a third waiter");
    /* a is running, b and c wait: cancel one of each. A cancelled waiter
     * frees its queue slot at once, not at the engine's next step. */
    CHECK(sched_cancel(s, idb) == 0);
    CHECK_MSG(sched_submit(s, &da, &idd) == SCHED_OK, "a cancelled waiter must free its slot at once");
    CHECK(sched_cancel(s, ida) == 0);
    wait_done(&a);
    wait_done(&b);
    CHECK(a.finish == FINISH_CANCELLED && b.finish == FINISH_CANCELLED);
    CHECK(b.n_ids == 0);
    CHECK(a.n_generated < 400);
    CHECK(sched_cancel(s, ida) == -1);   /* already gone */
    CHECK(sched_cancel(s, 999999) == -1);
    /* too long for the context */
    struct gen_params huge = greedy(2000);
    struct sched_request_desc dl = {ids, n, huge, {on_token, on_done}, &d};
    uint64_t idl;
    CHECK(sched_submit(s, &dl, &idl) == SCHED_TOO_LONG);
    /* shutdown without draining cancels c and d */
    sched_destroy(s, 0);
    CHECK(c.done && c.finish == FINISH_CANCELLED);
    CHECK(d.done && d.finish == FINISH_CANCELLED);
    for (int i = 0; i < 4; i++) pthread_mutex_destroy(&all[i]->lock);
    free(ids);
}

static void test_budget(struct model *m) {
    int32_t *ids;
    int n = encode_chat(m, "Say hello.", &ids);
    struct gen_params p = greedy(8);
    struct kv_account probe;
    kv_account_init(&probe, &m->cfg, 32, 0);
    size_t one = kv_account_bytes_for(&probe, n + 8);
    kv_account_destroy(&probe);
    /* Budget for exactly one request: the second waits, then runs. */
    struct sched_config cfg = {.max_running = 4, .max_waiting = 4, .max_ctx = 0, .kv_budget_bytes = one};
    struct sched *s = sched_create(m, &cfg);
    if (!s) { CHECK(0); free(ids); return; }
    struct collected a, b, c;
    memset(&a, 0, sizeof a); memset(&b, 0, sizeof b); memset(&c, 0, sizeof c);
    pthread_mutex_init(&a.lock, NULL); pthread_mutex_init(&b.lock, NULL); pthread_mutex_init(&c.lock, NULL);
    uint64_t id;
    struct sched_request_desc d = {ids, n, p, {on_token, on_done}, &a};
    CHECK(sched_submit(s, &d, &id) == SCHED_OK);
    d.ud = &b;
    CHECK(sched_submit(s, &d, &id) == SCHED_OK);
    wait_done(&a);
    wait_done(&b);
    CHECK(a.n_generated > 0 && b.n_generated == a.n_generated);
    CHECK(!memcmp(a.ids, b.ids, (size_t)a.n_ids * sizeof(int32_t)));
    /* A request larger than the whole budget is refused outright. */
    struct gen_params big = greedy(1000);
    struct sched_request_desc dbig = {ids, n, big, {on_token, on_done}, &c};
    CHECK(sched_submit(s, &dbig, &id) == SCHED_NEVER_FITS);
    sched_destroy(s, 1);
    pthread_mutex_destroy(&a.lock); pthread_mutex_destroy(&b.lock); pthread_mutex_destroy(&c.lock);
    free(ids);
}

/* A budget smaller than what the requests will grow to: every request is
 * admitted on its prompt, grows a page at a time, and when the budget runs
 * out the newest is preempted and recomputed later. Nobody fails, and each
 * request's tokens are exactly those it gets alone (the recomputed cache is
 * the same bits). At 4 bits the replay crosses the sinks and window pages. */
static void test_preemption(struct model *m, int kv_bits) {
    static const char *prompts[] = {
        "Tell me a long story about a dragon who learns to read.",
        "Explain how a bicycle works, part by part.",
        "Describe a walk through a forest in autumn.",
    };
    enum { N = sizeof prompts / sizeof prompts[0] };
    const int max_tokens = 130;   /* past two page boundaries after the prompt */
    struct gen_params p = greedy(max_tokens);
    p.kv_bits = kv_bits;
    int32_t *ids[N];
    int n_ids[N], longest = 0;
    struct alone alone[N];
    for (int i = 0; i < N; i++) {
        n_ids[i] = encode_chat(m, prompts[i], &ids[i]);
        if (n_ids[i] > longest) longest = n_ids[i];
    }
    run_alone(m, ids, n_ids, N, &p, alone);
    struct kv_account probe;
    CHECK(kv_account_init(&probe, &m->cfg, kv_bits, 0) == 0);
    /* Room for one request at its longest and half of another: all three
     * start, and growth must preempt. */
    const size_t one = kv_account_bytes_for(&probe, longest + max_tokens);
    kv_account_destroy(&probe);
    struct sched_config cfg = {.max_running = 4, .max_waiting = 8, .max_ctx = 0, .kv_budget_bytes = one + one / 2,
                               .kv_bits = kv_bits};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) return;
    struct collected out[N];
    submit_all(s, ids, n_ids, N, &p, out, -1);
    size_t most_reserved = 0;
    for (int i = 0; i < N; i++) {
        while (!is_done(&out[i])) {
            struct sched_stats st;
            sched_get_stats(s, &st);
            if (st.kv_reserved_bytes > most_reserved) most_reserved = st.kv_reserved_bytes;
            usleep(500);
        }
    }
    struct sched_stats st;
    sched_get_stats(s, &st);
    CHECK_MSG(st.preemptions > 0, "kv_bits %d: a budget of 1.5 requests for 3 must preempt", kv_bits);
    CHECK_MSG(most_reserved <= cfg.kv_budget_bytes, "reserved %zu past the budget %zu", most_reserved,
              cfg.kv_budget_bytes);
    for (int i = 0; i < N; i++) {
        CHECK_MSG(out[i].finish == FINISH_STOP || out[i].finish == FINISH_LENGTH, "request %d finished with %s", i,
                  finish_reason_name(out[i].finish));
        int same = out[i].n_ids == alone[i].n && !memcmp(out[i].ids, alone[i].ids, (size_t)alone[i].n * sizeof(int32_t));
        CHECK_MSG(same, "kv_bits %d, request %d: %d tokens after preemption, %d alone, or different tokens", kv_bits,
                  i, out[i].n_ids, alone[i].n);
        CHECK(out[i].n_prompt == n_ids[i]);
        free(ids[i]);
        pthread_mutex_destroy(&out[i].lock);
    }
    for (int i = 0; i < 1000 && (st.kv_allocated_bytes || st.kv_reserved_bytes || st.running); i++) {
        usleep(1000);
        sched_get_stats(s, &st);
    }
    CHECK_MSG(st.kv_allocated_bytes == 0 && st.kv_reserved_bytes == 0 && st.waiting == 0,
              "KV not returned after preemption: %zu/%zu", st.kv_allocated_bytes, st.kv_reserved_bytes);
    sched_destroy(s, 1);
}

/* A prompt of 24 sentences of notes, a number hidden in the 13th, and a
 * question (about 340 tokens). */
static void write_notes(char *text, size_t size) {
    int at = snprintf(text, size, "Read the notes and remember the number.\n");
    for (int i = 0; i < 24; i++)
        at += snprintf(text + at, size - (size_t)at, i == 12 ? "The number is 4711. " :
                       "The river runs to the sea and the hills stand over the town. ");
    snprintf(text + at, size - (size_t)at, "\nWhat is the number?");
}

/* write_notes' text as a user's chat prompt. */
static int encode_notes(struct model *m, int32_t **ids) {
    char text[8192];
    write_notes(text, sizeof text);
    return encode_chat(m, text, ids);
}

/* Compression gives memory back at once: under a budget that holds one
 * whole prompt, a second request waits for the first to finish -- unless
 * the first compresses its prompt, and then the second starts while the
 * first still decodes. Each compressed request's tokens are those
 * generate() gives alone with the same compression (the stage depends on
 * the request alone, not on its batch). */
static void test_compressed_admission(struct model *m) {
    int32_t *ids[2];
    int n_ids[2];
    n_ids[0] = n_ids[1] = encode_notes(m, &ids[0]);
    ids[1] = ids[0];
    CHECK(n_ids[0] > 300);
    /* 0: whole prompts; 1: compressed; 2: compressed and speculating on
     * every draft found, so rejected drafts are rolled back in a compact
     * cache (the same tokens still); 3: compressed with a lookahead, whose
     * tokens the scheduler decodes past the point and forgets, as
     * generate() does; 4: scored by a reconstruction too, the prompt
     * written again past the point a pass at a time and forgotten before
     * the lookahead. */
    for (int compress = 0; compress < 5; compress++) {
        struct gen_params p = greedy(48);
        p.speculative = compress == 2 ? DRAFT_NGRAM : DRAFT_NONE;
        p.kv_bits = 32;   /* at 4 bits a prompt this short is mostly its f32 window pages' reservation */
        p.compress = compress_defaults();
        if (compress) {
            p.compress.mode = COMPRESS_DROP;
            p.compress.budget = 0.1f;
            p.compress.min_prompt = 0;
        }
        p.compress.lookahead = compress >= 3 ? 24 : 0;
        if (compress == 4) p.compress.select = COMPRESS_RECONSTRUCT;
        struct alone alone[1];
        run_alone(m, ids, n_ids, 1, &p, alone);
        struct kv_account probe;
        kv_account_init(&probe, &m->cfg, 32, 0);
        const size_t one = kv_account_bytes_for(&probe, n_ids[0] + 48);
        /* A lookahead's or a reconstruction's queries are recorded too, and
         * the positions they write past the point reserved from the start
         * (in both requests): room for them. */
        struct compress_params without = p.compress;
        without.lookahead = 0;
        without.select = COMPRESS_SNAPKV;
        const int reach = compress_lookahead_reach(&p.compress, n_ids[0]);
        const size_t looking = compress_observation_bytes(&m->cfg, &p.compress, n_ids[0]) -
                               compress_observation_bytes(&m->cfg, &without, n_ids[0]) +
                               (reach > n_ids[0] + 1 ? 2 * (kv_account_bytes_for(&probe, reach) -
                                                            kv_account_bytes_for(&probe, n_ids[0] + 1))
                                                     : 0);
        /* A reconstruction reaches past this short answer: the cache is that long. */
        const size_t cache = reach > n_ids[0] + 48 ? kv_account_bytes_for(&probe, reach) : one;
        kv_account_destroy(&probe);
        struct sched_config cfg = {.max_running = 4, .max_waiting = 4, .kv_budget_bytes = one + one / 3 + looking,
                                   .kv_bits = 32, .draft_always = compress == 2};
        struct sched *s = sched_create(m, &cfg);
        CHECK(s != NULL);
        if (!s) break;
        struct collected out[2];
        submit_all(s, ids, n_ids, 2, &p, out, -1);
        wait_done(&out[0]);
        wait_done(&out[1]);
        struct sched_stats st;
        sched_get_stats(s, &st);
        const int overlapped = out[1].timing.started < out[0].timing.finished;
        if (compress) {
            CHECK_MSG(overlapped, "the second request waited for the first although the first compressed");
            CHECK(st.compress[COMPRESS_DROP].requests == 2 && st.compress[COMPRESS_DROP].dropped > 0);
            if (compress == 2) CHECK_MSG(st.draft_tokens > st.accepted_tokens, "no draft was rejected: nothing rolled back");
            CHECK(out[0].timing.compress.applied && out[0].timing.compress.dropped > 0);
        } else {
            CHECK_MSG(!overlapped, "two whole prompts ran together under a budget for one");
            CHECK(st.compress[COMPRESS_DROP].requests == 0 && !out[0].timing.compress.applied);
        }
        for (int i = 0; i < 2; i++) {
            const int same = out[i].n_ids == alone[0].n && !memcmp(out[i].ids, alone[0].ids, (size_t)alone[0].n * 4);
            CHECK_MSG(same, "compress %d, request %d: scheduled tokens differ from generate()'s", compress, i);
            pthread_mutex_destroy(&out[i].lock);
        }
        sched_destroy(s, 1);
        if (!compress) continue;
        /* The queries recorded for the scoring count against the budget: a
         * budget that holds the cache but not them refuses the request, one
         * that holds both runs it. */
        const size_t obs = compress_observation_bytes(&m->cfg, &p.compress, n_ids[0]);
        const size_t q_row = (size_t)m->cfg.n_head * m->cfg.head_dim * sizeof(float);
        if (compress == 4)   /* the window's and a pass's queries, the scores of every (layer, KV head) and position */
            CHECK(obs == (size_t)m->cfg.n_layer * ((COMPRESS_WINDOW + COMPRESS_RECONSTRUCT_PASS) * q_row +
                                                   (size_t)m->cfg.n_head_kv * n_ids[0] * sizeof(float)));
        else
            CHECK(obs == (size_t)m->cfg.n_layer * (COMPRESS_WINDOW + p.compress.lookahead) * q_row);
        for (int fits = 0; fits < 2; fits++) {
            struct sched_config tight = {.max_running = 1, .max_waiting = 1, .kv_budget_bytes = cache + obs - !fits,
                                         .kv_bits = 32, .draft_always = compress == 2};
            s = sched_create(m, &tight);
            CHECK(s != NULL);
            if (!s) break;
            uint64_t id;
            struct collected c;
            memset(&c, 0, sizeof c);
            pthread_mutex_init(&c.lock, NULL);
            struct sched_request_desc d = {ids[0], n_ids[0], p, {on_token, on_done}, &c};
            const enum sched_error e = sched_submit(s, &d, &id);
            CHECK_MSG(e == (fits ? SCHED_OK : SCHED_NEVER_FITS), "budget %s the recording: submit gave %d",
                      fits ? "with" : "one byte short of", (int)e);
            if (e == SCHED_OK) {
                wait_done(&c);
                CHECK((c.finish == FINISH_STOP || c.finish == FINISH_LENGTH) && c.n_generated > 0);
            }
            sched_destroy(s, 1);
            pthread_mutex_destroy(&c.lock);
        }
    }
    free(ids[0]);
}

/* The context one request can use follows the budget: the whole context
 * when unlimited, what the budget holds for one request alone below that,
 * and it moves when the budget does. */
static void test_context_capacity(struct model *m) {
    struct sched_config cfg = {.max_running = 1, .max_waiting = 1, .max_ctx = 2048, .kv_budget_bytes = 0, .kv_bits = 4};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) return;
    CHECK(sched_context_capacity(s) == 2048);
    const size_t b300 = sched_kv_bytes_for(s, 300);
    sched_set_kv_budget(s, b300);
    const int cap = sched_context_capacity(s);
    CHECK_MSG(cap >= 300 && cap < 2048, "capacity %d for a budget of 300 positions", cap);
    CHECK(sched_kv_bytes_for(s, cap) <= b300 && sched_kv_bytes_for(s, cap + 1) > b300);
    sched_set_kv_budget(s, sched_kv_bytes_for(s, 1) - 1);
    CHECK(sched_context_capacity(s) == 0);
    sched_destroy(s, 1);
}

/* A device that fails under a running request (a kernel fault): the
 * request ends in error with the device's reason, the scheduler goes on,
 * and a request after the device recovers (here: the test mends it) runs. */
static void test_device_lost(struct model *m) {
    struct sched_config cfg = {.max_running = 4, .max_waiting = 16, .kv_bits = 4};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) return;
    int32_t *ids = NULL;
    const int n = encode_chat(m, "Name three rivers.", &ids);
    struct gen_params p = greedy(8);
    struct collected out[2];
    emu_lost = 1;
    submit_all(s, &ids, &n, 1, &p, &out[0], -1);
    wait_done(&out[0]);
    CHECK_MSG(out[0].finish == FINISH_ERROR, "finish %d", out[0].finish);
    CHECK_MSG(strstr(out[0].timing.error, "the forward pass failed: emulated device lost") != NULL, "error: '%s'",
              out[0].timing.error);
    emu_lost = 0;
    submit_all(s, &ids, &n, 1, &p, &out[1], -1);
    wait_done(&out[1]);
    CHECK(out[1].finish == FINISH_LENGTH && out[1].n_ids == 8 && !out[1].timing.error[0]);
    sched_destroy(s, 1);
    free(ids);
}

/* The sanitizers check memory, not numbers, and every layer runs the same
 * code: there the scheduler drives the model's first 8 layers, about half
 * the time (the output head's cost stays; the plain build runs all 30). */
/* One request through the scheduler, waited for; its tokens in *out. */
static void run_one(struct sched *s, const int32_t *ids, int n, const struct gen_params *p, struct collected *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_init(&out->lock, NULL);
    struct sched_request_desc d = {ids, n, *p, {on_token, on_done}, out};
    uint64_t id;
    CHECK(sched_submit(s, &d, &id) == SCHED_OK);
    wait_done(out);
    pthread_mutex_destroy(&out->lock);
}

/* ids[0, n) then `more`'s tokens (the next turn of a conversation). */
static int extend(struct model *m, const int32_t *ids, int n, const char *more, int32_t **out) {
    int32_t *tail;
    const int n_tail = tokenizer_encode(m->tok, more, strlen(more), 0, &tail);
    *out = malloc((size_t)(n + n_tail) * sizeof **out);
    memcpy(*out, ids, (size_t)n * sizeof **out);
    memcpy(*out + n, tail, (size_t)n_tail * sizeof **out);
    free(tail);
    return n + n_tail;
}

/* a[0, n_a) then b[0, n_b), in a new array. */
static int32_t *joined(const int32_t *a, int n_a, const int32_t *b, int n_b) {
    int32_t *out = malloc((size_t)(n_a + n_b) * sizeof *out);
    memcpy(out, a, (size_t)n_a * sizeof *out);
    memcpy(out + n_a, b, (size_t)n_b * sizeof *out);
    return out;
}

/* A conversation's next turn: ids[0, n) (the last answer's tokens at its
 * end), the end of that turn, the question and the assistant's start. */
static int next_turn(struct model *m, const int32_t *ids, int n, const char *question, int32_t **out) {
    char more[8400];
    snprintf(more, sizeof more, "<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", question);
    return extend(m, ids, n, more, out);
}

/* Whether a request gave the tokens generate() gave alone. */
static int same_as_alone(const struct collected *c, const struct alone *a) {
    return c->n_ids == a->n && !memcmp(c->ids, a->ids, (size_t)a->n * sizeof(int32_t));
}

/* The prompt cache: a conversation's next turn starts from the cache the
 * last turn left and computes only what follows, with the tokens generate()
 * gives the whole prompt alone; a prompt that parts from the kept tokens
 * takes a copy of what they share (KV32: the kept sequence stays for its
 * own next turn), or, at 4 bits, only what lies within the kept sequence's
 * f32 window, else nothing (and is still right); kept caches
 * give way to a request the budget cannot otherwise take, without a
 * preemption; cache_prompt 0 neither takes nor leaves one. */
static void test_prompt_cache(struct model *m, int kv_bits) {
    const int gen = 150;   /* the first turn runs past two pages: the f32 window moves on at 4 bits */
    struct gen_params p = greedy(gen);
    p.kv_bits = kv_bits;
    p.ignore_eos = 1;      /* a known length: every generated token but the last is in the cache */
    p.cache_prompt = 1;
    int32_t *a;
    const int n_a = encode_chat(m, "Tell me about the moon.", &a);
    struct kv_account probe;
    CHECK(kv_account_init(&probe, &m->cfg, kv_bits, 0) == 0);
    const size_t one = kv_account_bytes_for(&probe, n_a + 2 * gen + 40);
    kv_account_destroy(&probe);
    /* Room for two kept conversations; the end lowers the budget. */
    struct sched_config cfg = {.max_running = 4, .max_waiting = 8, .kv_budget_bytes = 3 * one, .kv_bits = kv_bits,
                               .prompt_cache_bytes = 2 * one};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) { free(a); return; }
    struct collected first, next, apart, off;
    run_one(s, a, n_a, &p, &first);
    CHECK(first.finish == FINISH_LENGTH && first.n_ids == gen && first.timing.cached == 0);
    struct sched_stats st;
    sched_get_stats(s, &st);
    CHECK_MSG(st.prompt_cache_entries == 1 && st.prompt_cache_bytes > 0 &&
                  st.prompt_cache_bytes == st.kv_reserved_bytes,
              "kv_bits %d: %d caches kept, %zu bytes, %zu reserved", kv_bits, st.prompt_cache_entries,
              st.prompt_cache_bytes, st.kv_reserved_bytes);
    /* The next turn: the whole conversation again, then more. */
    int32_t *conv, *b;
    const int n_conv = n_a + first.n_ids;
    conv = joined(a, n_a, first.ids, first.n_ids);
    const int n_b = next_turn(m, conv, n_conv, "And the sun?", &b);
    struct gen_params p2 = p;
    p2.max_tokens = 30;
    struct alone alone;
    run_alone(m, &b, &n_b, 1, &p2, &alone);
    run_one(s, b, n_b, &p2, &next);
    CHECK_MSG(next.timing.cached == n_conv - 1, "kv_bits %d: the next turn took %d tokens from the cache, not %d",
              kv_bits, next.timing.cached, n_conv - 1);
    CHECK_MSG(same_as_alone(&next, &alone),
              "kv_bits %d: the next turn's tokens differ from the prompt computed whole", kv_bits);
    /* A prompt that parts from the kept tokens 20 tokens into the first
     * answer: far before the window at 4 bits. */
    int32_t *c;
    const int n_c = extend(m, conv, n_a + 20, " Actually, tell me about Mars instead.", &c);
    run_alone(m, &c, &n_c, 1, &p2, &alone);
    run_one(s, c, n_c, &p2, &apart);
    const int want = kv_bits == 32 ? n_a + 20 : 0;
    CHECK_MSG(apart.timing.cached == want, "kv_bits %d: a prompt parting at %d took %d tokens from the cache, not %d",
              kv_bits, n_a + 20, apart.timing.cached, want);
    CHECK_MSG(same_as_alone(&apart, &alone),
              "kv_bits %d: a prompt parting from the cache gives other tokens than computed whole", kv_bits);
    /* Not asked: nothing taken, nothing left. */
    struct gen_params p3 = p2;
    p3.cache_prompt = 0;
    run_one(s, c, n_c, &p3, &off);
    CHECK(off.timing.cached == 0 && same_as_alone(&off, &alone));
    /* The parting prompt took a copy of the shared start (KV32): the
     * conversation's third turn still finds the whole second one. */
    int32_t *conv2, *d;
    const int n_conv2 = n_b + next.n_ids;
    conv2 = joined(b, n_b, next.ids, next.n_ids);
    const int n_d = next_turn(m, conv2, n_conv2, "Thanks.", &d);
    struct collected third;
    run_alone(m, &d, &n_d, 1, &p2, &alone);
    run_one(s, d, n_d, &p2, &third);
    CHECK_MSG(third.timing.cached == n_conv2 - 1, "kv_bits %d: the third turn took %d tokens from the cache, not %d",
              kv_bits, third.timing.cached, n_conv2 - 1);
    CHECK(same_as_alone(&third, &alone));
    sched_get_stats(s, &st);
    CHECK_MSG(st.prompt_cache_entries == 2 && st.prompt_cache_hits == 2 + (kv_bits == 32),
              "kv_bits %d: %d kept, %llu hits", kv_bits, st.prompt_cache_entries,
              (unsigned long long)st.prompt_cache_hits);
    /* A budget that takes a new request or the kept cache, not both: the
     * kept cache makes room, nobody waits or is preempted. */
    CHECK(kv_account_init(&probe, &m->cfg, kv_bits, 0) == 0);
    const size_t need = kv_account_bytes_for_pass(&probe, n_a + 1, n_a);
    kv_account_destroy(&probe);
    sched_set_kv_budget(s, need + st.prompt_cache_bytes - 1);
    struct gen_params small = p3;
    small.max_tokens = 8;
    struct collected fresh;
    run_one(s, a, n_a, &small, &fresh);
    sched_get_stats(s, &st);
    CHECK_MSG(fresh.finish == FINISH_LENGTH && st.preemptions == 0 && st.prompt_cache_evictions >= 1 &&
                  st.prompt_cache_entries <= 1 && st.kv_reserved_bytes == st.prompt_cache_bytes,
              "kv_bits %d: %s, %llu preemptions, %llu evictions, %d kept, %zu reserved", kv_bits,
              finish_reason_name(fresh.finish), (unsigned long long)st.preemptions,
              (unsigned long long)st.prompt_cache_evictions, st.prompt_cache_entries, st.kv_reserved_bytes);
    sched_destroy(s, 1);
    free(a); free(b); free(c); free(d); free(conv); free(conv2);
}

/* Greedy decoding of max_tokens at kv_bits, compressing (demote, the
 * default budget) every prompt of 200 tokens or more: write_notes' prompt. */
static struct gen_params demoting(int max_tokens, int kv_bits) {
    struct gen_params p = greedy(max_tokens);
    p.kv_bits = kv_bits;
    p.compress = compress_defaults();
    p.compress.mode = COMPRESS_DEMOTE;
    p.compress.min_prompt = 200;
    return p;
}

/* The prompt cache with context compression (issue 14's multi-turn): a
 * compressed turn's cache goes on for the next turn that compresses alike,
 * which is compressed again at its own end over the store and what it
 * added -- exactly generate() of the whole prompt compressed at the first
 * turn's end and again at its own (compress.earlier), the budget a share
 * of the whole conversation -- and so on for a third turn; a turn that
 * adds less than an observation window is not compressed again (the
 * reference: compressed where the previous turn was, the rest fed after);
 * the same prompt sent again takes nothing (it would recompute its last
 * token from the compressed cache);
 * other settings, or none, take nothing from it. A short first turn (not
 * compressed) goes on for a long second one that is compressed at its own
 * end, exactly as computed whole. */
static void test_prompt_cache_compressed(struct model *m) {
    char text[8192];
    write_notes(text, sizeof text);
    int32_t *a;
    const int n_a = encode_chat(m, text, &a);
    struct gen_params p = demoting(20, 32);
    p.ignore_eos = 1;
    p.cache_prompt = 1;
    struct sched_config cfg = {.max_running = 4, .max_waiting = 8, .kv_bits = 32, .prompt_cache_bytes = 1 << 30};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) { free(a); return; }
    struct collected first, next, other;
    run_one(s, a, n_a, &p, &first);
    CHECK(first.timing.compress.applied && first.n_ids == 20);
    /* The same prompt again is compressed afresh: its last token was
     * computed from the whole cache, not the compressed one. */
    struct collected again;
    run_one(s, a, n_a, &p, &again);
    CHECK_MSG(again.timing.cached == 0 && again.timing.compress.applied && again.n_ids == 20 &&
                  !memcmp(again.ids, first.ids, sizeof first.ids[0] * 20),
              "the same compressed prompt again took %d tokens, compressed: %d", again.timing.cached,
              again.timing.compress.applied);
    int32_t *conv, *b;
    conv = joined(a, n_a, first.ids, 20);
    /* A second turn that adds more than a page: compressed again at its end,
     * from the whole kept cache (it computes a whole window of its own). */
    const int n_b = next_turn(m, conv, n_a + 20,
                              "And the river? Tell me where it rises, which towns it passes on its way, "
                              "and where it meets the sea, and say which of its bridges is the oldest.", &b);
    CHECK(n_b - (n_a + 19) >= KV_PAGE_TOKENS);
    struct gen_params ref = p, p70 = p;
    p70.max_tokens = 70;
    ref.max_tokens = 70;
    ref.compress.n_earlier = 1;   /* compressed after the first turn's prompt, then at the end */
    ref.compress.earlier[0] = (struct compress_mark){n_a, 0};
    struct alone alone;
    run_alone(m, &b, &n_b, 1, &ref, &alone);
    run_one(s, b, n_b, &p70, &next);
    CHECK_MSG(next.timing.cached == n_a + 19 && next.timing.compress.applied,
              "the compressed turn's successor took %d tokens (not %d), compressed again: %d", next.timing.cached,
              n_a + 19, next.timing.compress.applied);
    const int recent = KV_SINK_TOKENS + n_b - next.timing.compress.boundary;
    const int budget = (int)lroundf(0.25f * (float)n_b) > recent ? (int)lroundf(0.25f * (float)n_b) : recent;
    CHECK_MSG(next.timing.compress.kept == budget && next.timing.compress.dropped == 0 &&
                  next.timing.compress.demoted > first.timing.compress.demoted,
              "the second turn's compression kept %d of %d, demoted %d (first turn %d), dropped %d",
              next.timing.compress.kept, n_b, next.timing.compress.demoted, first.timing.compress.demoted,
              next.timing.compress.dropped);
    CHECK_MSG(same_as_alone(&next, &alone),
              "the next turn on a compressed cache differs from compressing at both turns' ends");
    /* A third request that adds less than a window after a long answer (a
     * chat's usual next turn): it takes the kept cache up to its last 32
     * tokens and computes them again, for the window, then compresses. */
    int32_t *conv3, *b3;
    conv3 = joined(b, n_b, next.ids, 70);
    const int n_b3 = extend(m, conv3, n_b + 70, " Why?", &b3);
    CHECK(n_b3 - (n_b + 69) < COMPRESS_WINDOW);
    ref = p;
    ref.compress.n_earlier = 2;
    ref.compress.earlier[0] = (struct compress_mark){n_a, 0};
    ref.compress.earlier[1] = (struct compress_mark){n_b, 0};
    struct collected third, fourth;
    run_alone(m, &b3, &n_b3, 1, &ref, &alone);
    run_one(s, b3, n_b3, &p, &third);
    CHECK_MSG(third.timing.cached == n_b3 - COMPRESS_WINDOW && third.timing.compress.applied &&
                  same_as_alone(&third, &alone),
              "the third turn took %d tokens (not %d), compressed: %d, as alone: %d", third.timing.cached,
              n_b3 - COMPRESS_WINDOW, third.timing.compress.applied, same_as_alone(&third, &alone));
    /* A request that goes on from a few tokens into the last answer: too
     * few of its own for a window, not compressed again. */
    int32_t *conv4, *b4;
    conv4 = joined(b3, n_b3, third.ids, 3);
    const int n_b4 = extend(m, conv4, n_b3 + 3, " Yes", &b4);
    CHECK(n_b4 - n_b3 < COMPRESS_MIN_WINDOW);
    ref.compress.n_earlier = 2;
    ref.compress.at = n_b3;
    run_alone(m, &b4, &n_b4, 1, &ref, &alone);
    run_one(s, b4, n_b4, &p, &fourth);
    CHECK_MSG(fourth.timing.cached >= n_b3 + 3 && !fourth.timing.compress.applied && same_as_alone(&fourth, &alone),
              "a short fourth request took %d tokens (not %d), compressed: %d, as alone: %d", fourth.timing.cached,
              n_b3 + 3, fourth.timing.compress.applied, same_as_alone(&fourth, &alone));
    /* What a preempted turn does: the whole prompt computed anew, stopping
     * and compressing at each of its points (here the third turn's, given
     * to a request that takes no kept cache) -- the same tokens as the
     * turn that went on from the cache, and as generate(). */
    struct gen_params again3 = ref;
    again3.compress.at = 0;
    again3.cache_prompt = 0;
    struct collected anew;
    run_one(s, b3, n_b3, &again3, &anew);
    CHECK_MSG(anew.timing.cached == 0 && anew.timing.compress.applied && anew.n_ids == third.n_ids &&
                  !memcmp(anew.ids, third.ids, sizeof third.ids[0] * (size_t)third.n_ids),
              "the third turn computed anew at its points differs from the turn that took the cache");
    free(conv3); free(b3); free(conv4); free(b4);
    /* Other settings: nothing taken, compressed at its own end as alone. */
    struct gen_params half = p;
    half.compress.budget = 0.5f;
    run_alone(m, &b, &n_b, 1, &half, &alone);
    run_one(s, b, n_b, &half, &other);
    CHECK(other.timing.cached == 0 && other.timing.compress.applied);
    CHECK(same_as_alone(&other, &alone));
    /* A short turn (under min_prompt), then a long one that compresses. */
    int32_t *hi;
    const int n_hi = encode_chat(m, "Read the notes.", &hi);
    struct collected shorter, longer;
    run_one(s, hi, n_hi, &p, &shorter);
    CHECK(!shorter.timing.compress.applied);
    int32_t *c;
    int32_t *turn = joined(hi, n_hi, shorter.ids, 20);
    const int n_c = next_turn(m, turn, n_hi + 20, text, &c);
    run_alone(m, &c, &n_c, 1, &p, &alone);
    run_one(s, c, n_c, &p, &longer);
    CHECK_MSG(longer.timing.cached == n_hi + 19 && longer.timing.compress.applied,
              "a long turn after a short one took %d tokens (not %d), compressed: %d", longer.timing.cached,
              n_hi + 19, longer.timing.compress.applied);
    CHECK(same_as_alone(&longer, &alone));
    sched_destroy(s, 1);
    free(a); free(b); free(c); free(conv); free(hi); free(turn);
}

/* On a device, whose caches are not compressed, a request that asks for
 * compression needs no room for the recording of its queries (2.2 MB on
 * the whole default model): a budget that holds its cache and half that
 * recording takes it, and it runs uncompressed, as generate() does on the
 * device. */
static void test_device_compression_needs_no_recording(struct model *m) {
    int32_t *a;
    const int n_a = encode_notes(m, &a);
    struct gen_params p = demoting(4, 4);
    struct sched_config cfg = {.max_running = 2, .max_waiting = 4, .kv_bits = 4};
    struct sched *s = sched_create(m, &cfg);
    CHECK(s != NULL);
    if (!s) { free(a); return; }
    const size_t recording = compress_observation_bytes(&m->cfg, &p.compress, n_a);
    CHECK(recording > 0);
    sched_set_kv_budget(s, sched_kv_bytes_for(s, n_a + 4) + recording / 2);
    struct alone alone;
    run_alone(m, &a, &n_a, 1, &p, &alone);
    struct collected out;
    run_one(s, a, n_a, &p, &out);
    CHECK_MSG(!out.timing.compress.applied && same_as_alone(&out, &alone),
              "a compressing request on the device: compressed %d, as alone %d", out.timing.compress.applied,
              same_as_alone(&out, &alone));
    sched_destroy(s, 1);
    free(a);
}

static void shorten_when_sanitized(struct model *m) {
#if defined(__SANITIZE_ADDRESS__)
    model_keep_layers(m, 8);
#else
    (void)m;
#endif
}

/* Three parts, so that `ctest -j` runs them side by side (CMakeLists.txt
 * registers each; no argument runs all three): "batching" (every stream as
 * alone, drafts or not, cancellation), "memory" (budgets, preemption,
 * compressed admission, the prompt cache) and "device" (the scheduler
 * over the emulated device). */
int main(int argc, char **argv) {
    const char *part = argc > 1 ? argv[1] : "all";
    const int all = !strcmp(part, "all");
    if (!all && strcmp(part, "batching") && strcmp(part, "memory") && strcmp(part, "device")) {
        fprintf(stderr, "usage: test_scheduler [batching|memory|device]\n");
        return 2;
    }
    char path[1024], err[512];
    if (check_model_path(path, sizeof path)) return check_report_skipped("test_scheduler", path);
    struct model m;
    if (all || !strcmp(part, "batching") || !strcmp(part, "memory")) {
        if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
            fprintf(stderr, "cannot load the default model: %s (run scripts/setup)\n", err);
            return 1;
        }
        if (all || !strcmp(part, "memory")) {
            /* The whole model even when sanitized: a shallow one copies the
             * prompt's filler and never has a draft rejected, and the
             * rollback in a compact cache is what this must reach. */
            test_compressed_admission(&m);
            test_prompt_cache_compressed(&m);
            shorten_when_sanitized(&m);
            test_budget(&m);
            test_preemption(&m, 32);
            test_preemption(&m, 4);
            test_prompt_cache(&m, 32);
            test_prompt_cache(&m, 4);
            test_context_capacity(&m);
        }
        if (all || !strcmp(part, "batching")) {
            shorten_when_sanitized(&m);
            test_batched_equals_alone(&m, 32, DRAFT_NONE, 0);
            test_batched_equals_alone(&m, 4, DRAFT_NONE, 0);
            test_batched_equals_alone(&m, 32, DRAFT_NGRAM, 0);
            test_batched_equals_alone(&m, 4, DRAFT_NGRAM, 0);
            test_batched_equals_alone(&m, 4, DRAFT_NGRAM, 0.9f);
            test_cancel_and_limits(&m);
        }
        model_free(&m);
    }
    /* The scheduler over a model on a device (the emulated one: scalar ops
     * behind pointers the host cannot touch; test_device_engine holds its
     * passes to the CPU's bits): continuous batching, n-gram verification
     * and KV4 caches in the device's memory, every stream as alone. */
    const struct ebb_backend *emu = all || !strcmp(part, "device") ? emulated_device() : NULL;
    char why[256] = "";
    if (emu && model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err) == 0) {
        model_keep_layers(&m, 4);   /* the scalar ops are slow; every layer runs alike */
        CHECK_MSG(model_place(&m, emu, why, sizeof why) == 0, "%s", why);
        if (m.placed) test_batched_equals_alone(&m, 4, DRAFT_NGRAM, 0);
        if (m.placed) test_prompt_cache(&m, 4);   /* a kept cache's page tables move with it */
        if (m.placed) test_device_lost(&m);
        if (m.placed) test_device_compression_needs_no_recording(&m);
        model_free(&m);
    }
    return check_report("test_scheduler");
}
