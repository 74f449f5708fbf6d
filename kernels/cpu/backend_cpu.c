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

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PIECES_PER_THREAD 4
#define MIN_ROWS_PER_PIECE 16
#define MIN_TOKENS_PER_PIECE 24
#define MIN_PARALLEL_FLOPS (1 << 17)  /* below this the op runs on the caller */

struct drive_job {
    struct matmul_args args;
    matmul_block_fn block;
    int row_pieces, rows_per_piece;
    int tokens_per_piece;
};

static void drive_piece(void *vp, int i, int n)
{
    (void)n;
    const struct drive_job *j = vp;
    int ri = i % j->row_pieces, ti = i / j->row_pieces;
    int o0 = ri * j->rows_per_piece, o1 = o0 + j->rows_per_piece;
    int t0 = ti * j->tokens_per_piece, t1 = t0 + j->tokens_per_piece;
    if (o1 > j->args.n_out) o1 = j->args.n_out;
    if (t1 > j->args.n_tok) t1 = j->args.n_tok;
    if (o0 < o1 && t0 < t1) j->block(&j->args, t0, t1, o0, o1);
}

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

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
    int target = threads * PIECES_PER_THREAD;
    int max_row_pieces = ceil_div(n_out, MIN_ROWS_PER_PIECE);
    int row_pieces = target < max_row_pieces ? target : max_row_pieces;
    int rows = ceil_div(ceil_div(n_out, row_pieces), row_align) * row_align;
    row_pieces = ceil_div(n_out, rows);

    int tok_pieces = 1;
    if (row_pieces < target) {
        int max_tok_pieces = ceil_div(n_tok, MIN_TOKENS_PER_PIECE);
        tok_pieces = ceil_div(target, row_pieces);
        if (tok_pieces > max_tok_pieces) tok_pieces = max_tok_pieces;
    }
    int toks = ceil_div(n_tok, tok_pieces);
    if (toks > 3) toks = ceil_div(toks, 3) * 3;  /* whole register tiles of tokens */
    tok_pieces = ceil_div(n_tok, toks);

    j.row_pieces = row_pieces;
    j.rows_per_piece = rows;
    j.tokens_per_piece = toks;
    ebb_pool_run(pool, drive_piece, &j, row_pieces * tok_pieces);
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

static const struct ebb_backend *path_by_name(const char *name)
{
    if (strcmp(name, "scalar") == 0) return &ebb_cpu_scalar;
#if defined(__x86_64__) || defined(__i386__)
    if (strcmp(name, "avx2") == 0) return &ebb_cpu_avx2;
    if (strcmp(name, "avx512") == 0) return &ebb_cpu_avx512;
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
