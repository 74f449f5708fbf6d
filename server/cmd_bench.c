/* `ebb bench`: prefill and decode speed, measured like llama-bench's pp and tg
 * tests so the numbers can sit beside llama.cpp's:
 *   pp N: one forward pass over N tokens from an empty cache;
 *   tg N: N single-token forward passes from an empty cache;
 *   tg N bB (-b B): B sequences decoding together, one token each per pass
 *   (continuous batching's decode step), N passes; t/s counts all B.
 * Token ids are drawn from a fixed-seed generator; speed does not depend on
 * which ids they are. Each test runs once to warm up, then -r times.
 *
 * Decode on a CPU is bound by memory bandwidth: every token reads every
 * weight matrix once. So the bench also says how close decode comes to that
 * limit: the bytes of weights one decoded token reads (every matrix and the
 * head; of the input embedding only one row, so it is left out when it is not
 * also the head; the KV cache is left out too, under 3% of the reads for the
 * default model at tg128), times tokens per second, over the bandwidth of a
 * plain copy loop on the same threads (bytes read plus bytes written per
 * second, as STREAM's Copy counts them). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/bitstack.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "kernels/backend.h"
#include "kernels/formats.h"
#include "server/cli.h"

/* A "Key:   N kB" line of /proc/self/status in MiB; -1 where there is none. */
static double status_mib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double mib = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) {
            mib = strtod(line + strlen(key), NULL) / 1024.0;
            break;
        }
    if (f) fclose(f);
    return mib;
}

static void bench_usage(FILE *out) {
    fprintf(out,
        "usage: ebb bench -m MODEL [-p N] [-n N] [-r REPS] [--kv-bits N] [-t THREADS]\n"
        "  -p N   prefill tokens (default 512; 0 skips)\n"
        "  -n N   decode tokens (default 128; 0 skips)\n"
        "  -r R   repetitions (default 3)\n"
        "  -b B   also decode B sequences together (tg N bB; default 1: only tg N)\n"
        "  --kv-bits N   KV cache precision: 32 (default), 16, 8 or 4\n"
        "  --weights W   native (default: the file's quantized types, used in place) or f32\n"
        "  --device D    cpu (default) or cuda[:N]: weights and KV cache on that GPU\n"
        "  --stack-bytes N   a bitstack file: keep the prefix of its stack that fits in N bytes\n"
        "                (default: all of it)\n"
        "  --verify K   speculative decoding's cost curve: after a context of --depth tokens\n"
        "               (default 128), the time of one pass over 1 .. K+1 tokens, each rolled back\n"
        "  --depth D    the context --verify measures at (default 128)\n");
}

/* A test's row: the mean and standard deviation of its reps' rates. */
struct rates {
    double sum, sum2;
    int n;
};

static void rates_add(struct rates *r, double tps) {
    r->sum += tps;
    r->sum2 += tps * tps;
    r->n++;
}

static double rates_print(const char *label, const struct rates *r) {
    const double mean = r->sum / r->n;
    const double sd = r->n > 1 ? sqrt(fmax(0, (r->sum2 - r->n * mean * mean) / (r->n - 1))) : 0;
    printf("| %-8s | %8.2f ± %6.2f |\n", label, mean, sd);
    return mean;
}

/* Seconds for one run of the test; -1 on failure. */
static double run_once(struct model_run *m, struct kv_cache *kv, const int32_t *ids, int n, int prefill,
                       float *logits) {
    kv_cache_clear(kv);
    double t0 = ebb_now_seconds();
    if (prefill) {
        if (model_forward(m, kv, ids, n, logits, 0)) return -1;
    } else {
        for (int i = 0; i < n; i++)
            if (model_forward(m, kv, ids + i, 1, logits, 0)) return -1;
    }
    return ebb_now_seconds() - t0;
}

static int bench_test(struct model_run *run, struct kv_account *kv_policy, const char *label, int n, int prefill,
                      int reps, double *mean_tps) {
    const struct model *m = model_run_model(run);
    struct kv_cache kv;
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    float *logits = malloc((size_t)m->cfg.n_vocab * sizeof(float));
    if (!ids || !logits || kv_cache_init(&kv, &m->cfg, n, kv_policy)) {
        free(ids); free(logits);
        fprintf(stderr, "ebb bench: out of memory\n");
        return -1;
    }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ids[i] = (int32_t)(x % (uint64_t)m->cfg.n_vocab);
    }
    struct rates rates = {0, 0, 0};
    int rc = run_once(run, &kv, ids, n, prefill, logits) < 0 ? -1 : 0;
    for (int r = 0; r < reps && rc == 0; r++) {
        double s = run_once(run, &kv, ids, n, prefill, logits);
        if (s <= 0) { rc = -1; break; }
        rates_add(&rates, n / s);
    }
    if (rc == 0) {
        *mean_tps = rates_print(label, &rates);
    } else {
        fprintf(stderr, "ebb bench: %s failed\n", label);
    }
    kv_cache_free(&kv);
    free(ids);
    free(logits);
    return rc;
}

/* B sequences decoding together: n passes of B tokens, one per sequence,
 * each from its own cache (ids differ per sequence); tokens per second
 * over all B. Warmed up once, then reps times. */
static int bench_batch(struct model_run *run, struct kv_account *kv_policy, const char *label, int n, int batch,
                       int reps) {
    const struct model *m = model_run_model(run);
    struct kv_cache *kv = calloc((size_t)batch, sizeof *kv);
    struct batch_seq *seqs = calloc((size_t)batch, sizeof *seqs);
    int32_t *ids = malloc((size_t)batch * n * sizeof(int32_t));
    float *logits = malloc((size_t)batch * m->cfg.n_vocab * sizeof(float));
    int made = 0, rc = !kv || !seqs || !ids || !logits ? -1 : 0;
    for (; rc == 0 && made < batch; made++)
        if (kv_cache_init(&kv[made], &m->cfg, n, kv_policy)) rc = -1;
    for (int i = 0; rc == 0 && i < batch * n; i++) ids[i] = (int32_t)((uint64_t)(i + 7) * 2654435761u % (uint64_t)m->cfg.n_vocab);
    struct rates rates = {0, 0, 0};
    for (int r = 0; r <= reps && rc == 0; r++) {   /* the first round warms up */
        for (int b = 0; b < batch; b++) kv_cache_clear(&kv[b]);
        const double t0 = ebb_now_seconds();
        for (int i = 0; i < n && rc == 0; i++) {
            for (int b = 0; b < batch; b++)
                seqs[b] = (struct batch_seq){&kv[b], ids + (size_t)b * n + i, 1, logits + (size_t)b * m->cfg.n_vocab, 0, NULL};
            if (model_forward_batch(run, seqs, batch)) rc = -1;
        }
        const double s = ebb_now_seconds() - t0;
        if (r > 0 && rc == 0) rates_add(&rates, (double)batch * n / s);
    }
    if (rc == 0) {
        rates_print(label, &rates);
    } else {
        fprintf(stderr, "ebb bench: %s failed\n", label);
    }
    for (int b = 0; b < made; b++) kv_cache_free(&kv[b]);
    free(kv), free(seqs), free(ids), free(logits);
    return rc;
}

/* What verifying k drafted tokens costs: one pass over k + 1 tokens at a
 * context of `depth`, against one pass over one token, c(k) = t(k+1) / t(1).
 * Each pass is rolled back (kv_cache_truncate) so every one starts from the
 * same cache; the passes of all lengths are interleaved, rep by rep, so
 * that a noisy machine slows them alike, and each length keeps its best
 * time (the least disturbed). */
static int bench_verify(struct model_run *run, struct kv_account *kv_policy, int max_draft, int depth, int reps) {
    const struct model *m = model_run_model(run);
    const int n = depth + max_draft + 1;
    struct kv_cache kv;
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    float *logits = malloc((size_t)(max_draft + 1) * m->cfg.n_vocab * sizeof(float));
    double *best = malloc((size_t)(max_draft + 2) * sizeof(double));
    int rc = !ids || !logits || !best || kv_cache_init(&kv, &m->cfg, n, kv_policy) ? -1 : 0;
    if (rc) {
        free(ids); free(logits); free(best);
        fprintf(stderr, "ebb bench: out of memory\n");
        return -1;
    }
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((uint64_t)(i + 1) * 2654435761u % (uint64_t)m->cfg.n_vocab);
    if (model_forward(run, &kv, ids, depth, logits, 0)) rc = -1;
    for (int len = 1; len <= max_draft + 1; len++) best[len] = INFINITY;
    for (int r = 0; r <= reps && rc == 0; r++)   /* the first round warms up */
        for (int len = 1; len <= max_draft + 1 && rc == 0; len++) {
            const double t0 = ebb_now_seconds();
            /* every row's logits, as a verification pass wants them */
            if (model_forward(run, &kv, ids + depth, len, logits, 1) || kv_cache_truncate(&kv, depth)) rc = -1;
            const double s = ebb_now_seconds() - t0;
            if (r > 0 && s < best[len]) best[len] = s;
        }
    if (rc == 0) {
        printf("verification at a context of %d tokens (best of %d):\n| k | pass tokens | ms | c(k) |\n"
               "|---|---|---|---|\n", depth, reps);
        for (int len = 1; len <= max_draft + 1; len++)
            printf("| %d | %d | %.2f | %.2f |\n", len - 1, len, best[len] * 1e3, best[len] / best[1]);
    } else {
        fprintf(stderr, "ebb bench: the verification passes failed\n");
    }
    kv_cache_free(&kv);
    free(ids);
    free(logits);
    free(best);
    return rc;
}

/* Weight bytes one decoded token reads (see the top of the file). */
static size_t decode_weight_bytes(const struct model *m) {
    const struct matrix *e = &m->embd;
    if (e->data == m->output.data) return m->weight_bytes;   /* tied: the head reads the embedding */
    return m->weight_bytes - (size_t)e->n_out * ebb_row_bytes(e->type, (uint64_t)e->n_in);
}

struct copy_job {
    char *dst;
    const char *src;
    size_t bytes;
};

static void copy_task(void *arg, int part, int n_parts) {
    const struct copy_job *j = arg;
    const size_t a = j->bytes * part / n_parts, b = j->bytes * (part + 1) / n_parts;
    memcpy(j->dst + a, j->src + a, b - a);
}

/* Bytes read plus written per second by memcpy over 256 MiB, split across the
 * pool's threads; the best of five passes. 0 when out of memory. */
static double copy_bandwidth(struct ebb_pool *pool) {
    const size_t bytes = (size_t)256 << 20;
    char *src = malloc(bytes), *dst = malloc(bytes);
    double best = 0;
    if (src && dst) {
        memset(src, 1, bytes);
        memset(dst, 2, bytes);
        struct copy_job job = {dst, src, bytes};
        for (int pass = 0; pass < 5; pass++) {
            double t0 = ebb_now_seconds();
            ebb_pool_run(pool, copy_task, &job, ebb_pool_threads(pool));
            double s = ebb_now_seconds() - t0;
            if (s > 0 && 2.0 * bytes / s > best) best = 2.0 * bytes / s;
        }
    }
    free(src);
    free(dst);
    return best;
}

int cmd_bench(int argc, char **argv) {
    const char *model_path = NULL;
    int n_prefill = 512, n_decode = 128, reps = 3, n_threads = 0, kv_bits = 32, verify = 0, depth = 128, batch = 1;
    enum model_weights weights = MODEL_WEIGHTS_NATIVE;
    const char *device = "cpu";
    uint64_t stack_bytes = UINT64_MAX;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { bench_usage(stdout); return 0; }
        if (!(v = cli_value("bench", argc, argv, &i))) return 2;
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-p")) { if (cli_int("bench", a, v, 0, 1 << 16, &n_prefill)) return 2; }
        else if (!strcmp(a, "-n")) { if (cli_int("bench", a, v, 0, 1 << 16, &n_decode)) return 2; }
        else if (!strcmp(a, "-r")) { if (cli_int("bench", a, v, 1, 1000, &reps)) return 2; }
        else if (!strcmp(a, "-b")) { if (cli_int("bench", a, v, 1, MODEL_MAX_BATCH, &batch)) return 2; }
        else if (!strcmp(a, "-t")) { if (cli_int("bench", a, v, 1, 1024, &n_threads)) return 2; }
        else if (!strcmp(a, "--weights")) { if (cli_weights("bench", v, &weights)) return 2; }
        else if (!strcmp(a, "--device")) { if (cli_device("bench", v, &device)) return 2; }
        else if (!strcmp(a, "--kv-bits")) { if (cli_int("bench", a, v, 4, 32, &kv_bits)) return 2; }
        else if (!strcmp(a, "--stack-bytes")) { if (cli_u64("bench", a, v, &stack_bytes)) return 2; }
        else if (!strcmp(a, "--verify")) { if (cli_int("bench", a, v, 1, 64, &verify)) return 2; }
        else if (!strcmp(a, "--depth")) { if (cli_int("bench", a, v, 1, 1 << 16, &depth)) return 2; }
        else { fprintf(stderr, "ebb bench: unknown option '%s'\n", a); bench_usage(stderr); return 2; }
    }
    struct model m;
    struct model_run *run = cli_load_model("bench", &m, model_path, weights, device, n_threads);
    if (!run) return 1;
    const int stack_rc = cli_fit_stack("bench", &m, stack_bytes);
    if (stack_rc) {
        model_run_free(run);
        model_free(&m);
        return stack_rc;
    }
    if (n_prefill > m.cfg.n_ctx_train || n_decode > m.cfg.n_ctx_train || depth + verify + 1 > m.cfg.n_ctx_train) {
        fprintf(stderr, "ebb bench: test longer than the model's context (%d)\n", m.cfg.n_ctx_train);
        model_run_free(run);
        model_free(&m);
        return 2;
    }
    struct kv_account kv_policy;    /* the caches' precision; no budget */
    if (kv_account_init(&kv_policy, &m.cfg, kv_bits, 0)) {
        fprintf(stderr, "ebb bench: %s\n", kv_bits_problem(&m.cfg, kv_bits));
        model_run_free(run);
        model_free(&m);
        return 2;
    }
    kv_policy.be = m.be;            /* the caches live where the model computes */
    const double rss_loaded = status_mib("VmRSS:");
    printf("model: %s  arch %s  resident weights %.1f MiB  backend %s  threads %d  kv_bits %d\n", model_path,
           m.cfg.arch, m.weight_bytes / 1048576.0, m.be->name, ebb_pool_threads(model_run_pool(run)), kv_bits);
    printf("| test     |            t/s    |\n|----------|-------------------|\n");
    char label[32];
    int rc = 0;
    double pp_tps = 0, tg_tps = 0;
    if (n_prefill) {
        snprintf(label, sizeof label, "pp%d", n_prefill);
        rc |= bench_test(run, &kv_policy, label, n_prefill, 1, reps, &pp_tps);
    }
    if (n_decode) {
        snprintf(label, sizeof label, "tg%d", n_decode);
        rc |= bench_test(run, &kv_policy, label, n_decode, 0, reps, &tg_tps);
    }
    if (n_decode && batch > 1) {
        snprintf(label, sizeof label, "tg%d b%d", n_decode, batch);
        rc |= bench_batch(run, &kv_policy, label, n_decode, batch, reps);
    }
    if (verify) rc |= bench_verify(run, &kv_policy, verify, depth, reps);
    /* Mapped weights count once their pages are read, so RSS after the
     * tests (every weight read) is the figure to hold against the file;
     * taken before the copy loop's buffers. */
    const double rss_tests = status_mib("VmRSS:"), rss_peak = status_mib("VmHWM:");
    if (n_decode && tg_tps > 0 && m.placed) {   /* the host's copy loop says nothing of a GPU's memory */
        const double bytes = (double)decode_weight_bytes(&m);
        printf("decode reads %.1f MiB of weights per token: %.1f GB/s of weights at tg\n", bytes / 1048576.0,
               bytes * tg_tps / 1e9);
    } else if (n_decode && tg_tps > 0) {
        const double bytes = (double)decode_weight_bytes(&m), bw = copy_bandwidth(model_run_pool(run));
        printf("decode reads %.1f MiB of weights per token; copy loop %.2f GB/s; tg at %.1f%% of that\n",
               bytes / 1048576.0, bw / 1e9, bw > 0 ? 100.0 * bytes * tg_tps / bw : 0.0);
    }
    struct stat st;
    printf("rss after load %.1f MiB, after the tests %.1f MiB (peak %.1f MiB); file %.1f MiB\n", rss_loaded,
           rss_tests, rss_peak, stat(model_path, &st) ? 0.0 : st.st_size / 1048576.0);
    kv_account_destroy(&kv_policy);
    model_run_free(run);
    model_free(&m);
    return rc ? 1 : 0;
}
