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

#include <stddef.h>
#include <stdint.h>

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

/* The quantized matmuls (matmul_w4a8, matmul_q8a8) go through the same
 * splitter; their operands are int8 activation codes with one f32 scale per
 * 64 channels (kernels/formats.h) and rows of 34-byte weight blocks (W4G64:
 * 64 inputs per block, Q8_0: 32). tok_align: tokens per piece are a multiple
 * of this (the kernel's token tile), except at the end. */
struct qmatmul_args {
    float *out;
    const int8_t *q;          /* n_tok x n_in codes */
    const float *s;           /* n_tok x n_in/64 scales */
    const uint8_t *w;         /* n_out rows of row_bytes */
    size_t row_bytes;
    int n_tok, n_in, n_out;
};
typedef void (*qmatmul_block_fn)(const struct qmatmul_args *a, int t0, int t1, int o0, int o1);
void ebb_cpu_qmatmul_drive(struct ebb_pool *pool, qmatmul_block_fn block, int row_align, int tok_align,
                           const struct qmatmul_args *args);

/* The float arithmetic every path of the quantized ops repeats exactly, so
 * that all paths agree bit for bit (integer sums are exact; what remains is
 * spelled out once here).
 *
 * Activation group scale: scale = absmax / qmax (qmax 7 or 127), and the
 * codes are round(x * inv) with inv from act_inverse(): qmax / absmax, or 0
 * when the scale is 0 (an all-zero group, or one so small that its scale
 * underflows: codes 0), capped at FLT_MAX where qmax / absmax overflows
 * (absmax below about 4e-37: codes then fall short of qmax, harmless at
 * scales that small). x * inv is one rounded product; round() is half away
 * from zero (C's roundf). Inputs must be finite.
 *
 * Matmul output: acc = 0, then for each weight block b in order
 *     acc = fmaf((float)isum_b, d_b * s_g, acc)
 * with isum_b the exact integer dot product of the block, d_b its f16 scale
 * decoded exactly, s_g the activation scale of the group holding it, and d_b
 * * s_g rounded to float. Fused multiply-add: the SIMD paths use the FMA
 * instruction, the scalar path fmaf(). */
static inline float act_inverse(float amax, float qmax, float *scale)
{
    *scale = amax / qmax;
    if (*scale == 0) return 0;
    float inv = qmax / amax;
    return inv < 3.40282347e38f ? inv : 3.40282347e38f;
}

/* Quantized ops of each path (quant_scalar.c, quant_avx2.c, quant_avx512.c). */
#define EBB_CPU_QUANT_OPS(isa) \
    void ebb_cpu_quantize_act_##isa(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s); \
    void ebb_cpu_matmul_w4a8_##isa(struct ebb_pool *pool, float *out, const int8_t *q, const float *s, \
                                   const void *w, int n_tok, int n_in, int n_out); \
    void ebb_cpu_matmul_q8a8_##isa(struct ebb_pool *pool, float *out, const int8_t *q, const float *s, \
                                   const void *w, int n_tok, int n_in, int n_out); \
    void ebb_cpu_hadamard64_##isa(float *x, int n);
EBB_CPU_QUANT_OPS(scalar)
EBB_CPU_QUANT_OPS(avx2)
EBB_CPU_QUANT_OPS(avx512)

extern const struct ebb_backend ebb_cpu_scalar;
extern const struct ebb_backend ebb_cpu_avx2;
extern const struct ebb_backend ebb_cpu_avx512;
#endif
