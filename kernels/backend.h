/* The op table: the one interface between the engine and compute.
 *
 * The engine never calls a kernel directly; it calls through a `struct
 * ebb_backend`, so that a CPU path chosen at run time (scalar, AVX2, AVX-512)
 * and, later, a CUDA backend are interchangeable. All tensors are plain
 * row-major f32 arrays owned by the caller; a backend allocates nothing that
 * outlives a call.
 *
 * Large ops (matmul) split their work across the backend's worker pool; small
 * per-row ops run on the calling thread and the engine parallelises across
 * rows itself when it matters (attention).
 */
#ifndef EBB_KERNELS_BACKEND_H
#define EBB_KERNELS_BACKEND_H
#include <stddef.h>
#include <stdint.h>

struct ebb_pool;

/* A fixed pool of worker threads. ebb_pool_run calls fn(arg, i, n) for every
 * i in [0, n) across the workers and the calling thread and returns when all
 * have finished. n_threads <= 0 means one per online core. */
typedef void (*ebb_task_fn)(void *arg, int i, int n);
struct ebb_pool *ebb_pool_create(int n_threads);
void ebb_pool_destroy(struct ebb_pool *pool);
int ebb_pool_threads(const struct ebb_pool *pool);
void ebb_pool_run(struct ebb_pool *pool, ebb_task_fn fn, void *arg, int n);

struct ebb_backend {
    const char *name;        /* "scalar", "avx2", "avx512" */

    /* out[t*n_out + o] = sum_i x[t*n_in + i] * w[o*n_in + i]
     * x: n_tok rows of n_in; w: n_out rows of n_in (GGUF's layout: the input
     * dimension is contiguous); out: n_tok rows of n_out. Threaded over pool
     * (pool may be NULL: single-threaded). */
    void (*matmul_f32)(struct ebb_pool *pool, float *out, const float *x, const float *w,
                       int n_tok, int n_in, int n_out);

    /* sum_i a[i] * b[i] */
    float (*dot_f32)(const float *a, const float *b, int n);
    /* y[i] += alpha * x[i] */
    void (*axpy_f32)(float *y, float alpha, const float *x, int n);
    /* out[i] = x[i] / sqrt(mean(x^2) + eps) * g[i]   (out may alias x) */
    void (*rmsnorm_f32)(float *out, const float *x, const float *g, int n, float eps);
    /* In place: x[i] = exp(x[i] - max) / sum */
    void (*softmax_f32)(float *x, int n);
    /* gate[i] = silu(gate[i]) * up[i]   (SwiGLU) */
    void (*swiglu_f32)(float *gate, const float *up, int n);
    /* y[i] += x[i] */
    void (*add_f32)(float *y, const float *x, int n);
};

/* The fastest CPU path this processor supports (cpuid at first call). */
const struct ebb_backend *ebb_backend_cpu(void);
/* A named CPU path ("scalar", "avx2", "avx512"), or NULL if this processor
 * cannot run it. Tests use this to compare every path with the scalar one. */
const struct ebb_backend *ebb_backend_cpu_named(const char *name);
#endif
