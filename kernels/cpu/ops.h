/* Private to kernels/cpu: the ops each instruction-set file provides, the
 * shared matmul driver they plug into, and the float steps every path of the
 * quantized ops repeats.
 *
 * Each ISA file is compiled with its own flags and exports its ops as
 * ebb_cpu_<op>_<isa>; backend_cpu.c (compiled without ISA flags) puts them in
 * one const table per path. The threading and the split of a matmul into
 * blocks live once, in backend_cpu.c; the ISA files only supply a block
 * kernel that computes a rectangle of outputs single-threaded.
 */
#ifndef EBB_KERNELS_CPU_OPS_H
#define EBB_KERNELS_CPU_OPS_H
#include "kernels/backend.h"
#include "kernels/formats.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* A matmul as its block kernels see it: the activations, n_out weight rows of
 * row_bytes each (the weight type's row of n_in values), the output. */
struct matmul_args {
    float *out;
    struct ebb_act x;
    const uint8_t *w;
    size_t row_bytes;
    int n_tok, n_in, n_out;
};

static inline const uint8_t *weight_row(const struct matmul_args *a, int o)
{
    return a->w + (size_t)o * a->row_bytes;
}

/* Computes tokens [t0, t1) x output rows [o0, o1) over the whole input
 * dimension, single-threaded. */
typedef void (*matmul_block_fn)(const struct matmul_args *a, int t0, int t1, int o0, int o1);

/* Splits a matmul of weight type `type` over the pool and calls block() on
 * each piece. row_align: output rows per piece are a multiple of this (the
 * kernel's register tile height), except at the end; tok_align likewise for
 * tokens (the kernel's token tile). Every output is computed whole by one
 * block call, so the split changes nothing in the result: batch invariance
 * is the kernels' business. */
void ebb_cpu_matmul_drive(struct ebb_pool *pool, enum ebb_type type, matmul_block_fn block, int row_align,
                          int tok_align, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in,
                          int n_out);

/* Defines the table entry `name` (an ebb_matmul_fn) as the driver over block. */
#define EBB_CPU_MATMUL(name, type, block, row_align, tok_align) \
    void name(struct ebb_pool *pool, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in, \
              int n_out) \
    { ebb_cpu_matmul_drive(pool, type, block, row_align, tok_align, out, x, w, n_tok, n_in, n_out); }

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

/* quantize_act's walk, the same on every path: each token's groups of
 * EBB_ACT_GROUP, the first n_hi (clamped to [0, groups]) at 8 bits, through
 * the path's group quantizer (inlined where the caller is). */
typedef void (*act_group_fn)(const float *x, float qmax, int8_t *q, float *s);
static inline __attribute__((always_inline)) void act_each_group(const float *x, int n_tok, int n, int n_hi,
                                                                 int8_t *q, float *s, act_group_fn group)
{
    int groups = n / EBB_ACT_GROUP;
    if (n_hi < 0) n_hi = 0;
    if (n_hi > groups) n_hi = groups;
    for (int t = 0; t < n_tok; t++)
        for (int g = 0; g < groups; g++) {
            size_t at = (size_t)t * n + (size_t)g * EBB_ACT_GROUP;
            group(x + at, g < n_hi ? 127.0f : 7.0f, q + at, s + (size_t)t * groups + g);
        }
}

/* The ops every path has in its own version: the f32 product and vector ops
 * (ops_<isa>.c, matmul_x86.h). */
#define EBB_CPU_OWN_OPS(isa) \
    void ebb_cpu_matmul_f32_##isa(struct ebb_pool *, float *, const struct ebb_act *, const void *, int, int, int); \
    void ebb_cpu_rmsnorm_##isa(float *out, const float *x, const float *g, int n, float eps); \
    void ebb_cpu_softmax_##isa(float *x, int n); \
    void ebb_cpu_swiglu_##isa(float *gate, const float *up, int n); \
    void ebb_cpu_add_##isa(float *y, const float *x, int n);
EBB_CPU_OWN_OPS(scalar)
EBB_CPU_OWN_OPS(avx2)
EBB_CPU_OWN_OPS(avx512)
/* W4G64's product per path: scalar and AVX2 in quant_<isa>.c; AVX-512 and
 * AMX in native_x86.h, whose 16-row tiles hand the rows left over (and, on
 * AVX-512, one token) to quant_x86.h's rectangle, exported for it. */
#define EBB_CPU_W4G64_PRODUCT(isa) \
    void ebb_cpu_matmul_w4g64_##isa(struct ebb_pool *, float *, const struct ebb_act *, const void *, int, int, int);
EBB_CPU_W4G64_PRODUCT(scalar)
EBB_CPU_W4G64_PRODUCT(avx2)
EBB_CPU_W4G64_PRODUCT(avx512)
EBB_CPU_W4G64_PRODUCT(amx)
void ebb_cpu_block_w4g64_avx2(const struct matmul_args *a, int t0, int t1, int o0, int o1);
void ebb_cpu_block_w4g64_avx512(const struct matmul_args *a, int t0, int t1, int o0, int o1);

/* The native GGUF types' table entries of each path (native_table.c, over
 * the rectangles of native_<isa>.c). */
#define EBB_CPU_NATIVE_OP(name, isa) \
    void ebb_cpu_matmul_##name##_##isa(struct ebb_pool *, float *, const struct ebb_act *, const void *, int, int, int);
#define EBB_CPU_NATIVE_OP_scalar(name, TYPE) EBB_CPU_NATIVE_OP(name, scalar)
#define EBB_CPU_NATIVE_OP_avx2(name, TYPE) EBB_CPU_NATIVE_OP(name, avx2)
#define EBB_CPU_NATIVE_OP_avx512(name, TYPE) EBB_CPU_NATIVE_OP(name, avx512)
#define EBB_CPU_NATIVE_OP_amx(name, TYPE) EBB_CPU_NATIVE_OP(name, amx)
#define EBB_CPU_NATIVE_OPS(isa) EBB_NATIVE_PRODUCT_TYPES(EBB_CPU_NATIVE_OP_##isa)
EBB_CPU_NATIVE_OPS(scalar)
EBB_CPU_NATIVE_OPS(avx2)
EBB_CPU_NATIVE_OPS(avx512)
EBB_CPU_NATIVE_OPS(amx)

/* The ops AVX-512 takes from AVX2 (backend_cpu.c says why): activation
 * quantization and the Hadamard (quant_<isa>.c), attention and KV rows
 * (kvq_ops_<isa>.c), BitStack's activation codes (bitstack_<isa>.c). */
#define EBB_CPU_SHARED_OPS(isa) \
    void ebb_cpu_quantize_act_##isa(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s); \
    void ebb_cpu_hadamard64_##isa(float *x, int n); \
    void ebb_cpu_attn_scores_##isa(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, \
                                   const float *k, size_t k_stride, int n_rows, int n); \
    void ebb_cpu_attn_values_##isa(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n); \
    void ebb_cpu_kv_rows_f16_##isa(float *out, const uint16_t *rows, size_t stride, int n_rows, int n); \
    void ebb_cpu_kv_rows_q_##isa(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, \
                                 int n_rows, int n, int bits, int group); \
    void ebb_cpu_kv_rows_qc_##isa(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, \
                                  int n_rows, int n, int bits, int group); \
    void ebb_cpu_bitstack_codes_##isa(const float *x, const float *v, int n, int8_t *q, float *scale); \
    void ebb_cpu_bitstack_scale_add_##isa(float *out, size_t out_stride, const int32_t *isum, int n_rows, \
                                          int n_tok, int rank, const float *u, const float *ts);
EBB_CPU_SHARED_OPS(scalar)
EBB_CPU_SHARED_OPS(avx2)

/* BitStack's scaling of its sign sums (backend.h's bitstack_scale_add),
 * the same C on every path: each ISA file instantiates it with its own
 * flags, so fmaf is the FMA instruction where there is one (and libm's
 * correctly rounded fmaf on the scalar path: the same bits). */
static inline __attribute__((always_inline)) void bitstack_scale_add_body(float *out, size_t out_stride,
                                                                         const int32_t *isum, int n_rows, int n_tok,
                                                                         int rank, const float *u, const float *ts)
{
    const size_t per_row = (size_t)n_tok * rank;
    for (int o = 0; o < n_rows; o++)
        for (int t = 0; t < n_tok; t++) {
            const int32_t *is = isum + (size_t)o * per_row + (size_t)t * rank;
            float acc = 0;
            for (int q = 0; q < rank; q++) acc = fmaf((float)is[q], u[(size_t)o * rank + q] * ts[(size_t)t * rank + q], acc);
            out[(size_t)t * out_stride + o] += acc;
        }
}

/* The steps between the products, one version for every path (steps.c). */
void ebb_cpu_get_rows(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n);
void ebb_cpu_permute(float *out, const float *x, const int32_t *perm, int n_tok, int n);
void ebb_cpu_rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                  const float *cos, const float *sin);
void ebb_cpu_scale(float *out, const float *x, float s, int n);
void ebb_cpu_quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums);
void ebb_cpu_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate);

/* BitStack's sign products (bitstack_<isa>.c). */
#define EBB_CPU_BITSTACK_OPS(isa) \
    void ebb_cpu_bitstack_isums_##isa(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, \
                                      int n);
EBB_CPU_BITSTACK_OPS(scalar)
EBB_CPU_BITSTACK_OPS(avx2)
EBB_CPU_BITSTACK_OPS(avx512)
#endif
