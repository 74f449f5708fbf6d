/* CPU backend selection and the shared matmul driver.
 *
 * Selection: the instruction-set paths are separate translation units built
 * with their own flags; this file (built for baseline x86-64) asks cpuid once
 * which of them the processor and OS can run (__builtin_cpu_supports also
 * checks that the OS saves the wide registers) and hands out the best. The
 * choice can be forced for benchmarks and debugging with EBB_CPU_PATH=scalar
 * or avx2 (ignored, with a message, if this machine cannot run it).
 *
 * Driver: a matmul is cut into rectangles of (tokens x output rows) that the
 * pool's threads claim one by one. Rows are cut first, in contiguous chunks
 * (each thread then streams its own part of the weights, which is what bounds
 * decode); tokens are cut as well only when there are too few rows to give
 * every thread several pieces. About four pieces per thread keep the threads
 * balanced when another process takes a core for a while; tiny ops stay on
 * the calling thread, where waking workers would cost more than it saves.
 */
#include "kernels/cpu/ops.h"
#include "kernels/cpu/kvq_ops.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

void ebb_cpu_matmul_drive(struct ebb_pool *pool, matmul_block_fn block, int row_align,
                          float *out, const float *x, const float *w,
                          int n_tok, int n_in, int n_out)
{
    if (n_tok <= 0 || n_out <= 0) return;
    if (n_in <= 0) {                          /* empty sums */
        memset(out, 0, (size_t)n_tok * (size_t)n_out * sizeof *out);
        return;
    }
    struct drive_job j = { .args = { out, x, w, n_tok, n_in, n_out }, .block = block };
    int threads = ebb_pool_threads(pool);
    double flops = 2.0 * n_tok * n_in * (double)n_out;
    if (threads == 1 || flops < MIN_PARALLEL_FLOPS) {
        block(&j.args, 0, n_tok, 0, n_out);
        return;
    }
    j.split = plan_split(threads, n_tok, n_out, row_align, 3);
    ebb_pool_run(pool, drive_piece, &j, j.split.row_pieces * j.split.tok_pieces);
}

/* The quantized sibling: same split, integer operands. Every output is
 * computed whole by one block call (or, across input chunks, by one thread),
 * so the split changes nothing in the result: batch invariance is the
 * kernels' business and holds by construction (see ops.h). */
struct qdrive_job {
    const struct qmatmul_args *args;
    qmatmul_block_fn block;
    struct split split;
};

static void qdrive_piece(void *vp, int i, int n)
{
    (void)n;
    const struct qdrive_job *j = vp;
    int t0, t1, o0, o1;
    if (piece_bounds(&j->split, i, j->args->n_tok, j->args->n_out, &t0, &t1, &o0, &o1))
        j->block(j->args, t0, t1, o0, o1);
}

void ebb_cpu_qmatmul_drive(struct ebb_pool *pool, qmatmul_block_fn block, int row_align, int tok_align,
                           const struct qmatmul_args *a)
{
    if (a->n_tok <= 0 || a->n_out <= 0) return;
    if (a->n_in <= 0) {
        memset(a->out, 0, (size_t)a->n_tok * (size_t)a->n_out * sizeof *a->out);
        return;
    }
    int threads = ebb_pool_threads(pool);
    double flops = 2.0 * a->n_tok * a->n_in * (double)a->n_out;
    if (threads == 1 || flops < MIN_PARALLEL_FLOPS) {
        block(a, 0, a->n_tok, 0, a->n_out);
        return;
    }
    struct qdrive_job j = { .args = a, .block = block };
    j.split = plan_split(threads, a->n_tok, a->n_out, row_align, tok_align);
    ebb_pool_run(pool, qdrive_piece, &j, j.split.row_pieces * j.split.tok_pieces);
}

/* ----------------------------------------------------------------- choice */

static int can_run(const char *name)
{
    if (strcmp(name, "scalar") == 0) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

/* Each ISA table plus the attention and KV-row ops of kvq_ops_*.c (AVX-512 uses the
 * AVX2 ones), filled once. */
static struct ebb_backend tables[3];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void fill_tables(void)
{
    tables[0] = ebb_cpu_scalar;
    ebb_cpu_kvq_ops_scalar(&tables[0]);
#if defined(__x86_64__) || defined(__i386__)
    tables[1] = ebb_cpu_avx2;
    ebb_cpu_kvq_ops_avx2(&tables[1]);
    tables[2] = ebb_cpu_avx512;
    ebb_cpu_kvq_ops_avx2(&tables[2]);
#endif
}

static const struct ebb_backend *path_by_name(const char *name)
{
    pthread_once(&tables_once, fill_tables);
    if (strcmp(name, "scalar") == 0) return &tables[0];
#if defined(__x86_64__) || defined(__i386__)
    if (strcmp(name, "avx2") == 0) return &tables[1];
    if (strcmp(name, "avx512") == 0) return &tables[2];
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
    static const char *const best_first[] = { "avx512", "avx2", "scalar" };
    for (size_t i = 0; i < sizeof best_first / sizeof *best_first; i++)
        if ((chosen = ebb_backend_cpu_named(best_first[i])) != NULL) return;
}

const struct ebb_backend *ebb_backend_cpu(void)
{
    pthread_once(&choose_once, choose);
    return chosen;
}
