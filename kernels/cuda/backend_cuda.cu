/* The CUDA backend: kernels/backend.h's op table on an NVIDIA GPU.
 *
 * Every op takes device pointers (allocated through the table's `memory`),
 * is queued on one stream in call order, and returns before it finishes;
 * download() and sync() wait. The arithmetic of each element, block and row
 * is kernels/cuda/hostdev.h's, the functions the CPU suite holds against the
 * scalar path (tests/unit/test_cuda_math.c), so what a kernel here adds is
 * only its thread layout:
 *
 *   decode products      W4G64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 at up to 8
 *                        tokens: one warp per output row for all of them, a
 *                        block's code bytes read side by side by its lanes
 *                        and its integer sum reduced across them.
 *   prefill products     W4G64 and the legacy types at more than 8 tokens: int8
 *                        tensor cores (mma.m16n8k32), exact integer sums per
 *                        block folded in block order, as below.
 *   quantized products   one warp per (token, output row): lanes compute the
 *                        exact integer sums of 32 blocks at once, then every
 *                        lane folds them in block order (the same steps on
 *                        the same values, so all lanes agree; lane 0 writes).
 *                        Bit-identical to the CPU paths, and batch invariant:
 *                        an output depends on its own token and row only.
 *   f32 product          one warp per output, lane partial sums reduced by
 *                        shuffles (the contract allows the path's own order).
 *   quantizers           one thread per activation group or block.
 *   rmsnorm, softmax     one thread block over the vector (its own summation
 *                        order and expf: within float error of the CPU).
 *   attention, KV rows   one thread per score, channel or element; from
 *                        position 1024 on a query is split over blocks of
 *                        256 positions and merged (flash-decoding).
 *   rows, permute, RoPE  one thread per value (a RoPE pair).
 *   BitStack             one thread per (row, vector) sign sum and per
 *                        (row, token) scaled output; one block per code vector.
 *
 * The warp-per-output product is the reference (EBB_CUDA_KERNELS=reference
 * sends every product there); the decode and tensor-core kernels give its
 * bits. The K-quants (Q2_K .. Q6_K) and W2G64 prefill on the reference
 * kernel. cuBLASLt over f16 dequantized tiles, which the issue names for the
 * GGUF types' prefill, would give up those bits and batch invariance (a
 * token's output would depend on the batch it came in): the integer tiles
 * keep both.
 *
 * Errors: every failure leaves its reason, in words, for memory->error().
 * Running out of device memory is an answer (alloc returns NULL) and the
 * device stays usable; a launch that fails, or a kernel that faults, breaks
 * the backend (CUDA keeps a fault in the context for good), and every later
 * sync() and download() returns -1, so the caller treats the device as lost
 * instead of reading garbage.
 */
#include <cuda_runtime.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/hostdev.h"

/* ------------------------------------------------------------- the device */

static cudaStream_t stream;
static int chosen_device = -1;
/* EBB_CUDA_KERNELS=reference: every product through the one-warp-per-output
 * reference kernel and every query's attention in one block, so
 * tools/gpu-check.sh can check and time the tuned kernels against them in
 * one run. */
static int reference_kernels;
static char last_failure[256];     /* the latest failure's reason */
static int broken;                 /* a launch or a kernel failed: the device is lost */

/* The runtime's current device is per thread: a worker thread that calls
 * an op first makes the chosen device its own. */
static __thread int bound_device = -1;

static void bind_thread(void)
{
    if (bound_device != chosen_device) {
        cudaSetDevice(chosen_device);
        bound_device = chosen_device;
    }
}

/* A CUDA call's status: 0, or -1 with its reason kept. The runtime's
 * last-error state is cleared, so a failed call (a refused allocation or
 * copy) is not reported again by the next launch's check; a fault that
 * broke the context stays, as CUDA keeps it. */
static int ok(cudaError_t e, const char *what)
{
    if (e == cudaSuccess) return 0;
    snprintf(last_failure, sizeof last_failure, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    cudaGetLastError();
    return -1;
}

/* After a launch: a bad configuration shows at once, a fault at the next sync. */
static void launched(const char *kernel)
{
    if (ok(cudaGetLastError(), kernel)) broken = 1;
}

static unsigned blocks_for(size_t threads, unsigned per_block)
{
    return (unsigned)((threads + per_block - 1) / per_block);
}

/* ------------------------------------------------------------------ memory */

static void *mem_alloc(size_t bytes)
{
    bind_thread();
    void *p = NULL;
    if (ok(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc")) return NULL;   /* an answer: the device is fine */
    return p;
}

static void mem_release(void *p)
{
    bind_thread();
    if (p) ok(cudaFree(p), "cudaFree");
}

/* Waits for the stream; a failure there is a kernel's: the device is lost. */
static int drained(const char *what)
{
    if (ok(cudaStreamSynchronize(stream), what)) broken = 1;
    return broken ? -1 : 0;
}

static int mem_upload(void *dst, const void *src, size_t bytes)
{
    bind_thread();
    if (ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "upload")) return -1;
    return drained("upload");
}

static int mem_download(void *dst, const void *src, size_t bytes)
{
    bind_thread();
    if (ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "download")) return -1;
    return drained("download");
}

static int mem_sync(void)
{
    bind_thread();
    return drained("sync");
}

static const char *mem_error(void) { return last_failure[0] ? last_failure : "no error"; }

static void mem_copy(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return;
    bind_thread();
    if (ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream), "copy")) broken = 1;
}

static void mem_zero(void *dst, size_t bytes)
{
    if (!bytes) return;
    bind_thread();
    if (ok(cudaMemsetAsync(dst, 0, bytes, stream), "zero")) broken = 1;
}

static const struct ebb_backend_memory cuda_memory = {
    mem_alloc, mem_release, mem_upload, mem_download, mem_sync, mem_error, mem_copy, mem_zero,
};

/* ---------------------------------------------------------------- products */

#define WARP 32
#define FULL_MASK 0xffffffffu
#define WARPS_PER_BLOCK 4

/* One instance per weight type: the type a constant, so hostdev.h's
 * switches fold away and each kernel holds only its own block's code. */
template <int type>
__global__ void k_matmul_quant(float *out, const int8_t *q, const float *d, const int16_t *sums,
                               const uint8_t *w, size_t row_bytes, int n_tok, int n_in, int n_out)
{
    const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (warp >= (size_t)n_tok * n_out) return;            /* whole warps leave together */
    const int t = (int)(warp / n_out), o = (int)(warp % n_out);
    const struct ebb_hd_act a = ebb_hd_act_of(type, q, d, sums, n_in, t);
    const uint8_t *row = w + (size_t)o * row_bytes;
    const int blocks = n_in / ebb_hd_block_elems(type);
    float acc = 0;
    for (int base = 0; base < blocks; base += WARP) {
        struct ebb_hd_ints mine = {0, 0};
        if (base + lane < blocks) mine = ebb_hd_block_ints(type, row, &a, base + lane);
        const int here = blocks - base < WARP ? blocks - base : WARP;
        for (int j = 0; j < here; j++) {
            struct ebb_hd_ints r;
            r.a = __shfl_sync(FULL_MASK, mine.a, j);
            r.b = __shfl_sync(FULL_MASK, mine.b, j);
            acc = ebb_hd_block_step(type, acc, row, &a, base + j, r);
        }
    }
    if (lane == 0) out[(size_t)t * n_out + o] = acc;
}

/* Decode: W4G64 and the legacy types at up to GEMV_MAX_TOK tokens. One warp
 * per output row for every token of the batch, so the row is read once; a
 * step's lanes read their blocks' code bytes side by side (hostdev.h's
 * ebb_hd_gemv_part says which lane reads what), each block's integer sum is
 * reduced across its lanes by shuffles, and every lane folds the block sums
 * in order: the CPU's steps, so the CPU's bits. */
#define GEMV_MAX_TOK 8

template <int type>
__global__ void k_gemv(float *out, const int8_t *q, const float *d, const int16_t *sums, const uint8_t *w,
                       size_t row_bytes, int n_tok, int n_in, int n_out)
{
    const size_t o = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (o >= (size_t)n_out) return;
    constexpr int lanes = type == EBB_TYPE_W4G64 || type == EBB_TYPE_Q8_0 ? 32 : 16, per_step = WARP / lanes;
    const uint8_t *row = w + o * row_bytes;
    const int blocks = n_in / ebb_hd_block_elems(type);
    float acc[GEMV_MAX_TOK];
    struct ebb_hd_act a[GEMV_MAX_TOK];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOK; t++) {
        acc[t] = 0;
        a[t] = ebb_hd_act_of(type, q, d, sums, n_in, t < n_tok ? t : 0);
    }
    for (int base = 0; base < blocks; base += per_step) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOK; t++) {
            if (t >= n_tok) break;
            int part = ebb_hd_gemv_part(type, row, a[t].q, blocks, base, lane);
            for (int off = lanes / 2; off > 0; off /= 2) part += __shfl_xor_sync(FULL_MASK, part, off);
            for (int k = 0; k < per_step && base + k < blocks; k++) {
                struct ebb_hd_ints r;
                r.a = __shfl_sync(FULL_MASK, part, k * lanes);
                r.b = 0;
                acc[t] = ebb_hd_block_step(type, acc[t], row, &a[t], base + k, r);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOK; t++)
        if (t < n_tok && lane == 0) out[(size_t)t * n_out + o] = acc[t];
}

__global__ void k_matmul_f32(float *out, const float *x, const float *w, int n_tok, int n_in, int n_out)
{
    const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (warp >= (size_t)n_tok * n_out) return;
    const int t = (int)(warp / n_out), o = (int)(warp % n_out);
    const float *xt = x + (size_t)t * n_in, *wo = w + (size_t)o * n_in;
    float sum = 0;
    for (int i = lane; i < n_in; i += WARP) sum = fmaf(xt[i], wo[i], sum);
    for (int off = WARP / 2; off > 0; off /= 2) sum += __shfl_xor_sync(FULL_MASK, sum, off);
    if (lane == 0) out[(size_t)t * n_out + o] = sum;
}

/* Prefill on int8 tensor cores: W4G64 (W4A8 and the W4A4 files, whose 4-bit
 * groups are exact at 8) and the legacy GGUF types. A warp computes 16
 * tokens x 32 rows -- four m16n8k32 tiles per 32 inputs, its A registers
 * shared by the four -- and folds each block's exact sums into its outputs
 * in block order (hostdev.h's loads and fold, which test_cuda_math runs
 * through an emulated MMA); four warps to a block. */
#define MMA_TOKENS 16
#define MMA_ROWS_PER_WARP 32
#define MMA_WARPS 4

__device__ __forceinline__ void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2])
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <int type>
__global__ void k_mma(float *out, const int8_t *q, const float *d, const int16_t *sums, const uint8_t *w,
                      size_t row_bytes, int n_tok, int n_in, int n_out)
{
    constexpr int halves = type == EBB_TYPE_W4G64 ? 2 : 1;   /* MMAs of 32 inputs per block */
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int t0 = blockIdx.y * MMA_TOKENS, o_base = (blockIdx.x * MMA_WARPS + warp) * MMA_ROWS_PER_WARP;
    if (o_base >= n_out) return;   /* a whole warp: the MMAs need every lane */
    float acc[MMA_ROWS_PER_WARP / 8][4];
    for (int nt = 0; nt < MMA_ROWS_PER_WARP / 8; nt++)
        for (int e = 0; e < 4; e++) acc[nt][e] = 0;
    for (int blk = 0; blk < n_in / (32 * halves); blk++) {
        uint32_t a[halves][4];
        for (int kh = 0; kh < halves; kh++) ebb_hd_mma_load_a(a[kh], q, n_in, n_tok, t0, 32 * (halves * blk + kh), lane);
        for (int nt = 0; nt < MMA_ROWS_PER_WARP / 8; nt++) {
            const int o0 = o_base + 8 * nt;
            int32_t c[4] = {0, 0, 0, 0};
            for (int kh = 0; kh < halves; kh++) {
                uint32_t b[2];
                ebb_hd_mma_load_b(type, b, w, row_bytes, n_out, o0, blk, kh, lane);
                mma_s8(c, a[kh], b);
            }
            ebb_hd_mma_fold(type, acc[nt], c, w, row_bytes, q, d, sums, n_tok, n_in, n_out, t0, o0, blk, lane);
        }
    }
    for (int nt = 0; nt < MMA_ROWS_PER_WARP / 8; nt++)
        for (int e = 0; e < 4; e++) {
            const int t = t0 + ebb_hd_mma_c_tok(lane, e), o = o_base + 8 * nt + ebb_hd_mma_c_row(lane, e);
            if (t < n_tok && o < n_out) out[(size_t)t * n_out + o] = acc[nt][e];
        }
}

static void launch_matmul(int type, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in,
                          int n_out)
{
    if (n_tok <= 0 || n_out <= 0) return;
    const size_t threads = (size_t)n_tok * n_out * WARP;
    const unsigned per_block = WARPS_PER_BLOCK * WARP;
    if (n_in <= 0) {                                     /* empty sums, as the CPU driver */
        bind_thread();
        ok(cudaMemsetAsync(out, 0, (size_t)n_tok * n_out * sizeof(float), stream), "matmul");
        return;
    }
    if (type == EBB_TYPE_F32) {
        bind_thread();
        k_matmul_f32<<<blocks_for(threads, per_block), per_block, 0, stream>>>(out, x->f, (const float *)w, n_tok,
                                                                             n_in, n_out);
        launched("matmul f32");
        return;
    }
    const size_t row_bytes = ebb_row_bytes((uint32_t)type, (uint64_t)n_in);
    if (n_tok > GEMV_MAX_TOK && !reference_kernels && ebb_hd_tiled_type(type)) {
        const dim3 grid(blocks_for((size_t)n_out, MMA_WARPS * MMA_ROWS_PER_WARP), blocks_for((size_t)n_tok, MMA_TOKENS));
        bind_thread();
#define MMA_CASE(t) \
    case t: \
        k_mma<t><<<grid, MMA_WARPS * WARP, 0, stream>>>(out, x->q, x->s, x->sums, (const uint8_t *)w, row_bytes, \
                                                        n_tok, n_in, n_out); \
        break;
        switch (type) {
        EBB_HD_TILED_TYPES(MMA_CASE)
        default: break;
        }
#undef MMA_CASE
        launched("matmul (tensor cores)");
        return;
    }
    if (n_tok <= GEMV_MAX_TOK && !reference_kernels && ebb_hd_tiled_type(type)) {
        const unsigned rows_grid = blocks_for((size_t)n_out * WARP, per_block);
        bind_thread();
#define GEMV_CASE(t) \
    case t: \
        k_gemv<t><<<rows_grid, per_block, 0, stream>>>(out, x->q, x->s, x->sums, (const uint8_t *)w, row_bytes, \
                                                       n_tok, n_in, n_out); \
        break;
        switch (type) {
        EBB_HD_TILED_TYPES(GEMV_CASE)
        default: break;
        }
#undef GEMV_CASE
        launched("matmul (decode)");
        return;
    }
    const unsigned grid = blocks_for(threads, per_block);
    bind_thread();
#define QUANT_CASE(name, t) \
    case t: \
        k_matmul_quant<t><<<grid, per_block, 0, stream>>>(out, x->q, x->s, x->sums, (const uint8_t *)w, row_bytes, \
                                                          n_tok, n_in, n_out); \
        break;
    switch (type) {
    EBB_INT_PRODUCT_TYPES(QUANT_CASE)
    default: return;
    }
#undef QUANT_CASE
    launched("matmul");
}

#define MATMUL_ENTRY(name, type) \
    static void matmul_##name(struct ebb_pool *pool, float *out, const struct ebb_act *x, const void *w, int n_tok, \
                              int n_in, int n_out) \
    { launch_matmul(type, out, x, w, n_tok, n_in, n_out); }
EBB_PRODUCT_TYPES(MATMUL_ENTRY)

/* ------------------------------------------------------------- quantizers */

__global__ void k_quantize_act(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{
    const int groups = n / EBB_ACT_GROUP;
    const size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (size_t)n_tok * groups) return;
    ebb_hd_quantize_run(x + g * 64, 64, ebb_hd_act_qmax((int)(g % groups), groups, n_hi), q + g * 64, s + g);
}

static void quantize_act(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{
    const size_t groups = (size_t)n_tok * (n / EBB_ACT_GROUP);
    if (!groups) return;
    bind_thread();
    k_quantize_act<<<blocks_for(groups, 128), 128, 0, stream>>>(x, n_tok, n, n_hi, q, s);
    launched("quantize_act");
}

__global__ void k_quantize_q8b32(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= n / 32) return;
    sums[b] = (int16_t)ebb_hd_quantize_run(x + 32 * b, 32, b < n_hi ? 127.0f : 7.0f, q + 32 * b, d + b);
}

static void quantize_q8b32(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    if (n < 32) return;
    bind_thread();
    k_quantize_q8b32<<<blocks_for((size_t)n / 32, 64), 64, 0, stream>>>(x, n, n_hi, q, d, sums);
    launched("quantize_q8b32");
}

/* One block per token row: the blocks' loudness in shared memory, then a
 * thread per block finds its rank (hostdev.h) and quantizes it. */
__global__ void k_quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    extern __shared__ float amax[];
    const int blocks = n / 32;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) amax[b] = ebb_hd_block_amax(x + 32 * b, 32);
    __syncthreads();
    for (int b = threadIdx.x; b < blocks; b += blockDim.x)
        sums[b] = (int16_t)ebb_hd_quantize_run(x + 32 * b, 32, ebb_hd_is_loud(amax, blocks, n_hi, b) ? 127.0f : 7.0f,
                                               q + 32 * b, d + b);
}

static void quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    if (n < 32) return;
    bind_thread();
    k_quantize_q8b32_loudest<<<1, 256, (size_t)(n / 32) * sizeof(float), stream>>>(x, n, n_hi, q, d, sums);
    launched("quantize_q8b32_loudest");
}

__global__ void k_quantize_q8k(const float *x, int n, int8_t *q, float *d, int16_t *sums)
{
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= n / 256) return;
    ebb_hd_quantize_q8k_block(x + 256 * b, q + 256 * b, d + b, sums + 16 * b);
}

static void quantize_q8k(const float *x, int n, int8_t *q, float *d, int16_t *sums)
{
    if (n < 256) return;
    bind_thread();
    k_quantize_q8k<<<blocks_for((size_t)n / 256, 32), 32, 0, stream>>>(x, n, q, d, sums);
    launched("quantize_q8k");
}

__global__ void k_hadamard64(float *x, int blocks)
{
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    float v[64];
    for (int i = 0; i < 64; i++) v[i] = x[64 * (size_t)b + i];
    ebb_hd_hadamard64(v);
    for (int i = 0; i < 64; i++) x[64 * (size_t)b + i] = v[i];
}

static void hadamard64(float *x, int n)
{
    if (n < 64) return;
    bind_thread();
    k_hadamard64<<<blocks_for((size_t)n / 64, 64), 64, 0, stream>>>(x, n / 64);
    launched("hadamard64");
}

/* ------------------------------------------------------------ vector ops */

#define VEC_THREADS 256

/* The sum (or max) of one value per thread over the block; every thread gets it. */
__device__ float block_reduce(float v, int is_max)
{
    __shared__ float part[VEC_THREADS / WARP];
    for (int off = WARP / 2; off > 0; off /= 2) {
        const float u = __shfl_xor_sync(FULL_MASK, v, off);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    if (threadIdx.x % WARP == 0) part[threadIdx.x / WARP] = v;
    __syncthreads();
    v = part[0];
    for (int i = 1; i < VEC_THREADS / WARP; i++) v = is_max ? fmaxf(v, part[i]) : v + part[i];
    __syncthreads();                                   /* part is reused by the next reduction */
    return v;
}

__global__ void k_rmsnorm(float *out, const float *x, const float *g, int n, float eps)
{
    float ss = 0;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) ss = fmaf(x[i], x[i], ss);
    ss = block_reduce(ss, 0);
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) out[i] = x[i] * scale * g[i];
}

static void rmsnorm(float *out, const float *x, const float *g, int n, float eps)
{
    if (n <= 0) return;
    bind_thread();
    k_rmsnorm<<<1, VEC_THREADS, 0, stream>>>(out, x, g, n, eps);
    launched("rmsnorm");
}

__global__ void k_softmax(float *x, int n)
{
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) m = fmaxf(m, x[i]);
    m = block_reduce(m, 1);
    float sum = 0;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    sum = block_reduce(sum, 0);
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) x[i] *= inv;
}

static void softmax(float *x, int n)
{
    if (n <= 0) return;
    bind_thread();
    k_softmax<<<1, VEC_THREADS, 0, stream>>>(x, n);
    launched("softmax");
}

__global__ void k_swiglu(float *gate, const float *up, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

static void swiglu(float *gate, const float *up, int n)
{
    if (n <= 0) return;
    bind_thread();
    k_swiglu<<<blocks_for((size_t)n, VEC_THREADS), VEC_THREADS, 0, stream>>>(gate, up, n);
    launched("swiglu");
}

__global__ void k_add(float *y, const float *x, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

static void add(float *y, const float *x, int n)
{
    if (n <= 0) return;
    bind_thread();
    k_add<<<blocks_for((size_t)n, VEC_THREADS), VEC_THREADS, 0, stream>>>(y, x, n);
    launched("add");
}

/* --------------------------------------------- steps between the products */

__global__ void k_get_rows(float *out, const uint8_t *table, int type, size_t row_bytes, const int32_t *ids,
                           int n_rows, int n)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n) return;
    const size_t r = e / n;
    out[e] = ebb_hd_row_value(type, table + (size_t)ids[r] * row_bytes, (int)(e % n));
}

static void get_rows(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n)
{
    if (n_rows <= 0 || n <= 0) return;
    const size_t row_bytes = ebb_row_bytes(type, (uint64_t)n);
    bind_thread();
    k_get_rows<<<blocks_for((size_t)n_rows * n, 256), 256, 0, stream>>>(out, (const uint8_t *)table, (int)type,
                                                                       row_bytes, ids, n_rows, n);
    launched("get_rows");
}

__global__ void k_permute(float *out, const float *x, const int32_t *perm, int n_tok, int n)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_tok * n) return;
    out[e] = x[(e / n) * n + perm[e % n]];
}

static void permute(float *out, const float *x, const int32_t *perm, int n_tok, int n)
{
    if (n_tok <= 0 || n <= 0) return;
    bind_thread();
    k_permute<<<blocks_for((size_t)n_tok * n, 256), 256, 0, stream>>>(out, x, perm, n_tok, n);
    launched("permute");
}

__global__ void k_rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int half, int neox,
                       const float *cos, const float *sin)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   /* one pair */
    if (e >= (size_t)n_tok * n_heads * half) return;
    const int i = (int)(e % half);
    const size_t th = e / half, t = th / n_heads, h = th % n_heads;
    ebb_hd_rope_pair(x + t * stride + h * head_dim, i, half, neox, cos[t * half + i], sin[t * half + i]);
}

static void rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                 const float *cos, const float *sin)
{
    const int half = rope_dim / 2;
    if (n_tok <= 0 || n_heads <= 0 || half <= 0) return;
    if (stride == 0) stride = (size_t)n_heads * head_dim;   /* one row: any stride */
    bind_thread();
    k_rope<<<blocks_for((size_t)n_tok * n_heads * half, 256), 256, 0, stream>>>(x, stride, n_tok, n_heads, head_dim,
                                                                               half, neox, cos, sin);
    launched("rope");
}

__global__ void k_scale(float *out, const float *x, float s, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * s;
}

static void scale(float *out, const float *x, float s, int n)
{
    if (n <= 0) return;
    bind_thread();
    k_scale<<<blocks_for((size_t)n, VEC_THREADS), VEC_THREADS, 0, stream>>>(out, x, s, n);
    launched("scale");
}

/* kv_store_row: a thread per value (32 and 16 bits) or per group (8, 4). */
__global__ void k_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (bits == 32) {
        if (i < n) ((float *)row)[i] = x[i];
    } else if (bits == 16) {
        if (i < n) ((uint16_t *)row)[i] = ebb_hd_to_f16(ebb_hd_clamp_f16_range(x[i]));
    } else if (i < n / group) {
        ebb_hd_kv_store_group(row, x, n, bits, group, rotate, i);
    }
}

static void kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{
    if (n <= 0) return;
    const int threads = bits >= 16 ? n : n / group;
    bind_thread();
    k_kv_store_row<<<blocks_for((size_t)threads, 64), 64, 0, stream>>>(row, x, n, bits, group, rotate);
    launched("kv_store_row");
}

/* -------------------------------------------------------------- attention */

__global__ void k_attn_scores(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                              size_t k_stride, int n_rows, int n)
{
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n_q * n_rows) return;
    const int j = (int)(i / n_rows), r = (int)(i % n_rows);
    s[(size_t)j * s_stride + r] = ebb_hd_dot8(q + (size_t)j * q_stride, k + (size_t)r * k_stride, n);
}

static void attn_scores(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                        size_t k_stride, int n_rows, int n)
{
    if (n_q <= 0 || n_rows <= 0) return;
    bind_thread();
    k_attn_scores<<<blocks_for((size_t)n_q * n_rows, 128), 128, 0, stream>>>(s, s_stride, q, q_stride, n_q, k,
                                                                            k_stride, n_rows, n);
    launched("attn_scores");
}

__global__ void k_attn_values(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float acc = y[i];
    for (int r = 0; r < n_rows; r++) acc = fmaf(p[r], v[(size_t)r * v_stride + i], acc);
    y[i] = acc;
}

static void attn_values(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n)
{
    if (n <= 0 || n_rows <= 0) return;
    bind_thread();
    k_attn_values<<<blocks_for((size_t)n, 128), 128, 0, stream>>>(y, p, v, v_stride, n_rows, n);
    launched("attn_values");
}

/* The fused attention. A block's query j: scaled (qs) and rotated (qr) into shared memory, with
 * the sinks' rotated rows when the body is read rotated; returns the
 * query's position. */
__device__ int attend_prepare(const struct ebb_kv_pages &v, int layer, int kvh, const float *q, size_t stride,
                              int n_head, int pos0, float scale, int j, float *qs, float *qr, float *sink_k,
                              float *sink_v, int *body_rotated)
{
    const int hd = v.head_dim, pos = pos0 + j / n_head, blocks64 = hd / 64;
    const size_t at = (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
    *body_rotated = v.rotate && ebb_hd_kv_reads_body(v.bits, 0, pos);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qr[i] = qs[i] = q[at + i] * scale;
    __syncthreads();
    if (v.rotate) {
        for (int b = threadIdx.x; b < blocks64; b += blockDim.x) ebb_hd_hadamard64(qr + 64 * b);
        for (int t = threadIdx.x; *body_rotated && t < 2 * EBB_KV_SINK_TOKENS * blocks64; t += blockDim.x) {
            const int kind = t / (EBB_KV_SINK_TOKENS * blocks64), p = t / blocks64 % EBB_KV_SINK_TOKENS;
            const int b = t % blocks64;
            const float *src = v.sink + (((size_t)layer * 2 + kind) * EBB_KV_SINK_TOKENS + p) * v.kv_dim +
                               (size_t)kvh * hd + 64 * b;
            float *dst = (kind ? sink_v : sink_k) + (size_t)p * hd + 64 * b;
            for (int i = 0; i < 64; i++) dst[i] = src[i];
            ebb_hd_hadamard64(dst);
        }
    }
    __syncthreads();
    return pos;
}

/* out += H64(rot), the chain of rows read rotated brought back (the whole
 * block calls it, or none of it). */
__device__ void attend_add_rotated(int hd, float *rot, float *out)
{
    __syncthreads();
    for (int b = threadIdx.x; b < hd / 64; b += blockDim.x) ebb_hd_hadamard64(rot + 64 * b);
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) out[i] = out[i] + rot[i];
}

/* One block of VEC_THREADS per query (backend.h's attend): scores one
 * thread per position into the caller's scratch; softmax as k_softmax (the block's
 * order: within float error of the CPU's); then one thread per channel
 * running both value chains in position order, as kv.c does. */
__global__ void k_attend(struct ebb_kv_pages v, int layer, int kvh, const float *q, float *out, size_t stride,
                         int n_head, int pos0, float scale, float *scratch, int S)
{
    extern __shared__ float sh[];
    const int j = blockIdx.x, hd = v.head_dim;
    const size_t at = (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
    float *qs = sh, *qr = qs + hd, *sink_k = qr + hd, *sink_v = sink_k + EBB_KV_SINK_TOKENS * hd;
    float *rot = sink_v + EBB_KV_SINK_TOKENS * hd;
    int body_rotated;
    const int pos = attend_prepare(v, layer, kvh, q, stride, n_head, pos0, scale, j, qs, qr, sink_k, sink_v,
                                   &body_rotated);
    float *s = scratch + (size_t)j * S;
    float m = -INFINITY;
    for (int p = threadIdx.x; p <= pos; p += blockDim.x) {
        s[p] = ebb_hd_attend_score(&v, layer, kvh, qs, qr, p, pos, sink_k);
        m = fmaxf(m, s[p]);
    }
    m = block_reduce(m, 1);
    float sum = 0;
    for (int p = threadIdx.x; p <= pos; p += blockDim.x) {
        s[p] = expf(s[p] - m);
        sum += s[p];
    }
    sum = block_reduce(sum, 0);
    const float inv = 1.0f / sum;
    for (int p = threadIdx.x; p <= pos; p += blockDim.x) s[p] *= inv;
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        ebb_hd_attend_chains(&v, layer, kvh, s, sink_v, pos, 0, pos, i, &out[at + i], &rot[i]);
    if (body_rotated) attend_add_rotated(hd, rot, out + at);
}

/* Long contexts, split over the sequence (flash-decoding): a query whose
 * position is EBB_HD_ATTEND_SPLIT_FROM or more is computed by one thread
 * block per EBB_HD_ATTEND_CHUNK positions -- the chunk's scores, their own maximum m and
 * sum l of exp(s - m), and both value chains of exp(s - m) v in position
 * order, written to `parts` -- and one block per query then merges the
 * chunks in order, each scaled by exp(m_c - M) / L. One block per query
 * reads a long cache one position at a time per channel; the split puts
 * every multiprocessor on it. The chunks' bounds are absolute positions
 * and the choice depends on the query's own position only, so a query gives
 * the same bits in any batch (prefill or decode). Within float error of
 * the CPU's one softmax, as the unsplit kernel is. */
__global__ void k_attend_part(struct ebb_kv_pages v, int layer, int kvh, const float *q, size_t stride, int n_head,
                              int pos0, float scale, float *scratch, int S, int j0, float *parts, int n_chunks)
{
    extern __shared__ float sh[];
    const int j = j0 + blockIdx.x, c = blockIdx.y, hd = v.head_dim;
    float *qs = sh, *qr = qs + hd, *sink_k = qr + hd, *sink_v = sink_k + EBB_KV_SINK_TOKENS * hd;
    float *part = parts + ((size_t)blockIdx.x * n_chunks + c) * EBB_HD_ATTEND_PART(hd);
    const int pos = pos0 + j / n_head, lo = c * EBB_HD_ATTEND_CHUNK, hi = ebb_hd_attend_chunk_last(c, pos);
    if (lo > pos) {   /* past this query's position: an empty chunk */
        for (int i = threadIdx.x; i < (int)EBB_HD_ATTEND_PART(hd); i += blockDim.x) part[i] = i == 0 ? -INFINITY : 0.0f;
        return;
    }
    int body_rotated;
    attend_prepare(v, layer, kvh, q, stride, n_head, pos0, scale, j, qs, qr, sink_k, sink_v, &body_rotated);
    float *s = scratch + (size_t)j * S;
    float m = -INFINITY;
    for (int p = lo + threadIdx.x; p <= hi; p += blockDim.x) {
        s[p] = ebb_hd_attend_score(&v, layer, kvh, qs, qr, p, pos, sink_k);
        m = fmaxf(m, s[p]);
    }
    m = block_reduce(m, 1);
    float sum = 0;
    for (int p = lo + threadIdx.x; p <= hi; p += blockDim.x) {
        s[p] = expf(s[p] - m);
        sum += s[p];
    }
    sum = block_reduce(sum, 0);
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        ebb_hd_attend_chains(&v, layer, kvh, s, sink_v, pos, lo, hi, i, &part[2 + i], &part[2 + hd + i]);
    if (threadIdx.x == 0) part[0] = m, part[1] = sum;
}

__global__ void k_attend_merge(struct ebb_kv_pages v, float *out, size_t stride, int n_head, int pos0, int j0,
                               const float *parts, int n_chunks)
{
    extern __shared__ float sh[];
    const int j = j0 + blockIdx.x, hd = v.head_dim, pos = pos0 + j / n_head;
    const size_t at = (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
    const float *mine = parts + (size_t)blockIdx.x * n_chunks * EBB_HD_ATTEND_PART(hd);
    float big, inv, *rot = sh;
    ebb_hd_attend_merge_scale(mine, n_chunks, hd, &big, &inv);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) ebb_hd_attend_merge_elem(mine, n_chunks, hd, i, big, inv,
                                                                              &out[at + i], &rot[i]);
    if (v.rotate && ebb_hd_kv_reads_body(v.bits, 0, pos)) attend_add_rotated(hd, rot, out + at);
}

/* The split's partial results, grown on demand (the stream orders its
 * users); NULL when the device has no room, and the split is skipped. */
static float *attend_parts;
static size_t attend_parts_cap;

static float *parts_for(size_t floats)
{
    if (floats <= attend_parts_cap) return attend_parts;
    float *grown = NULL;
    if (cudaMalloc((void **)&grown, floats * sizeof(float)) != cudaSuccess) {
        cudaGetLastError();   /* an answer, not a fault: the unsplit kernel serves */
        return NULL;
    }
    if (attend_parts) {
        cudaStreamSynchronize(stream);
        cudaFree(attend_parts);
    }
    attend_parts = grown;
    attend_parts_cap = floats;
    return grown;
}

static void attend(const struct ebb_kv_pages *kv, int layer, int kvh, const float *q, float *out, size_t stride,
                   int n_tok, int n_head, int pos0, float scale, float *scratch)
{
    const int nq = n_tok * n_head;
    if (nq <= 0) return;
    const size_t shared = (size_t)(3 + 2 * EBB_KV_SINK_TOKENS) * kv->head_dim * sizeof(float);
    const int S = pos0 + n_tok;
    /* Queries before the first token at EBB_HD_ATTEND_SPLIT_FROM or later take one block each. */
    int first_split = EBB_HD_ATTEND_SPLIT_FROM - pos0;
    if (first_split < 0) first_split = 0;
    const int n_whole = (first_split < n_tok ? first_split : n_tok) * n_head;
    const int n_chunks = (S + EBB_HD_ATTEND_CHUNK - 1) / EBB_HD_ATTEND_CHUNK;
    bind_thread();
    float *parts = nq > n_whole && !reference_kernels
                       ? parts_for((size_t)(nq - n_whole) * n_chunks * EBB_HD_ATTEND_PART(kv->head_dim))
                       : NULL;
    const int whole = parts ? n_whole : nq;
    if (whole > 0) {
        k_attend<<<whole, VEC_THREADS, shared, stream>>>(*kv, layer, kvh, q, out, stride, n_head, pos0, scale, scratch,
                                                         S);
        launched("attend");
    }
    if (!parts) return;
    const int n_split = nq - whole;
    k_attend_part<<<dim3(n_split, n_chunks), VEC_THREADS, shared, stream>>>(*kv, layer, kvh, q, stride, n_head, pos0,
                                                                            scale, scratch, S, whole, parts, n_chunks);
    launched("attend (split)");
    k_attend_merge<<<n_split, VEC_THREADS, kv->head_dim * sizeof(float), stream>>>(*kv, out, stride, n_head, pos0,
                                                                                    whole, parts, n_chunks);
    launched("attend (merge)");
}

__global__ void k_kv_rows_f16(float *out, const uint8_t *rows, size_t stride, int n_rows, int n)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n) return;
    const size_t r = e / n, i = e % n;
    out[e] = ebb_hd_f16_at(rows + r * stride + 2 * i);
}

static void kv_rows_f16(float *out, const uint16_t *rows, size_t stride, int n_rows, int n)
{
    if (n_rows <= 0 || n <= 0) return;
    bind_thread();
    k_kv_rows_f16<<<blocks_for((size_t)n_rows * n, 256), 256, 0, stream>>>(out, (const uint8_t *)rows, stride,
                                                                          n_rows, n);
    launched("kv_rows_f16");
}

__global__ void k_kv_rows_q(float *out, const uint8_t *codes, const uint8_t *dm, size_t stride, int n_rows, int n,
                            int bits, int group)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n) return;
    const size_t r = e / n;
    out[e] = ebb_hd_kv_value(codes + r * stride, dm + r * stride, bits, group, (int)(e % n));
}

static void kv_rows_q(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                      int bits, int group)
{
    if (n_rows <= 0 || n <= 0) return;
    bind_thread();
    k_kv_rows_q<<<blocks_for((size_t)n_rows * n, 256), 256, 0, stream>>>(out, codes, (const uint8_t *)dm, stride,
                                                                        n_rows, n, bits, group);
    launched("kv_rows_q");
}

__global__ void k_kv_rows_qc(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                             int bits, int group)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n) return;
    out[e] = ebb_hd_kv_value_channel(codes + (e / n) * stride, dm, bits, group, (int)(e % n));
}

static void kv_rows_qc(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                       int bits, int group)
{
    if (n_rows <= 0 || n <= 0) return;
    bind_thread();
    k_kv_rows_qc<<<blocks_for((size_t)n_rows * n, 256), 256, 0, stream>>>(out, codes, stride, dm, n_rows, n, bits,
                                                                         group);
    launched("kv_rows_qc");
}

/* ---------------------------------------------------------------- BitStack */

__global__ void k_bitstack_isums(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n_vec) return;
    const size_t o = e / n_vec, v = e % n_vec;
    isum[e] = ebb_hd_sign_isum(signs + o * (n / 8), t + v * n, n);
}

static void bitstack_isums(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n)
{
    if (n_rows <= 0 || n_vec <= 0) return;
    bind_thread();
    k_bitstack_isums<<<blocks_for((size_t)n_rows * n_vec, 128), 128, 0, stream>>>(isum, signs, n_rows, t, n_vec, n);
    launched("bitstack_isums");
}

__global__ void k_bitstack_codes(const float *x, const float *v, int n, int8_t *q, float *scale)
{
    float amax = 0;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) amax = fmaxf(amax, fabsf(v[i] * x[i]));
    amax = block_reduce(amax, 1);                      /* a max: exact in any order */
    float s;
    const float inv = ebb_hd_act_inverse(amax, 127.0f, &s);
    if (threadIdx.x == 0) *scale = s;
    for (int i = threadIdx.x; i < n; i += VEC_THREADS) q[i] = (int8_t)ebb_hd_code(v[i] * x[i], inv);
}

static void bitstack_codes(const float *x, const float *v, int n, int8_t *q, float *scale)
{
    if (n <= 0) return;
    bind_thread();
    k_bitstack_codes<<<1, VEC_THREADS, 0, stream>>>(x, v, n, q, scale);
    launched("bitstack_codes");
}

__global__ void k_bitstack_scale_add(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok,
                                     int rank, const float *u, const float *ts)
{
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n_rows * n_tok) return;
    const size_t o = e / n_tok, t = e % n_tok;
    out[t * out_stride + o] += ebb_hd_bitstack_scaled(isum + (o * n_tok + t) * rank, u + o * rank, ts + t * rank, rank);
}

static void bitstack_scale_add(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok, int rank,
                               const float *u, const float *ts)
{
    if (n_rows <= 0 || n_tok <= 0) return;
    bind_thread();
    k_bitstack_scale_add<<<blocks_for((size_t)n_rows * n_tok, 128), 128, 0, stream>>>(out, out_stride, isum, n_rows,
                                                                                     n_tok, rank, u, ts);
    launched("bitstack_scale_add");
}

/* ------------------------------------------------------------------- table */

static struct ebb_backend make_table(void)
{
    struct ebb_backend b;
    memset(&b, 0, sizeof b);
    b.name = "cuda";
    b.memory = &cuda_memory;
#define SET_MATMUL(name, type) b.matmul[type] = matmul_##name;
    EBB_PRODUCT_TYPES(SET_MATMUL)
#undef SET_MATMUL
    b.rmsnorm_f32 = rmsnorm;
    b.softmax_f32 = softmax;
    b.swiglu_f32 = swiglu;
    b.add_f32 = add;
    b.quantize_act = quantize_act;
    b.quantize_q8b32 = quantize_q8b32;
    b.quantize_q8b32_loudest = quantize_q8b32_loudest;
    b.quantize_q8k = quantize_q8k;
    b.hadamard64 = hadamard64;
    b.attn_scores = attn_scores;
    b.attn_values = attn_values;
    b.kv_rows_f16 = kv_rows_f16;
    b.kv_rows_q = kv_rows_q;
    b.kv_rows_qc = kv_rows_qc;
    b.bitstack_isums = bitstack_isums;
    b.bitstack_codes = bitstack_codes;
    b.bitstack_scale_add = bitstack_scale_add;
    b.get_rows = get_rows;
    b.permute_f32 = permute;
    b.rope_f32 = rope;
    b.scale_f32 = scale;
    b.kv_store_row = kv_store_row;
    b.attend = attend;
    return b;
}

static struct ebb_backend cuda_table;

static void say(char *why, size_t why_len, const char *fmt, ...)
{
    if (!why || !why_len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, why_len, fmt, ap);
    va_end(ap);
}

/* The device count, or -1 with the reason (no driver, no device, a driver
 * older than this toolkit). */
static int count_devices(char *why, size_t why_len)
{
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && count == 0)) {
        say(why, why_len, "no CUDA device: the driver reports none");
        return -1;
    }
    if (e == cudaErrorInsufficientDriver) {
        int driver = 0, runtime = 0;
        cudaDriverGetVersion(&driver);
        cudaRuntimeGetVersion(&runtime);
        if (driver == 0) say(why, why_len, "no CUDA device: no NVIDIA driver is installed (libcuda.so.1 not found)");
        else
            say(why, why_len, "no CUDA device: the NVIDIA driver supports CUDA %d.%d, this ebb needs %d.%d or newer",
                driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
        return -1;
    }
    if (e != cudaSuccess) {
        say(why, why_len, "no CUDA device: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
        return -1;
    }
    return count;
}

extern "C" int ebb_cuda_devices(struct ebb_device_info *out, int max, char *why, size_t why_len)
{
    const int count = count_devices(why, why_len);
    if (count < 0) return -1;
    for (int i = 0; i < count && i < max; i++) {
        cudaDeviceProp p;
        if (ok(cudaGetDeviceProperties(&p, i), "cudaGetDeviceProperties")) {
            say(why, why_len, "%s", last_failure);
            return -1;
        }
        memset(&out[i], 0, sizeof out[i]);
        snprintf(out[i].name, sizeof out[i].name, "%s", p.name);
        out[i].total_bytes = p.totalGlobalMem;
        out[i].cc_major = p.major;
        out[i].cc_minor = p.minor;
        out[i].multiprocessors = p.multiProcessorCount;
        /* free memory needs a context on the device; cudaMemGetInfo makes one */
        int was = -1;
        size_t free_b = 0, total_b = 0;
        if (cudaGetDevice(&was) == cudaSuccess && cudaSetDevice(i) == cudaSuccess &&
            cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
            out[i].free_bytes = free_b;
        if (was >= 0) cudaSetDevice(was);
    }
    return count;
}

extern "C" const struct ebb_backend *ebb_backend_cuda(int index, char *why, size_t why_len)
{
    if (chosen_device >= 0) {
        if (index == chosen_device) return &cuda_table;
        say(why, why_len, "CUDA device %d is in use by this process; one device per process", chosen_device);
        return NULL;
    }
    const int count = count_devices(why, why_len);
    if (count < 0) return NULL;
    if (index < 0 || index >= count) {
        say(why, why_len, "no CUDA device %d: this machine has %d (0 to %d)", index, count, count - 1);
        return NULL;
    }
    cudaError_t e = cudaSetDevice(index);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        say(why, why_len, "CUDA device %d: %s (%s)", index, cudaGetErrorString(e), cudaGetErrorName(e));
        return NULL;
    }
    const char *kernels = getenv("EBB_CUDA_KERNELS");
    reference_kernels = kernels && !strcmp(kernels, "reference");
    cuda_table = make_table();
    chosen_device = index;
    return &cuda_table;
}
