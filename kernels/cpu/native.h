/* Private to kernels/cpu: the native GGUF types' products (issue 10), and
 * ebb's W2G64, which pairs with the same activations.
 *
 * A GGUF matrix in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or a K-quant is multiplied
 * as the file stores it, against activations quantized per token to 8 bits
 * in the form each type pairs with:
 *   Q8B32  blocks of 32: f32 scale d = amax / 127 (0 for an all-zero block),
 *          codes roundf(x * 127 / amax) (ops.h's act_inverse rule), and the
 *          block's code sum; read by Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0. A
 *          source-exact W4A4 file (docs/formats.md) quantizes its ordinary
 *          blocks with qmax 7 instead of 127: the same form, 4-bit codes;
 *   Q8K    super-blocks of 256: the same scale rule per 256 values, and the
 *          code sum of every 16; read by Q2_K .. Q6_K (n a multiple of 256).
 *
 * The dot of one weight row with one token, acc = 0 and then per block in
 * order (d_w, m_w, dmin_w the block's f16 fields decoded exactly, d_a the
 * activation scale of the block or super-block, a*b rounded to float):
 *   Q4_0, Q5_0, Q8_0   acc = fmaf(isum, d_w * d_a, acc),
 *                      isum = sum (code - offset) * a_code (offset 8, 16, 0)
 *   Q4_1, Q5_1         acc = fmaf(isum, d_w * d_a, acc); acc = fmaf(asum, m_w * d_a, acc)
 *                      isum = sum code * a_code, asum the block's activation code sum
 *   W2G64 (ebb's)      the same two steps for each activation block of 32,
 *                      two per 64-value weight block, its (d_w, m_w) in both
 *   Q4_K, Q5_K, Q2_K   acc = fmaf(sumi, d_w * d_a, acc); acc = fmaf(-summ, dmin_w * d_a, acc)
 *                      sumi = sum over sub-blocks j of scale_j * isum_j,
 *                      summ = sum over sub-blocks of min_j * (their activation code sums)
 *   Q3_K, Q6_K         acc = fmaf(sumi, d_w * d_a, acc), sumi with signed scales
 *                      and codes (Q3_K: code - 4 where the high mask bit is clear;
 *                      Q6_K: code - 32)
 * isum, sumi, summ are exact 32-bit integers, so every path that repeats
 * these float steps gives the scalar path's bits.
 */
#ifndef EBB_KERNELS_CPU_NATIVE_H
#define EBB_KERNELS_CPU_NATIVE_H
#include <stddef.h>
#include <stdint.h>

#include "kernels/formats.h"

#define EBB_NATIVE_QK 32      /* block of the legacy types and of Q8B32 */
#define EBB_NATIVE_QK_K 256   /* super-block of the K-quants and of Q8K */

/* One token's quantized activations: n codes, a scale per block (32 or 256)
 * and code sums (per 32 for Q8B32, per 16 for Q8K). */
struct ebb_native_act {
    const int8_t *q;
    const float *d;
    const int16_t *sums;
};

/* A rectangle of a native matmul: out[t * n_out + o] = dot(row o, token t)
 * for tokens [t0, t1) and rows [o0, o1). Token t's activations are q + t *
 * n_in, d + t * (n_in / block) and sums + t * (n_in / per_sum) with block 32
 * and per_sum 32 (Q8B32) or block 256 and per_sum 16 (Q8K). Row o is at w +
 * o * row_bytes. Every output is computed whole by one call (never split
 * over the input), so results do not depend on the rectangle. */
struct ebb_native_matmul_args {
    float *out;
    const int8_t *q;
    const float *d;
    const int16_t *sums;
    const uint8_t *w;
    size_t row_bytes;
    int n_tok, n_in, n_out;
};
typedef void (*ebb_native_block_fn)(const struct ebb_native_matmul_args *a, int t0, int t1, int o0, int o1);

/* The rectangle of each type (rows times tokens of the dots below), per path:
 * scalar (native_scalar.c), avx2, avx512 and amx (native_x86.h), all
 * bit-identical. */
#define EBB_NATIVE_BLOCK(type, isa) \
    void ebb_native_block_##type##_##isa(const struct ebb_native_matmul_args *a, int t0, int t1, int o0, int o1);
#define EBB_NATIVE_BLOCK_scalar(type, TYPE) EBB_NATIVE_BLOCK(type, scalar)
#define EBB_NATIVE_BLOCK_avx2(type, TYPE) EBB_NATIVE_BLOCK(type, avx2)
#define EBB_NATIVE_BLOCK_avx512(type, TYPE) EBB_NATIVE_BLOCK(type, avx512)
#define EBB_NATIVE_BLOCK_amx(type, TYPE) EBB_NATIVE_BLOCK(type, amx)
#define EBB_NATIVE_BLOCKS(isa) EBB_NATIVE_PRODUCT_TYPES(EBB_NATIVE_BLOCK_##isa)
EBB_NATIVE_BLOCKS(scalar)
EBB_NATIVE_BLOCKS(avx2)
EBB_NATIVE_BLOCKS(avx512)
EBB_NATIVE_BLOCKS(amx)

/* Whether this processor and its kernel let the AMX rectangles run (AMX-INT8
 * and AVX-512 reported, the tile state granted to the process); asks once. */
int ebb_cpu_amx_usable(void);

/* n values (a multiple of the block) to codes, block scales and code sums;
 * Q8B32's blocks [0, n_hi) with qmax 127, the rest with qmax 7. */
#define EBB_NATIVE_QUANTIZERS(isa) \
    void ebb_native_quantize_q8b32_##isa(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums); \
    void ebb_native_quantize_q8k_##isa(const float *x, int n, int8_t *q, float *d, int16_t *sums);
EBB_NATIVE_QUANTIZERS(scalar)
EBB_NATIVE_QUANTIZERS(avx2)
EBB_NATIVE_QUANTIZERS(avx512)

typedef float (*ebb_native_dot_fn)(const uint8_t *w_row, const struct ebb_native_act *a, int n);
float ebb_native_dot_q4_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q4_1_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q5_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q5_1_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q8_0_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q2_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q3_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q4_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q5_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_q6_k_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
float ebb_native_dot_w2g64_scalar(const uint8_t *w, const struct ebb_native_act *a, int n);
#endif
