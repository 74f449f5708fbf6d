/* Tests for the CPU op table and the worker pool.
 *
 * Every op of every path this CPU can run is compared with the scalar path on
 * seeded random data at awkward sizes (lengths that are not multiples of the
 * vector width, of the register tiles or of the cache blocks), and the scalar
 * path itself is compared with a double-precision reference computed here.
 * matmul runs without a pool and with pools of 1..4 threads.
 *
 * Tolerances. Float sums may differ between paths (lanes, tiles and chunks
 * change the summation order), so sums are compared with the worst-case bound
 * for recursive float summation of n terms, gamma_n = n * 2^-24, applied to
 * sum |x_i * w_i|; two results that each satisfy the bound differ by at most
 * twice that. This bound cannot flake, yet a single missing, duplicated or
 * misplaced term (typically |x_i w_i| ~ sum / n) exceeds it for every n used
 * here (n <= 1536). Element-wise ops with exp compare with a relative
 * tolerance of 1e-5 plus 1e-30 absolute (the SIMD exp is within a few ulp).
 * Outputs are pre-filled with NaN and guarded by canaries, so an output that
 * is never written, or a write past the end, fails.
 *
 * A path the CPU cannot run (AVX-512 on most machines) is reported as skipped.
 */
#include "check.h"
#include "kernels/backend.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define U32 (1.0 / 16777216.0)        /* 2^-24, the unit roundoff of float */
#define CANARY 16                     /* guard floats after every output */
#define CANARY_VALUE 12345.678f

static uint64_t rng = 0x2545f4914f6cdd1dull;
static float frand(void)              /* uniform in [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *rand_vec(size_t n, float scale)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) { fprintf(stderr, "out of memory\n"); exit(2); }
    for (size_t i = 0; i < n; i++) v[i] = frand() * scale;
    return v;
}

/* n floats of NaN followed by CANARY guard values. */
static float *out_buf(size_t n)
{
    float *v = malloc((n + CANARY) * sizeof *v);
    if (!v) { fprintf(stderr, "out of memory\n"); exit(2); }
    for (size_t i = 0; i < n; i++) v[i] = NAN;
    for (size_t i = 0; i < CANARY; i++) v[n + i] = CANARY_VALUE;
    return v;
}

static int canaries_ok(const float *v, size_t n)
{
    for (size_t i = 0; i < CANARY; i++) if (v[n + i] != CANARY_VALUE) return 0;
    return 1;
}

static const char *const PATHS[] = { "scalar", "avx2", "avx512", "amx" };
#define N_PATHS 4

/* ------------------------------------------------------------------ matmul */

/* The f32 entry of b's product table. */
static void matmul_f32(const struct ebb_backend *b, struct ebb_pool *pool, float *out, const float *x,
                       const float *w, int n_tok, int n_in, int n_out)
{
    const struct ebb_act a = { .f = x };
    b->matmul[EBB_TYPE_F32](pool, out, &a, w, n_tok, n_in, n_out);
}

struct mm_shape { int n_tok, n_in, n_out; };

/* Small enough to run against the scalar path on every pool configuration. */
static const struct mm_shape MM_SHAPES[] = {
    { 1, 1, 1 }, { 1, 7, 3 }, { 1, 8, 8 }, { 1, 9, 17 }, { 1, 576, 1536 }, { 1, 1536, 576 },
    { 1, 513, 77 }, { 1, 64, 1000 }, { 2, 33, 9 }, { 2, 576, 100 }, { 3, 16, 4 },
    { 3, 100, 31 }, { 4, 1029, 13 }, { 5, 12, 5 }, { 17, 576, 37 }, { 17, 1536, 67 },
    { 47, 40, 12 }, { 49, 70, 70 }, { 50, 8, 3 }, { 100, 5, 5 }, { 100, 300, 2 },
    { 128, 64, 64 }, { 512, 100, 30 }, { 512, 576, 24 }, { 3, 0, 5 },
};
/* Larger: checked with a 2-thread pool only. */
static const struct mm_shape MM_BIG[] = { { 512, 576, 160 }, { 64, 1536, 200 }, { 1, 576, 49152 } };

/* out[t][o] in double, and sum |x w| for the tolerance. */
static void matmul_ref(const float *x, const float *w, int n_tok, int n_in, int n_out,
                       double *ref, double *mag)
{
    for (int t = 0; t < n_tok; t++)
        for (int o = 0; o < n_out; o++) {
            double s = 0, m = 0;
            for (int i = 0; i < n_in; i++) {
                double p = (double)x[(size_t)t * n_in + i] * w[(size_t)o * n_in + i];
                s += p;
                m += fabs(p);
            }
            ref[(size_t)t * n_out + o] = s;
            mag[(size_t)t * n_out + o] = m;
        }
}

/* Counts outputs that differ from want by more than k * gamma_n * mag. */
static int mm_compare(const float *got, const double *want, const double *mag, size_t count, int n_in,
                      double k, const char *what)
{
    int bad = 0;
    double tol_unit = k * (double)(n_in > 0 ? n_in : 1) * U32;
    for (size_t i = 0; i < count; i++) {
        double tol = tol_unit * mag[i] + 1e-30;
        if (!(fabs((double)got[i] - want[i]) <= tol)) {
            if (bad < 3) fprintf(stderr, "  %s: out[%zu] = %.9g, want %.9g (tol %.3g)\n",
                                 what, i, got[i], want[i], tol);
            bad++;
        }
    }
    return bad;
}

static void check_matmul_shape(const struct mm_shape *s, struct ebb_pool **pools, int n_pools,
                               const struct ebb_backend *const *paths)
{
    size_t nx = (size_t)s->n_tok * s->n_in, nw = (size_t)s->n_out * s->n_in;
    size_t no = (size_t)s->n_tok * s->n_out;
    float *x = rand_vec(nx, 1.0f), *w = rand_vec(nw, 0.5f);
    double *ref = malloc((no ? no : 1) * sizeof *ref), *mag = malloc((no ? no : 1) * sizeof *mag);
    double *scal = malloc((no ? no : 1) * sizeof *scal);
    if (!ref || !mag || !scal) { fprintf(stderr, "out of memory\n"); exit(2); }
    matmul_ref(x, w, s->n_tok, s->n_in, s->n_out, ref, mag);

    /* The scalar path, single-threaded, against the double reference. */
    const struct ebb_backend *sc = paths[0];
    float *out = out_buf(no);
    matmul_f32(sc, NULL, out, x, w, s->n_tok, s->n_in, s->n_out);
    char what[160];
    snprintf(what, sizeof what, "scalar %dx%dx%d vs double", s->n_tok, s->n_in, s->n_out);
    CHECK_MSG(mm_compare(out, ref, mag, no, s->n_in, 1.0, what) == 0, "%s", what);
    CHECK_MSG(canaries_ok(out, no), "%s: wrote past the output", what);
    for (size_t i = 0; i < no; i++) scal[i] = out[i];
    free(out);

    for (int p = 0; p < N_PATHS; p++) {
        if (!paths[p]) continue;
        for (int q = 0; q < n_pools; q++) {
            out = out_buf(no);
            matmul_f32(paths[p], pools[q], out, x, w, s->n_tok, s->n_in, s->n_out);
            snprintf(what, sizeof what, "%s %dx%dx%d threads=%d vs scalar", paths[p]->name, s->n_tok,
                     s->n_in, s->n_out, pools[q] ? ebb_pool_threads(pools[q]) : 0);
            CHECK_MSG(mm_compare(out, scal, mag, no, s->n_in, 2.0, what) == 0, "%s", what);
            CHECK_MSG(canaries_ok(out, no), "%s: wrote past the output", what);
            free(out);
        }
    }
    free(x); free(w); free(ref); free(mag); free(scal);
}

static void test_matmul(const struct ebb_backend *const *paths)
{
    struct ebb_pool *pools[5] = { NULL };
    for (int t = 1; t <= 4; t++) {
        pools[t] = ebb_pool_create(t);
        CHECK(pools[t] != NULL && ebb_pool_threads(pools[t]) == t);
    }
    for (size_t i = 0; i < sizeof MM_SHAPES / sizeof *MM_SHAPES; i++)
        check_matmul_shape(&MM_SHAPES[i], pools, 5, paths);
    struct ebb_pool *two[1] = { pools[2] };
    for (size_t i = 0; i < sizeof MM_BIG / sizeof *MM_BIG; i++)
        check_matmul_shape(&MM_BIG[i], two, 1, paths);
    for (int t = 1; t <= 4; t++) ebb_pool_destroy(pools[t]);
}

/* Threaded matmul gives the same numbers on every run (no dependence on
 * which thread took which piece beyond what the tolerance allows). */
static void test_matmul_repeatable(const struct ebb_backend *b)
{
    struct ebb_pool *pool = ebb_pool_create(3);
    int T = 37, K = 300, N = 129;
    float *x = rand_vec((size_t)T * K, 1), *w = rand_vec((size_t)N * K, 1);
    float *a = out_buf((size_t)T * N), *c = out_buf((size_t)T * N);
    matmul_f32(b, pool, a, x, w, T, K, N);
    int differ = 0;
    for (int r = 0; r < 50; r++) {
        matmul_f32(b, pool, c, x, w, T, K, N);
        differ += memcmp(a, c, sizeof(float) * (size_t)T * N) != 0;
    }
    CHECK_MSG(differ == 0, "%s: %d of 50 threaded runs differ from the first", b->name, differ);
    free(x); free(w); free(a); free(c);
    ebb_pool_destroy(pool);
}

/* Batch invariance: a row's result must not depend on how many other rows
 * share the call, where it sits in the batch, or how many threads split the
 * work. Continuous batching relies on it: a request's greedy output may not
 * change because other requests happened to share its steps. Checked
 * bit for bit, on shapes whose input dimension is and is not cut into
 * chunks, against the same row computed alone on one thread. */
static void test_matmul_batch_invariant(const struct ebb_backend *b)
{
    static const int shapes[][2] = { {576, 576}, {576, 192}, {1536, 576}, {300, 129}, {2048, 40} };
    struct ebb_pool *pool2 = ebb_pool_create(2), *pool3 = ebb_pool_create(3);
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        const int K = shapes[s][0], N = shapes[s][1];
        for (int T = 2; T <= 50; T += 7) {
            float *x = rand_vec((size_t)T * K, 3 + (unsigned)T), *w = rand_vec((size_t)N * K, 5);
            float *all = out_buf((size_t)T * N), *one = out_buf((size_t)N);
            matmul_f32(b, T % 2 ? pool2 : pool3, all, x, w, T, K, N);
            int differ = 0;
            for (int t = 0; t < T; t++) {
                matmul_f32(b, NULL, one, x + (size_t)t * K, w, 1, K, N);
                differ += memcmp(one, all + (size_t)t * N, sizeof(float) * (size_t)N) != 0;
            }
            CHECK_MSG(differ == 0, "%s: K=%d N=%d T=%d: %d rows differ from the row computed alone",
                      b->name, K, N, T, differ);
            free(x); free(w); free(all); free(one);
        }
    }
    ebb_pool_destroy(pool2);
    ebb_pool_destroy(pool3);
}

/* -------------------------------------------------------------- vector ops */

static const int LENGTHS[] = { 0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65,
                               100, 127, 576, 1000, 1536, 4097 };
#define N_LENGTHS (int)(sizeof LENGTHS / sizeof *LENGTHS)

static int close_rel(double got, double want, double rel)
{
    return fabs(got - want) <= rel * fabs(want) + 1e-30;
}

static void test_add(const struct ebb_backend *b, const struct ebb_backend *sc)
{
    for (int li = 0; li < N_LENGTHS; li++) {
        int n = LENGTHS[li];
        float *x = rand_vec((size_t)n, 2), *y0 = rand_vec((size_t)n, 1);
        float *ys = out_buf((size_t)n), *yb = out_buf((size_t)n);
        int bad = 0;
        /* add is exact up to one rounding: every path must match bit for bit. */
        memcpy(ys, y0, sizeof(float) * (size_t)n);
        memcpy(yb, y0, sizeof(float) * (size_t)n);
        sc->add_f32(ys, x, n);
        b->add_f32(yb, x, n);
        for (int i = 0; i < n; i++) bad += ys[i] != y0[i] + x[i] || yb[i] != ys[i];
        CHECK_MSG(bad == 0, "%s add n=%d: %d wrong", b->name, n, bad);
        CHECK_MSG(canaries_ok(yb, (size_t)n), "%s add n=%d overran", b->name, n);
        free(x); free(y0); free(ys); free(yb);
    }
}

static void test_rmsnorm(const struct ebb_backend *b, const struct ebb_backend *sc)
{
    for (int li = 0; li < N_LENGTHS; li++) {
        int n = LENGTHS[li];
        if (n == 0) continue;
        float *x = rand_vec((size_t)n, 4), *g = rand_vec((size_t)n, 1.5f);
        float *os = out_buf((size_t)n), *ob = out_buf((size_t)n), *inplace = out_buf((size_t)n);
        float eps = 1e-5f;
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
        double scale = 1.0 / sqrt(ss / n + eps);
        sc->rmsnorm_f32(os, x, g, n, eps);
        b->rmsnorm_f32(ob, x, g, n, eps);
        memcpy(inplace, x, sizeof(float) * (size_t)n);
        b->rmsnorm_f32(inplace, inplace, g, n, eps);
        int bad = 0;
        for (int i = 0; i < n; i++) {
            double want = x[i] * scale * g[i];
            bad += !close_rel(os[i], want, 1e-5) || !close_rel(ob[i], os[i], 1e-5) ||
                   ob[i] != inplace[i];
        }
        CHECK_MSG(bad == 0, "%s rmsnorm n=%d: %d wrong", b->name, n, bad);
        CHECK_MSG(canaries_ok(ob, (size_t)n) && canaries_ok(inplace, (size_t)n), "%s rmsnorm overran", b->name);
        free(x); free(g); free(os); free(ob); free(inplace);
    }
}

static void test_softmax(const struct ebb_backend *b, const struct ebb_backend *sc)
{
    for (int li = 0; li < N_LENGTHS; li++) {
        int n = LENGTHS[li];
        for (int variant = 0; variant < 3; variant++) {
            /* 0: moderate logits; 1: wide range (many underflow to 0); 2: with -inf (masked). */
            float *x = rand_vec((size_t)n, variant == 1 ? 200.0f : 8.0f);
            if (variant == 2) for (int i = 1; i < n; i += 3) x[i] = -INFINITY;
            float *xs = out_buf((size_t)n), *xb = out_buf((size_t)n);
            memcpy(xs, x, sizeof(float) * (size_t)n);
            memcpy(xb, x, sizeof(float) * (size_t)n);
            sc->softmax_f32(xs, n);
            b->softmax_f32(xb, n);
            double max = -INFINITY, sum = 0;
            for (int i = 0; i < n; i++) if (x[i] > max) max = x[i];
            for (int i = 0; i < n; i++) sum += exp((double)x[i] - max);
            int bad = 0;
            double total = 0;
            for (int i = 0; i < n; i++) {
                double want = exp((double)x[i] - max) / sum;
                bad += !close_rel(xs[i], want, 1e-5) || !close_rel(xb[i], xs[i], 1e-5);
                total += xb[i];
            }
            CHECK_MSG(bad == 0, "%s softmax n=%d variant %d: %d wrong", b->name, n, variant, bad);
            if (n > 0) CHECK_MSG(fabs(total - 1) < 1e-5, "%s softmax n=%d sums to %g", b->name, n, total);
            CHECK_MSG(canaries_ok(xb, (size_t)n), "%s softmax overran", b->name);
            free(x); free(xs); free(xb);
        }
    }
}

static void test_swiglu(const struct ebb_backend *b, const struct ebb_backend *sc)
{
    for (int li = 0; li < N_LENGTHS; li++) {
        int n = LENGTHS[li];
        float *gate = rand_vec((size_t)n, 12), *up = rand_vec((size_t)n, 2);
        if (n > 3) { gate[0] = 100.0f; gate[1] = -100.0f; gate[2] = 0.0f; gate[3] = -87.9f; }
        float *gs = out_buf((size_t)n), *gb = out_buf((size_t)n);
        memcpy(gs, gate, sizeof(float) * (size_t)n);
        memcpy(gb, gate, sizeof(float) * (size_t)n);
        sc->swiglu_f32(gs, up, n);
        b->swiglu_f32(gb, up, n);
        int bad = 0;
        for (int i = 0; i < n; i++) {
            double g = gate[i], want = g / (1 + exp(-g)) * up[i];
            bad += !close_rel(gs[i], want, 1e-5) || !close_rel(gb[i], gs[i], 1e-5);
        }
        CHECK_MSG(bad == 0, "%s swiglu n=%d: %d wrong", b->name, n, bad);
        CHECK_MSG(canaries_ok(gb, (size_t)n), "%s swiglu overran", b->name);
        free(gate); free(up); free(gs); free(gb);
    }
}

/* -------------------------------------------------------------------- pool */

struct count_job { atomic_int *hits; int n; atomic_int bad_n; };

static void count_task(void *arg, int i, int n)
{
    struct count_job *j = arg;
    if (n != j->n || i < 0 || i >= n) { atomic_fetch_add(&j->bad_n, 1); return; }
    atomic_fetch_add(&j->hits[i], 1);
    if (n < 1000 && i % 7 == 0) usleep(0);    /* uneven tasks */
}

static void test_pool(void)
{
    struct ebb_pool *auto_pool = ebb_pool_create(0);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    CHECK(auto_pool && ebb_pool_threads(auto_pool) == (cores < 1 ? 1 : cores));
    ebb_pool_destroy(auto_pool);
    CHECK(ebb_pool_threads(NULL) == 1);

    atomic_int hits[300];
    struct ebb_pool *null_pool = NULL;
    for (int t = 0; t <= 4; t++) {
        struct ebb_pool *pool = t ? ebb_pool_create(t) : null_pool;
        int wrong = 0;
        /* Many back-to-back runs with varying n shake out lost wake-ups and
         * tasks claimed twice or never. */
        for (int run = 0; run < 3000; run++) {
            int n = run % 3 == 0 ? run % 300 : 1 + run % 9;
            struct count_job j = { hits, n, 0 };
            for (int i = 0; i < n; i++) atomic_init(&hits[i], 0);
            ebb_pool_run(pool, count_task, &j, n);
            for (int i = 0; i < n; i++) wrong += atomic_load(&hits[i]) != 1;
            wrong += atomic_load(&j.bad_n);
            if (run == 1500) usleep(2000);      /* let workers fall asleep once */
        }
        CHECK_MSG(wrong == 0, "pool threads=%d: %d tasks not run exactly once", t, wrong);
        ebb_pool_destroy(pool);
    }

    /* More tasks than one generation of the claim word holds (2^20 - 1). */
    int big = (1 << 20) + 1000;
    atomic_int *many = malloc(sizeof *many * (size_t)big);
    struct ebb_pool *pool = ebb_pool_create(3);
    if (!many || !pool) { fprintf(stderr, "out of memory\n"); exit(2); }
    for (int i = 0; i < big; i++) atomic_init(&many[i], 0);
    struct count_job j = { many, big, 0 };
    ebb_pool_run(pool, count_task, &j, big);
    int wrong = atomic_load(&j.bad_n);
    for (int i = 0; i < big; i++) wrong += atomic_load(&many[i]) != 1;
    CHECK_MSG(wrong == 0, "pool with %d tasks: %d not run exactly once", big, wrong);
    ebb_pool_destroy(pool);
    free(many);
}

/* ------------------------------------------------------------------ main */

int main(void)
{
    const struct ebb_backend *paths[N_PATHS];
    for (int p = 0; p < N_PATHS; p++) {
        paths[p] = ebb_backend_cpu_named(PATHS[p]);
        if (paths[p]) CHECK(strcmp(paths[p]->name, PATHS[p]) == 0);
        else printf("test_kernels: path %s not supported by this CPU: SKIPPED (not executed)\n", PATHS[p]);
    }
    CHECK(paths[0] != NULL);                    /* scalar always runs */
    CHECK(ebb_backend_cpu_named("nonsense") == NULL);
    CHECK(ebb_backend_cpu_named(NULL) == NULL);
    const struct ebb_backend *best = ebb_backend_cpu();
    CHECK(best != NULL);
    if (best) {
        const struct ebb_backend *want = paths[0];
        for (int p = 1; p < N_PATHS; p++)
            if (paths[p]) want = paths[p];      /* the last one this CPU runs: PATHS is best last */
        if (!getenv("EBB_CPU_PATH")) CHECK_MSG(best == want, "chose %s", best->name);
        printf("test_kernels: default CPU path is %s\n", best->name);
    }
    if (!paths[0]) return check_report("test_kernels");

    test_pool();
    for (int p = 0; p < N_PATHS; p++) {
        if (!paths[p]) continue;
        printf("test_kernels: checking %s\n", paths[p]->name);
        test_add(paths[p], paths[0]);
        test_rmsnorm(paths[p], paths[0]);
        test_softmax(paths[p], paths[0]);
        test_swiglu(paths[p], paths[0]);
        test_matmul_repeatable(paths[p]);
        test_matmul_batch_invariant(paths[p]);
    }
    test_matmul(paths);
    return check_report("test_kernels");
}
