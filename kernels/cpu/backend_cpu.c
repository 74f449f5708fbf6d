/* CPU backend: the op tables, their selection and the matmul driver.
 *
 * Selection: the instruction-set paths are separate translation units built
 * with their own flags; this file (built for baseline x86-64) asks cpuid once
 * which of them the processor and OS can run (__builtin_cpu_supports also
 * checks that the OS saves the wide registers) and hands out the best. The
 * choice can be forced for benchmarks and debugging with EBB_CPU_PATH=scalar
 * or avx2 (ignored, with a message, if this machine cannot run it).
 *
 * Tables: one const table per path, written out once (CPU_PATH below), so
 * what each path runs, and what AVX-512 borrows from AVX2, is read in one
 * place and nothing is patched at start.
 *
 * Driver: a matmul (any weight type) is cut into rectangles of (tokens x output rows) that the
 * pool's threads claim one by one. Rows are cut first, in contiguous chunks
 * (each thread then streams its own part of the weights, which is what bounds
 * decode); tokens are cut as well only when there are too few rows to give
 * every thread several pieces. About four pieces per thread keep the threads
 * balanced when another process takes a core for a while; tiny ops stay on
 * the calling thread, where waking workers would cost more than it saves.
 */
#include "kernels/cpu/ops.h"
#include "kernels/cpu/native.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#define PIECES_PER_THREAD 4
#define MIN_ROWS_PER_PIECE 16
#define MIN_TOKENS_PER_PIECE 24
#define MIN_PARALLEL_FLOPS (1 << 17)  /* below this the op runs on the caller */

/* How a (n_tok x n_out) matmul is cut: row_pieces x tok_pieces rectangles of
 * `rows` output rows and `toks` tokens (the last ones shorter). */
struct split {
    int row_pieces, rows;
    int tok_pieces, toks;
};

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

static struct split plan_split(int threads, int n_tok, int n_out, int row_align, int tok_align)
{
    struct split p;
    int target = threads * PIECES_PER_THREAD;
    int max_row_pieces = ceil_div(n_out, MIN_ROWS_PER_PIECE);
    p.row_pieces = target < max_row_pieces ? target : max_row_pieces;
    p.rows = ceil_div(ceil_div(n_out, p.row_pieces), row_align) * row_align;
    p.row_pieces = ceil_div(n_out, p.rows);

    p.tok_pieces = 1;
    if (p.row_pieces < target) {
        int max_tok_pieces = ceil_div(n_tok, MIN_TOKENS_PER_PIECE);
        p.tok_pieces = ceil_div(target, p.row_pieces);
        if (p.tok_pieces > max_tok_pieces) p.tok_pieces = max_tok_pieces;
    }
    p.toks = ceil_div(n_tok, p.tok_pieces);
    if (p.toks > tok_align) p.toks = ceil_div(p.toks, tok_align) * tok_align;  /* whole token tiles */
    p.tok_pieces = ceil_div(n_tok, p.toks);
    return p;
}

/* Piece i of a split as [t0, t1) x [o0, o1); false if it is empty. */
static int piece_bounds(const struct split *p, int i, int n_tok, int n_out, int *t0, int *t1,
                        int *o0, int *o1)
{
    int ri = i % p->row_pieces, ti = i / p->row_pieces;
    *o0 = ri * p->rows;
    *o1 = *o0 + p->rows < n_out ? *o0 + p->rows : n_out;
    *t0 = ti * p->toks;
    *t1 = *t0 + p->toks < n_tok ? *t0 + p->toks : n_tok;
    return *o0 < *o1 && *t0 < *t1;
}

struct drive_job {
    struct matmul_args args;
    matmul_block_fn block;
    struct split split;
};

static void drive_piece(void *vp, int i, int n)
{
    (void)n;
    const struct drive_job *j = vp;
    int t0, t1, o0, o1;
    if (piece_bounds(&j->split, i, j->args.n_tok, j->args.n_out, &t0, &t1, &o0, &o1))
        j->block(&j->args, t0, t1, o0, o1);
}

void ebb_cpu_matmul_drive(struct ebb_pool *pool, enum ebb_type type, matmul_block_fn block, int row_align,
                          int tok_align, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in,
                          int n_out)
{
    if (n_tok <= 0 || n_out <= 0) return;
    if (n_in <= 0) {                          /* empty sums */
        memset(out, 0, (size_t)n_tok * (size_t)n_out * sizeof *out);
        return;
    }
    struct drive_job j = {
        .args = { out, *x, w, ebb_row_bytes(type, (uint64_t)n_in), n_tok, n_in, n_out },
        .block = block,
    };
    int threads = ebb_pool_threads(pool);
    double flops = 2.0 * n_tok * n_in * (double)n_out;
    if (threads == 1 || flops < MIN_PARALLEL_FLOPS) {
        block(&j.args, 0, n_tok, 0, n_out);
        return;
    }
    j.split = plan_split(threads, n_tok, n_out, row_align, tok_align);
    ebb_pool_run(pool, drive_piece, &j, j.split.row_pieces * j.split.tok_pieces);
}

/* ----------------------------------------------------------------- tables */

/* One complete table per path, each op named ebb_cpu_<op>_<isa> (ops.h).
 * `native` names the path whose integer products it takes (W4G64 and the GGUF
 * types; AMX is AVX-512's table with its own), `own` its f32 product and vector ops,
 * `shared` the path whose quantize_act, hadamard64, attention and KV-row ops
 * it uses. AVX-512 takes those from AVX2: they are bound by per-group horizontal work and memory,
 * not by vector width, and the AVX2 code (which every AVX-512 processor
 * runs) gives the same bits; its products are its own (VNNI) and so are
 * its f32 ops (512-bit vectors, masked tails). */
#define CPU_MATMUL_scalar(name, TYPE) [TYPE] = ebb_cpu_matmul_##name##_scalar,
#define CPU_MATMUL_avx2(name, TYPE) [TYPE] = ebb_cpu_matmul_##name##_avx2,
#define CPU_MATMUL_avx512(name, TYPE) [TYPE] = ebb_cpu_matmul_##name##_avx512,
#define CPU_MATMUL_amx(name, TYPE) [TYPE] = ebb_cpu_matmul_##name##_amx,
#define CPU_PATH(path, native, own, shared) { \
    .name = #path, \
    .matmul = { CPU_MATMUL_##own(f32, EBB_TYPE_F32) EBB_INT_PRODUCT_TYPES(CPU_MATMUL_##native) }, \
    .quantize_q8b32 = ebb_native_quantize_q8b32_##own, \
    .quantize_q8k = ebb_native_quantize_q8k_##own, \
    .rmsnorm_f32 = ebb_cpu_rmsnorm_##own, \
    .softmax_f32 = ebb_cpu_softmax_##own, \
    .swiglu_f32 = ebb_cpu_swiglu_##own, \
    .add_f32 = ebb_cpu_add_##own, \
    .quantize_act = ebb_cpu_quantize_act_##shared, \
    .hadamard64 = ebb_cpu_hadamard64_##shared, \
    .attn_scores = ebb_cpu_attn_scores_##shared, \
    .attn_values = ebb_cpu_attn_values_##shared, \
    .kv_rows_f16 = ebb_cpu_kv_rows_f16_##shared, \
    .kv_rows_q = ebb_cpu_kv_rows_q_##shared, \
    .kv_rows_qc = ebb_cpu_kv_rows_qc_##shared, \
    .bitstack_codes = ebb_cpu_bitstack_codes_##shared, \
    .bitstack_scale_add = ebb_cpu_bitstack_scale_add_##shared, \
    .bitstack_isums = ebb_cpu_bitstack_isums_##own, \
    .get_rows = ebb_cpu_get_rows, \
    .permute_f32 = ebb_cpu_permute, \
    .rope_f32 = ebb_cpu_rope, \
    .scale_f32 = ebb_cpu_scale, \
    .quantize_q8b32_loudest = ebb_cpu_quantize_q8b32_loudest, \
    .kv_store_row = ebb_cpu_kv_store_row, \
}

static const struct ebb_backend cpu_scalar = CPU_PATH(scalar, scalar, scalar, scalar);
#if defined(__x86_64__) || defined(__i386__)
static const struct ebb_backend cpu_avx2 = CPU_PATH(avx2, avx2, avx2, avx2);
static const struct ebb_backend cpu_avx512 = CPU_PATH(avx512, avx512, avx512, avx2);
static const struct ebb_backend cpu_amx = CPU_PATH(amx, amx, avx512, avx2);
#endif

/* ----------------------------------------------------------------- choice */

#if defined(__x86_64__) || defined(__i386__)
static int avx512_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
}

/* AMX's tile data is too large for the signal frame a process gets by
 * default, so Linux (5.16 on) hands it out only on request: arch_prctl
 * ARCH_REQ_XCOMP_PERM for XTILEDATA, once, for every thread of the process.
 * The CPU's report alone is not enough: a kernel that refuses (or predates
 * the request) kills the first tile instruction with SIGILL. cpuid leaf 7's
 * EDX bits 24 (tile) and 25 (int8) are read directly: not every compiler's
 * __builtin_cpu_supports knows "amx-int8". */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int amx_granted;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_ask(void)
{
    unsigned int eax, ebx, ecx, edx;
    const unsigned int tile_int8 = (1u << 24) | (1u << 25);
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || (edx & tile_int8) != tile_int8 || !avx512_usable())
        return;
    amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

int ebb_cpu_amx_usable(void)
{
#if defined(__x86_64__) || defined(__i386__)
    pthread_once(&amx_once, amx_ask);
    return amx_granted;
#else
    return 0;
#endif
}

static int can_run(const char *name)
{
    if (strcmp(name, "scalar") == 0) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx512") == 0) return avx512_usable();
    if (strcmp(name, "amx") == 0) return ebb_cpu_amx_usable();
#endif
    return 0;
}

static const struct ebb_backend *path_by_name(const char *name)
{
    if (strcmp(name, "scalar") == 0) return &cpu_scalar;
#if defined(__x86_64__) || defined(__i386__)
    if (strcmp(name, "avx2") == 0) return &cpu_avx2;
    if (strcmp(name, "avx512") == 0) return &cpu_avx512;
    if (strcmp(name, "amx") == 0) return &cpu_amx;
#endif
    return NULL;
}

const struct ebb_backend *ebb_backend_cpu_named(const char *name)
{
    if (!name || !can_run(name)) return NULL;
    return path_by_name(name);
}

static const struct ebb_backend *chosen;
static pthread_once_t choose_once = PTHREAD_ONCE_INIT;

static void choose(void)
{
    const char *forced = getenv("EBB_CPU_PATH");
    if (forced && *forced) {
        chosen = ebb_backend_cpu_named(forced);
        if (chosen) return;
        fprintf(stderr, "ebb: EBB_CPU_PATH=%s is not available on this CPU; choosing automatically\n",
                forced);
    }
    static const char *const best_first[] = { "amx", "avx512", "avx2", "scalar" };
    for (size_t i = 0; i < sizeof best_first / sizeof *best_first; i++)
        if ((chosen = ebb_backend_cpu_named(best_first[i])) != NULL) return;
}

const struct ebb_backend *ebb_backend_cpu(void)
{
    pthread_once(&choose_once, choose);
    return chosen;
}
