/* Private to kernels/cpu: what each instruction-set file provides and the
 * shared matmul driver they plug into.
 *
 * Each ISA file (ops_scalar.c, ops_avx2.c, ops_avx512.c) is compiled with its
 * own flags and exports one `struct ebb_backend`. The threading and the split
 * of a matmul into blocks live once, in backend_cpu.c (compiled without ISA
 * flags); the ISA files only supply a block kernel that computes a rectangle
 * of outputs single-threaded.
 */
#ifndef EBB_KERNELS_CPU_OPS_H
#define EBB_KERNELS_CPU_OPS_H
#include "kernels/backend.h"

/* A rectangle of a matmul: tokens [t0, t1) x output rows [o0, o1), over the
 * whole input dimension. out, x and w are the full matrices of the op. */
struct matmul_args {
    float *out;
    const float *x;
    const float *w;
    int n_tok, n_in, n_out;
};
typedef void (*matmul_block_fn)(const struct matmul_args *a, int t0, int t1, int o0, int o1);

/* Splits a matmul over the pool and calls block() on each piece.
 * row_align: output rows per piece are a multiple of this (the kernel's
 * register tile height), except at the end. */
void ebb_cpu_matmul_drive(struct ebb_pool *pool, matmul_block_fn block, int row_align,
                          float *out, const float *x, const float *w,
                          int n_tok, int n_in, int n_out);

extern const struct ebb_backend ebb_cpu_scalar;
extern const struct ebb_backend ebb_cpu_avx2;
extern const struct ebb_backend ebb_cpu_avx512;
#endif
