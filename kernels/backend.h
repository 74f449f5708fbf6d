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

    /* ---- quantized path (formats in kernels/formats.h) ---- */

    /* Per-token activation quantization: n_tok rows of n floats (n a
     * multiple of EBB_ACT_GROUP) to int8 codes q[n_tok][n] and scales
     * s[n_tok][n/64]; groups [0, n_hi) are 8-bit, the rest 4-bit. Rounds to
     * nearest, ties away from zero; an all-zero group gets scale 0. */
    void (*quantize_act)(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s);

    /* out[t*n_out + o] = sum over groups g of
     *     (sum_i wq[o][64g+i] * q[t][64g+i]) * d[o][g] * s[t][g]
     * with w rows of n_in/64 W4G64 blocks. The integer sums are exact; the
     * float accumulation is, for each block in order (group 0 first),
     *     acc = fmaf((float)isum, d * s, acc)
     * and every backend (CUDA included) must repeat exactly that expression,
     * so all paths give the scalar path's bits. Threaded over pool. */
    void (*matmul_w4a8)(struct ebb_pool *pool, float *out, const int8_t *q, const float *s,
                        const void *w, int n_tok, int n_in, int n_out);

    /* The same for Q8_0 weights (ggml's 8-bit format, blocks of 32 with an
     * f16 scale): the output head and other 8-bit matrices. */
    void (*matmul_q8a8)(struct ebb_pool *pool, float *out, const int8_t *q, const float *s,
                        const void *w, int n_tok, int n_in, int n_out);

    /* In place, every consecutive block of 64 values of n (n % 64 == 0) times
     * the 64x64 Walsh-Hadamard matrix scaled by 1/8 (orthonormal, its own
     * inverse): the online rotation QuaRot puts before down_proj and on
     * each attention head's keys and queries. */
    void (*hadamard64)(float *x, int n);

    /* ---- attention over the KV cache (engine/kv.c) ----
     * kv.c runs a block of queries (the query heads of one KV head, at one
     * or more positions of one sequence) over the cache a page at a time:
     * scores, then a softmax per query (softmax_f32), then the weighted sum
     * of values. Every query's arithmetic is spelled out below and depends
     * on nothing else in the block, so attention gives the same bits however
     * queries are batched; the ops below give the scalar path's bits on
     * every backend.
     *
     * The dot product of two rows of n floats, dot8(a, b): eight lanes, lane
     * k = fmaf chain over i = k, k+8, k+16, ... < n in order, from 0; then
     * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). */

    /* s[j * s_stride + r] = dot8(q_j, k_r) for queries j < n_q (q_j at q +
     * j * q_stride) and rows r < n_rows (k_r at k + r * k_stride). */
    void (*attn_scores)(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                        size_t k_stride, int n_rows, int n);
    /* y[i] = fmaf(p[r], v_r[i], y[i]) for r = 0, 1, ... < n_rows in order
     * (v_r at v + r * v_stride), i < n. */
    void (*attn_values)(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n);

    /* Stored KV rows to f32, out[r * n + i]: n_rows rows of n values, each
     * row `stride` bytes after the previous. f16 rows are IEEE halves. q8
     * and q4 rows are codes plus, per group of `group` values (8, 16, 32 or
     * 64, dividing n), an f16 pair dm = (d, m): value = fmaf(d, code, m).
     * 8-bit codes take a byte each; 4-bit codes take group/2 bytes per
     * group, value i (< group/2) in the low nibble of byte i and value
     * group/2 + i in its high nibble. codes and dm point at row 0 and
     * advance together by stride. Exact: every path gives the same floats. */
    void (*kv_rows_f16)(float *out, const uint16_t *rows, size_t stride, int n_rows, int n);
    void (*kv_rows_q8)(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                       int group);
    void (*kv_rows_q4)(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                       int group);
};

/* The fastest CPU path this processor supports (cpuid at first call). */
const struct ebb_backend *ebb_backend_cpu(void);
/* A named CPU path ("scalar", "avx2", "avx512"), or NULL if this processor
 * cannot run it. Tests use this to compare every path with the scalar one. */
const struct ebb_backend *ebb_backend_cpu_named(const char *name);
#endif
