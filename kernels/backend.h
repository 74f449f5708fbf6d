/* The op table: the one interface between the engine and compute.
 *
 * The engine never calls a kernel directly; it calls through a `struct
 * ebb_backend`, so that a CPU path chosen at run time (scalar, AVX2, AVX-512)
 * and the CUDA backend (kernels/cuda/) are interchangeable. All tensors are
 * plain row-major arrays owned by the caller, in the backend's memory: host
 * memory for the CPU paths, device memory for a backend with a `memory`
 * table (allocated, filled and read back through it). A backend allocates
 * nothing that outlives a call.
 *
 * Large ops (matmul) split their work across the backend's worker pool; small
 * per-row ops run on the calling thread and the engine parallelises across
 * rows itself when it matters (attention).
 *
 * Products are one table entry per weight type, as in ggml's type traits:
 * formats.h says which activation form a type's product reads, and the
 * engine calls matmul[type] for every weight, so a new weight type is a new
 * entry, not a new branch in the engine.
 */
#ifndef EBB_KERNELS_BACKEND_H
#define EBB_KERNELS_BACKEND_H
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/formats.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ebb_pool;

/* A fixed pool of worker threads. ebb_pool_run calls fn(arg, i, n) for every
 * i in [0, n) across the workers and the calling thread and returns when all
 * have finished. n_threads <= 0 means one per online core. */
typedef void (*ebb_task_fn)(void *arg, int i, int n);
struct ebb_pool *ebb_pool_create(int n_threads);
void ebb_pool_destroy(struct ebb_pool *pool);
int ebb_pool_threads(const struct ebb_pool *pool);
void ebb_pool_run(struct ebb_pool *pool, ebb_task_fn fn, void *arg, int n);

/* The activations a matmul reads, in the form its weight type names
 * (ebb_type_info(type)->act, kernels/formats.h); the other fields are
 * ignored. n_tok rows of n_in channels, row-major:
 *   EBB_ACT_F32    f: the floats;
 *   EBB_ACT_Q8G64  q: int8 codes, s: one f32 scale per 64 channels
 *                  (quantize_act's output; n_in % 64 == 0);
 *   EBB_ACT_Q8B32  q: int8 codes, s: one f32 scale per 32 channels, sums: the
 *                  code sum of each 32 (quantize_q8b32's output);
 *   EBB_ACT_Q8K    q: int8 codes, s: one f32 scale per 256 channels, sums: the
 *                  code sum of each 16 (quantize_q8k's output). */
struct ebb_act {
    const float *f;
    const int8_t *q;
    const float *s;
    const int16_t *sums;
};

/* out[t*n_out + o] = the product of token t's activations x with weight row
 * o of w; w holds n_out rows of n_in values stored as the entry's type (GGUF's
 * layout: the input dimension is contiguous), out n_tok rows of n_out. Split
 * over pool (pool may be NULL: single-threaded). */
typedef void (*ebb_matmul_fn)(struct ebb_pool *pool, float *out, const struct ebb_act *x, const void *w,
                              int n_tok, int n_in, int n_out);

/* The memory of a backend whose ops run apart from the host (CUDA): every
 * pointer its ops take comes from alloc. Ops are queued in order and may
 * return before they finish; download and sync wait for them. Failures (out
 * of device memory, a kernel that could not start or faulted) return NULL or
 * -1 and leave the reason, in words, for error(). */
struct ebb_backend_memory {
    void *(*alloc)(size_t bytes);
    void (*release)(void *p);
    int (*upload)(void *dst, const void *src, size_t bytes);
    int (*download)(void *dst, const void *src, size_t bytes);
    int (*sync)(void);
    const char *(*error)(void);
    /* bytes from src to dst, both alloc'd, and bytes zeros at dst: queued
     * in order with the ops (a failure shows at the next sync). */
    void (*copy)(void *dst, const void *src, size_t bytes);
    void (*zero)(void *dst, size_t bytes);
};

/* A KV cache as the fused attention op reads it (engine/kv.h's layout, in
 * the backend's memory): body page p at body[p] holds, for each layer, the
 * keys then the values of EBB_KV_PAGE_TOKENS positions, one row_bytes row
 * each (f32 or f16 values, or at 8 and 4 bits the row's codes, code_bytes
 * of them, then its f16 (d, m) pairs); at 8 and 4 bits window page p (f32
 * rows of kv_dim values, the same shape) where a query reads its own page
 * and the one before, and the f32 sink rows, ((layer * 2 + kind) *
 * EBB_KV_SINK_TOKENS + position) * kv_dim floats in. */
struct ebb_kv_pages {
    int bits, group, rotate;          /* rotate: rows stored in the H64 basis (8 and 4 bits) */
    int kv_dim, head_dim;
    int n_pages;                      /* entries of body and window */
    size_t row_bytes, code_bytes;
    const uint8_t *const *body;
    const float *const *window;
    const float *sink;
};

struct ebb_backend {
    const char *name;        /* "scalar", "avx2", "avx512", "cuda" */
    /* NULL: the ops take host pointers. Otherwise where their tensors live. */
    const struct ebb_backend_memory *memory;

    /* One product per weight type, NULL where this backend has none (a type
     * whose act is EBB_ACT_NONE never has one). Each entry's float contract:
     *
     * [EBB_TYPE_F32] reads x->f: out = sum_i x[t][i] * w[o][i], summed in
     *   lanes and tiles of the path's choosing (paths agree within float
     *   summation error, not bit for bit).
     *
     * [EBB_TYPE_W4G64] reads x->q, x->s; rows of n_in/64 W4G64 blocks:
     *   out = sum over groups g of
     *       (sum_i wq[o][64g+i] * q[t][64g+i]) * d[o][g] * s[t][g].
     *   The integer sums are exact; the float accumulation is, for each block
     *   in order (group 0 first),
     *       acc = fmaf((float)isum, d * s, acc)
     *   from acc = 0, and every backend (CUDA included) must repeat exactly
     *   that expression, so all paths give the scalar path's bits.
     *
     * [EBB_TYPE_Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] read EBB_ACT_Q8B32 and [EBB_TYPE_Q2_K
     *   .. Q6_K] EBB_ACT_Q8K: GGUF's own blocks as the file stores them, with
     *   the float steps of kernels/cpu/native.h (exact on every path).
     *
     * In every entry an output depends only on its own token and row (never
     * on n_tok, the split or the tile it lands in): batch invariance. */
    ebb_matmul_fn matmul[EBB_TYPE_COUNT_];

    /* out[i] = x[i] / sqrt(mean(x^2) + eps) * g[i]   (out may alias x) */
    void (*rmsnorm_f32)(float *out, const float *x, const float *g, int n, float eps);
    /* In place: x[i] = exp(x[i] - max) / sum */
    void (*softmax_f32)(float *x, int n);
    /* gate[i] = silu(gate[i]) * up[i]   (SwiGLU) */
    void (*swiglu_f32)(float *gate, const float *up, int n);
    /* y[i] += x[i] */
    void (*add_f32)(float *y, const float *x, int n);

    /* ---- quantized path (formats in kernels/formats.h) ---- */

    /* Per-token activation quantization to EBB_ACT_Q8G64: n_tok rows of n
     * floats (n a multiple of EBB_ACT_GROUP) to int8 codes q[n_tok][n] and
     * scales s[n_tok][n/64]; groups [0, n_hi) are 8-bit, the rest 4-bit.
     * Rounds to nearest, ties away from zero; an all-zero group gets scale 0.
     * Exact: every path gives the same codes and scales. */
    void (*quantize_act)(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s);
    /* One token's n floats to EBB_ACT_Q8B32 (n % 32 == 0) or EBB_ACT_Q8K
     * (n % 256 == 0): codes q[n], scales d[n/32 or n/256], sums[n/32 or
     * n/16]; scale amax / qmax, codes roundf(x * qmax / amax), qmax 127 (for
     * Q8B32 only blocks [0, n_hi); the rest 7, 4-bit codes). Exact on every
     * path. */
    void (*quantize_q8b32)(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums);
    void (*quantize_q8k)(const float *x, int n, int8_t *q, float *d, int16_t *sums);
    /* quantize_q8b32 with the 8-bit blocks chosen by the token itself (a
     * source-exact file's ebb.act8_choice = "token"): its n_hi blocks of 32
     * with the largest absolute value at 8 bits, ties to the lower index
     * -- block b is 8-bit when fewer than n_hi blocks are louder than b or
     * as loud and before it -- and the rest at 4. Exact on every path. */
    void (*quantize_q8b32_loudest)(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums);

    /* In place, every consecutive block of 64 values of n (n % 64 == 0) times
     * the 64x64 Walsh-Hadamard matrix scaled by 1/8 (orthonormal, its own
     * inverse): the online rotation QuaRot puts before down_proj and on
     * each attention head's keys and queries. */
    void (*hadamard64)(float *x, int n);

    /* ---- the steps between the products (engine/forward.c) ----
     * Exact: every path gives the same bits. */

    /* Rows of a table by id, dequantized: out[r * n + i] = value i of row
     * ids[r] of `table`, rows of n values stored as `type` (any type with
     * a to_f32 in kernels/formats.h; the same floats). The embedding. */
    void (*get_rows)(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n);
    /* out[t * n + i] = x[t * n + perm[i]], t < n_tok: a packed model's
     * channel permutation (out and x do not overlap). */
    void (*permute_f32)(float *out, const float *x, const int32_t *perm, int n_tok, int n);
    /* RoPE in place on n_tok rows (row t at x + t * stride) of n_heads
     * heads of head_dim values: in each head the pairs (2i, 2i + 1) (neox
     * 0) or (i, i + rope_dim / 2) (neox 1), i < rope_dim / 2, turned by
     * token t's c = cos[t * rope_dim / 2 + i] and s = sin[...]:
     *     a' = a * c - b * s,   b' = a * s + b * c
     * each product rounded on its own (no fused steps). The angles come
     * from the caller, so the op never evaluates a sine. */
    void (*rope_f32)(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                     const float *cos, const float *sin);
    /* out[i] = x[i] * s, one rounded product (out may alias x): attention's
     * query scaling. */
    void (*scale_f32)(float *out, const float *x, float s, int n);
    /* One position's keys or values (n floats, one layer) into a KV cache
     * body row (engine/kv.h) at `bits`: 32 the floats; 16 IEEE halves of
     * the values clamped to +-65504; 8 and 4 a KV8/KV4 row of `group`
     * values per group (kernels/formats.h's ebb_kvq_quantize_row), codes
     * at row and the (d, m) pairs right after them, n * bits / 8 bytes on.
     * rotate (group 64): each block of 64 values is multiplied by H64 (as
     * hadamard64) before it is quantized. Exact on every path. */
    void (*kv_store_row)(uint8_t *row, const float *x, int n, int bits, int group, int rotate);

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
    /* Optional (NULL: kv.c composes the ops above): kv.c's attention of a
     * block of queries over an uncompressed cache in one call, with the
     * same arithmetic query by query. Query j < n_tok * n_head (token j /
     * n_head at position pos = pos0 + j / n_head, head j % n_head, at q +
     * (j / n_head) * stride + (j % n_head) * head_dim) is scaled, qs[i] =
     * q[i] * scale, and rotated, qr = H64(qs) when the cache rotates; each
     * position p <= pos is read as kv.h says: from the window (8 and 4
     * bits) or in place (32 bits) when p's page is pos's or the one
     * before, else converted from the body (kv_rows_f16 / kv_rows_q; the
     * sinks, p < EBB_KV_SINK_TOKENS, from their f32 rows times H64 when
     * rotating), and scored s_p = dot8(body ? qr : qs (qs unrotated), k_p);
     * softmax over s_0 .. s_pos (as softmax_f32); then two chains in
     * position order, acc = fmaf(s_p, v_p[i], acc) for rows in place and,
     * rotating, accr for body rows; out = acc, or acc + H64(accr) when any
     * body row was read rotated. scratch holds n_tok * n_head * (pos0 +
     * n_tok) floats. */
    void (*attend)(const struct ebb_kv_pages *kv, int layer, int kvh, const float *q, float *out, size_t stride,
                   int n_tok, int n_head, int pos0, float scale, float *scratch);

    /* Stored KV rows to f32, out[r * n + i]: n_rows rows of n values, each
     * row `stride` bytes after the previous. f16 rows are IEEE halves.
     * kv_rows_q reads KV8, KV4 or KV2 rows (bits 8, 4 or 2) with groups of
     * `group` values (kernels/formats.h describes the format): codes and dm
     * point at row 0's codes and (d, m) pairs and advance together by stride;
     *     out[r * n + g * group + i] = fmaf(f16(dm_r[2g]), code_r(g, i), f16(dm_r[2g + 1])).
     * kv_rows_qc reads per-channel codes (formats.h): row r's codes at
     * codes + r * stride, one (d, m) pair per channel shared by every row;
     *     out[r * n + i] = fmaf(f16(dm[2i]), code(r, i), f16(dm[2i + 1])).
     * Exact: every path gives the same floats. */
    void (*kv_rows_f16)(float *out, const uint16_t *rows, size_t stride, int n_rows, int n);
    void (*kv_rows_q)(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                      int bits, int group);
    void (*kv_rows_qc)(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                       int bits, int group);

    /* ---- BitStack blocks (engine/bitstack.h) ----
     * The sign products of rows o < n_rows of one block against n_vec
     * activation vectors: row o's n signs at signs + o * n/8 (bit i of byte
     * i/8 set: negative), vector v's n int8 codes in [-127, 127] at
     * t + v * n:
     *     isum[o * n_vec + v] = sum_i (sign_oi ? -t_v[i] : t_v[i])
     * n % 32 == 0. Integers: every path gives the same sums; the float
     * steps that scale them are engine/bitstack.c's, one for all paths. */
    void (*bitstack_isums)(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n);
    /* The activation vector of one rank of a block: y[i] = v[i] * x[i]
     * (one rounded product) as int8 codes with one scale, n % 32 == 0:
     *     *scale = absmax(y) / 127,  q[i] = round(y[i] * inv)
     * with inv and round as kernels/cpu/ops.h's activation steps
     * (act_inverse; halves away from zero). Exact on every path. */
    void (*bitstack_codes)(const float *x, const float *v, int n, int8_t *q, float *scale);
    /* The sums scaled into the outputs: isum as bitstack_isums leaves it
     * for n_tok tokens of rank vectors each (vector v = token * rank + j),
     * u [n_rows][rank] the block's factors in f32, ts [n_tok][rank] the
     * codes' scales; for each row o and token t, from acc = 0,
     *     acc = fmaf((float)isum[o][t * rank + j], u[o][j] * ts[t][j], acc)
     * for j = 0, 1, ... < rank, then out[t * out_stride + o] += acc. Exact:
     * every path gives the same bits. */
    void (*bitstack_scale_add)(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok, int rank,
                               const float *u, const float *ts);
};

/* The same calls for host memory (a backend without `memory`) and for a
 * backend's own: what the engine uses wherever a buffer may live on either
 * side. On the host, upload and download are copies and the queue is the
 * call itself. */
static inline void *ebb_alloc(const struct ebb_backend *be, size_t bytes)
{
    return be->memory ? be->memory->alloc(bytes) : malloc(bytes ? bytes : 1);
}
static inline void ebb_release(const struct ebb_backend *be, void *p)
{
    if (be->memory) {
        if (p) be->memory->release(p);
    } else {
        free(p);
    }
}
static inline int ebb_upload(const struct ebb_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->memory) return be->memory->upload(dst, src, bytes);
    memcpy(dst, src, bytes);
    return 0;
}
static inline int ebb_download(const struct ebb_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->memory) return be->memory->download(dst, src, bytes);
    memcpy(dst, src, bytes);
    return 0;
}
static inline void ebb_copy(const struct ebb_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->memory) be->memory->copy(dst, src, bytes);
    else memcpy(dst, src, bytes);
}
static inline void ebb_zero(const struct ebb_backend *be, void *dst, size_t bytes)
{
    if (be->memory) be->memory->zero(dst, bytes);
    else memset(dst, 0, bytes);
}

/* The CUDA backend on device `index` (0 for the first), or NULL with the
 * reason in why: this build has no CUDA (configured without the toolkit, or
 * -DEBB_CUDA=OFF), no driver, no such device. The first call picks the
 * device for the process; a later call for another index is refused. */
const struct ebb_backend *ebb_backend_cuda(int index, char *why, size_t why_len);

/* The CUDA devices this process sees, for `ebb devices` and the logs: up
 * to max of them into out, their number returned; -1 with the reason in why
 * when none can be counted (no CUDA in this build, no driver). */
struct ebb_device_info {
    char name[256];
    size_t total_bytes, free_bytes;
    int cc_major, cc_minor;     /* compute capability */
    int multiprocessors;
};
int ebb_cuda_devices(struct ebb_device_info *out, int max, char *why, size_t why_len);

/* The backend a device name chooses: "cpu" (ebb_backend_cpu), "cuda" or
 * "cuda:N" (ebb_backend_cuda(N)); NULL with the reason in why (a name of
 * neither form, or the device's refusal). ebb_device_name_problem checks
 * the form alone (configuration): NULL, or what a name must look like. */
const struct ebb_backend *ebb_backend_for_device(const char *device, char *why, size_t why_len);
const char *ebb_device_name_problem(const char *device);
/* 1 when a device name means the host's own CPU (NULL, "" and "cpu"). */
int ebb_device_is_host(const char *device);
/* What a GPU named like that has (its free memory now): 0, or -1 with the
 * reason (not a GPU's name, no such device, no CUDA). */
int ebb_device_memory(const char *device, struct ebb_device_info *info, char *why, size_t why_len);

/* The fastest CPU path this processor supports (cpuid at first call). */
const struct ebb_backend *ebb_backend_cpu(void);
/* A named CPU path ("scalar", "avx2", "avx512"), or NULL if this processor
 * cannot run it. Tests use this to compare every path with the scalar one. */
const struct ebb_backend *ebb_backend_cpu_named(const char *name);
#ifdef __cplusplus
}
#endif
#endif
