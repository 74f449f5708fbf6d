/* The CUDA products' speed, beside cuBLAS on the same shapes (a benchmark,
 * not a test: tools/gpu-check.sh runs it on a GPU machine, docs/benchmarks.md
 * records what it printed).
 *
 *   bench_cuda_ops [--quick]
 *
 * For each shape -- the default model's (576 -> 576, 576 -> 1536, 1536 ->
 * 576, the 576 -> 49152 head) and Llama-3-8B's (4096 -> 4096, 4096 -> 14336,
 * 14336 -> 4096) -- and each token count M (1, 16, 64, 512, 4096), the time
 * of one matmul through ebb's CUDA table for each weight type, and of
 * cuBLAS's f16 (f32 accumulate) and int8 (int32 accumulate) GEMMs over the
 * same dimensions: the dense baselines. Printed as CSV (shape, kernel, type,
 * M, N, K, microseconds, weight GB/s, TOPS) on stdout: weight GB/s is the weight
 * bytes over the time (what bounds decode), TOPS counts 2*M*N*K.
 *
 * Timing: one warm-up call, then calls until 0.2 s have passed (at least 3),
 * synchronised before the clock is read; the launch cost is included, as
 * the engine pays it. Inputs are random (never zeros), rotated over 4 copies
 * of the activations for M = 1 so the cache does not serve them. --quick:
 * M = 1 and 64 only. With EBB_CUDA_KERNELS=reference the ebb rows are the
 * reference kernels' (labelled ebb-reference), the baseline of the tuned ones.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/backend.h"
#include "kernels/formats.h"
#include "testdata.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "bench_cuda_ops: %s: %s\n", what, why);
    exit(1);
}

static void *dev_alloc(const struct ebb_backend *b, size_t bytes)
{
    void *p = b->memory->alloc(bytes);
    if (!p) die("alloc", b->memory->error());
    return p;
}

/* Random bytes, or (floats) random numbers in [-1, 1]: never NaN or zeros. */
static void *dev_random(const struct ebb_backend *b, size_t bytes, int floats)
{
    uint8_t *h = malloc(bytes);
    if (!h) die("malloc", "out of host memory");
    if (floats)
        for (size_t i = 0; i < bytes / 4; i++) ((float *)(void *)h)[i] = (float)((int)(next_u32() % 2001) - 1000) * 1e-3f;
    else
        for (size_t i = 0; i < bytes; i++) h[i] = (uint8_t)next_u32();
    void *d = dev_alloc(b, bytes);
    if (b->memory->upload(d, h, bytes)) die("upload", b->memory->error());
    free(h);
    return d;
}

struct shape {
    const char *name;
    int k, n;        /* inputs, outputs */
};

typedef void (*run_fn)(void *ctx);

/* Microseconds per call. */
static double time_calls(const struct ebb_backend *b, run_fn run, void *ctx)
{
    run(ctx);
    if (b->memory->sync()) die("warm-up", b->memory->error());
    int calls = 0;
    const double t0 = now_s();
    double t;
    do {
        run(ctx);
        calls++;
        if (calls % 4 == 0 || calls < 4)
            if (b->memory->sync()) die("timed calls", b->memory->error());
        t = now_s() - t0;
    } while (calls < 3 || t < 0.2);
    if (b->memory->sync()) die("timed calls", b->memory->error());
    return (now_s() - t0) * 1e6 / calls;
}

struct ebb_run {
    const struct ebb_backend *b;
    int type, m, k, n, rot;
    float *out;
    struct ebb_act act[4];
    void *w;
};

static void run_ebb(void *vp)
{
    struct ebb_run *r = vp;
    r->b->matmul[r->type](NULL, r->out, &r->act[r->m == 1 ? r->rot++ % 4 : 0], r->w, r->m, r->k, r->n);
}

struct blas_run {
    cublasHandle_t h;
    int m, k, n, int8;
    void *w, *x, *out;
};

static void run_blas(void *vp)
{
    struct blas_run *r = vp;
    cublasStatus_t s;
    if (r->int8) {
        const int32_t one = 1, zero = 0;
        s = cublasGemmEx(r->h, CUBLAS_OP_T, CUBLAS_OP_N, r->n, r->m, r->k, &one, r->w, CUDA_R_8I, r->k, r->x,
                         CUDA_R_8I, r->k, &zero, r->out, CUDA_R_32I, r->n, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT);
    } else {
        const float one = 1, zero = 0;
        s = cublasGemmEx(r->h, CUBLAS_OP_T, CUBLAS_OP_N, r->n, r->m, r->k, &one, r->w, CUDA_R_16F, r->k, r->x,
                         CUDA_R_16F, r->k, &zero, r->out, CUDA_R_32F, r->n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (s != CUBLAS_STATUS_SUCCESS) die("cublasGemmEx", cublasGetStatusString(s));
}

static const char *ebb_label = "ebb";

static void report(const struct shape *s, const char *kernel, const char *type, int m, double us, double weight_bytes)
{
    const int n = s->n, k = s->k;
    printf("%s,%s,%s,%d,%d,%d,%.2f,%.1f,%.3f\n", s->name, kernel, type, m, n, k, us, weight_bytes / (us * 1e3),
           2.0 * m * n * (double)k / (us * 1e6));
    fflush(stdout);
}

static void bench_shape(const struct ebb_backend *b, cublasHandle_t h, const struct shape *s, const int *ms, int n_ms)
{
    static const uint32_t types[] = {EBB_TYPE_W4G64, EBB_TYPE_Q4_0, EBB_TYPE_Q4_1, EBB_TYPE_Q8_0,
                                     EBB_TYPE_Q4_K, EBB_TYPE_Q6_K, EBB_TYPE_F32};
    for (int mi = 0; mi < n_ms; mi++) {
        const int m = ms[mi];
        float *out = dev_alloc(b, (size_t)m * s->n * sizeof(float));
        for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
            const uint32_t type = types[ti];
            const struct ebb_type_info *info = ebb_type_info(type);
            if (s->k % (int)info->block_elems) continue;
            const size_t wbytes = ebb_row_bytes(type, (uint64_t)s->k) * (size_t)s->n;
            uint8_t *hw = malloc(wbytes);
            if (!hw) die("malloc", "out of host memory");
            if (type == EBB_TYPE_F32)
                for (size_t i = 0; i < wbytes / 4; i++) ((float *)(void *)hw)[i] = gauss();
            else
                for (int o = 0; o < s->n; o++) random_row(type, hw + (size_t)o * (wbytes / s->n), s->k);
            struct ebb_run r = {b, (int)type, m, s->k, s->n, 0, out, {{0}}, dev_alloc(b, wbytes)};
            if (b->memory->upload(r.w, hw, wbytes)) die("upload", b->memory->error());
            free(hw);
            for (int c = 0; c < (m == 1 ? 4 : 1); c++) {
                if (type == EBB_TYPE_F32) {
                    r.act[c].f = dev_random(b, (size_t)m * s->k * sizeof(float), 1);
                    continue;
                }
                /* codes in [-127, 127] and finite scales: random bytes would do for
                 * the codes, but scales must be numbers */
                int8_t *q = malloc((size_t)m * s->k);
                float *sc = malloc((size_t)m * (s->k / 32) * sizeof(float));
                int16_t *sums = malloc((size_t)m * (s->k / 16) * sizeof(int16_t));
                if (!q || !sc || !sums) die("malloc", "out of host memory");
                for (size_t i = 0; i < (size_t)m * s->k; i++) q[i] = (int8_t)((int)(next_u32() % 255) - 127);
                for (size_t i = 0; i < (size_t)m * (s->k / 32); i++) sc[i] = 0.01f * (1 + gauss() * 0.1f);
                for (size_t i = 0; i < (size_t)m * (s->k / 16); i++) sums[i] = (int16_t)(next_u32() % 2000);
                r.act[c].q = dev_alloc(b, (size_t)m * s->k);
                r.act[c].s = dev_alloc(b, (size_t)m * (s->k / 32) * sizeof(float));
                r.act[c].sums = dev_alloc(b, (size_t)m * (s->k / 16) * sizeof(int16_t));
                if (b->memory->upload((void *)r.act[c].q, q, (size_t)m * s->k) ||
                    b->memory->upload((void *)r.act[c].s, sc, (size_t)m * (s->k / 32) * sizeof(float)) ||
                    b->memory->upload((void *)r.act[c].sums, sums, (size_t)m * (s->k / 16) * sizeof(int16_t)))
                    die("upload", b->memory->error());
                free(q), free(sc), free(sums);
            }
            report(s, ebb_label, info->name, m, time_calls(b, run_ebb, &r), (double)wbytes);
            b->memory->release(r.w);
            for (int c = 0; c < 4; c++) {
                b->memory->release((void *)r.act[c].f);
                b->memory->release((void *)r.act[c].q);
                b->memory->release((void *)r.act[c].s);
                b->memory->release((void *)r.act[c].sums);
            }
        }
        for (int int8 = 0; int8 < 2; int8++) {
            const size_t el = int8 ? 1 : 2;
            struct blas_run r = {h, m, s->k, s->n, int8, dev_random(b, (size_t)s->n * s->k * el, 0),
                                 dev_random(b, (size_t)m * s->k * el, 0), out};
            if (!int8) {   /* f16 from random bytes may be NaN or Inf: make them small numbers */
                const size_t rows = (size_t)(s->n > m ? s->n : m);
                uint16_t *hw = malloc(rows * s->k * 2);
                if (!hw) die("malloc", "out of host memory");
                for (size_t i = 0; i < rows * s->k; i++) hw[i] = ebb_f32_to_f16(gauss() * 0.05f);
                if (b->memory->upload(r.w, hw, (size_t)s->n * s->k * 2) ||
                    b->memory->upload(r.x, hw, (size_t)m * s->k * 2))
                    die("upload", b->memory->error());
                free(hw);
            }
            if (int8 && (m % 4 || s->n % 4 || s->k % 4)) continue;
            report(s, "cublas", int8 ? "int8" : "f16", m, time_calls(b, run_blas, &r),
                   (double)s->n * s->k * el);
            b->memory->release(r.w), b->memory->release(r.x);
        }
        b->memory->release(out);
    }
}

int main(int argc, char **argv)
{
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    const char *kernels = getenv("EBB_CUDA_KERNELS");
    if (kernels && !strcmp(kernels, "reference")) ebb_label = "ebb-reference";
    char why[256];
    const struct ebb_backend *b = ebb_backend_cuda(0, why, sizeof why);
    if (!b) die("no CUDA backend", why);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) die("cublasCreate", "failed");
    static const struct shape shapes[] = {
        {"smol attn", 576, 576}, {"smol up", 576, 1536}, {"smol down", 1536, 576}, {"smol head", 576, 49152},
        {"llama3-8b attn", 4096, 4096}, {"llama3-8b up", 4096, 14336}, {"llama3-8b down", 14336, 4096},
    };
    static const int all_ms[] = {1, 16, 64, 512, 4096}, quick_ms[] = {1, 64};
    printf("shape,kernel,type,M,N,K,us,weight_GBps,TOPS\n");
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++)
        bench_shape(b, h, &shapes[i], quick ? quick_ms : all_ms, quick ? 2 : 5);
    cublasDestroy(h);
    return 0;
}
