/* Tensor storage formats, described once.
 *
 * Every element type ebb can read or write is listed here with its block
 * geometry: a block holds `block_elems` values in `block_bytes` bytes. The type
 * numbers are GGUF's (ggml_type), because ebb's own packed files are GGUF too.
 * Validation (storage/gguf.c) uses the geometry to check tensor sizes before
 * any byte is read; the engine uses the row dequantizers to turn stored
 * weights into f32. Nothing else in the tree should know a block layout.
 */
#ifndef EBB_KERNELS_FORMATS_H
#define EBB_KERNELS_FORMATS_H
#include <stddef.h>
#include <stdint.h>

/* The CUDA sources (C++) read this header and kernels/backend.h too. */
#ifdef __cplusplus
#define EBB_STATIC_ASSERT(cond, why) static_assert(cond, why)
extern "C" {
#else
#define EBB_STATIC_ASSERT(cond, why) _Static_assert(cond, why)
#endif

enum ebb_type {
    EBB_TYPE_F32 = 0,
    EBB_TYPE_F16 = 1,
    EBB_TYPE_Q4_0 = 2,
    EBB_TYPE_Q4_1 = 3,
    EBB_TYPE_Q5_0 = 6,
    EBB_TYPE_Q5_1 = 7,
    EBB_TYPE_Q8_0 = 8,
    EBB_TYPE_Q2_K = 10,
    EBB_TYPE_Q3_K = 11,
    EBB_TYPE_Q4_K = 12,
    EBB_TYPE_Q5_K = 13,
    EBB_TYPE_Q6_K = 14,
    EBB_TYPE_I8 = 24,
    EBB_TYPE_I16 = 25,
    EBB_TYPE_I32 = 26,
    EBB_TYPE_F64 = 28,
    EBB_TYPE_BF16 = 30,
    /* ebb's own types, numbered from 64 so they never collide with ggml's
     * (ordinary GGUF tools list these tensors but cannot decode them). */
    EBB_TYPE_W4G64 = 64,      /* see "W4G64" below */
    EBB_TYPE_W2G64 = 65,      /* see "W2G64" below */
    EBB_TYPE_COUNT_ = 72      /* upper bound for table sizes, not a type */
};

/* W4G64: 4-bit symmetric weights in groups of 64 along the input dimension
 * (the W of W4A4/W4A8). One block per group, 34 bytes, 4.25 bits per weight:
 *     f16  d        scale
 *     u8   qs[32]   value i (0..31) in the low nibble of qs[i],
 *                   value 32+i in the high nibble of qs[i]
 * w = (q - 8) * d with q in [0, 15], so codes span [-8, 7]; round-to-nearest
 * uses d = absmax / 7 (code -8 unused), GPTQ may use all 16 codes.
 * Same nibble order as ggml's Q4_0, twice the group: one group of weights
 * meets one group of activations (below), so a dot product needs one scale
 * per side per 64 values. */
#define EBB_W4G64_GROUP 64
#define EBB_W4G64_BLOCK_BYTES 34
struct ebb_block_w4g64 {
    uint16_t d;
    uint8_t qs[EBB_W4G64_GROUP / 2];
};
EBB_STATIC_ASSERT(sizeof(struct ebb_block_w4g64) == EBB_W4G64_BLOCK_BYTES, "W4G64 block: f16 + 32 bytes");

/* W2G64: 2-bit asymmetric weights in groups of 64 along the input dimension
 * (the base a BitStack stack may sit on, engine/bitstack.h). One block per
 * group, 20 bytes, 2.5 bits per weight:
 *     f16  d        step
 *     f16  m        value of code 0
 *     u8   qs[16]   byte j holds values j, 16 + j, 32 + j, 48 + j, from its
 *                   low bits up (the KV2 rows' packing rule, below)
 * w = d * q + m with q in [0, 3]. Asymmetric because four levels placed
 * symmetrically around zero waste one on a sign the group rarely needs.
 * Its product reads EBB_ACT_Q8B32 activations: a block meets two activation
 * blocks of 32, each with its own scale and code sum (Q4_1's steps, twice). */
#define EBB_W2G64_GROUP 64
#define EBB_W2G64_BLOCK_BYTES 20
struct ebb_block_w2g64 {
    uint16_t d, m;
    uint8_t qs[EBB_W2G64_GROUP / 4];
};
EBB_STATIC_ASSERT(sizeof(struct ebb_block_w2g64) == EBB_W2G64_BLOCK_BYTES, "W2G64 block: 2 f16 + 16 bytes");

/* Q8_0 (ggml's): blocks of 32 values, f16 d then 32 int8 codes; w = d * q.
 * Also 34 bytes, so the integer kernels walk W4G64 and Q8_0 rows alike. */
#define EBB_Q8_0_GROUP 32
#define EBB_Q8_0_BLOCK_BYTES 34
struct ebb_block_q8_0 {
    uint16_t d;
    int8_t qs[EBB_Q8_0_GROUP];
};
EBB_STATIC_ASSERT(sizeof(struct ebb_block_q8_0) == EBB_Q8_0_BLOCK_BYTES, "Q8_0 block: f16 + 32 bytes");

/* Round-to-nearest W4G64 (the baseline GPTQ is measured against, and what
 * tests use): n values (n a multiple of 64) to n/64 blocks at dst. Per group
 * d = absmax / 7 rounded to f16, nudged up by one f16 step when rounding made
 * it too small to reach absmax (so every value lands within d/2 of its code;
 * a group beyond the f16 range, absmax > 7 * 65504, saturates instead);
 * codes round(x / d) with ties away from zero, clamped to [-8, 7]. An all-zero
 * group gets d = 0. Inputs must be finite. */
void ebb_quantize_w4g64_rtn(const float *src, void *dst, size_t n);

/* W2G64 by rounding to nearest within a searched range: n values (n a
 * multiple of 64) to n/64 blocks at dst. Per group, ranges [lo, hi] shrunk
 * from [min, max] in steps of a twentieth at either end (up to a quarter)
 * give codes round((x - lo) / step) clamped to [0, 3]; for each, d and m are
 * the least-squares fit of x to d * q + m, and the pair with the least
 * squared error is kept, rounded to f16, and the codes are chosen again
 * against the rounded pair. At 2 bits clipping the extremes often pays (the
 * plain min-max grid spends two of four levels on the tails). A constant
 * group gets d = 0 and m its value. Inputs must be finite and within f16. */
void ebb_quantize_w2g64(const float *src, void *dst, size_t n);
/* The same with each value's squared error weighted by weight[i] (n
 * weights, non-negative; NULL: all 1) in the fit and the choice of range:
 * a packer that knows which inputs are loud rounds their columns closer. */
void ebb_quantize_w2g64_weighted(const float *src, const float *weight, void *dst, size_t n);
/* One W2G64 block from its f16 step and minimum (bit patterns) and 64 codes
 * in [0, 3]: for a quantizer that chooses codes itself (GPTQ's sweep). */
void ebb_w2g64_block(void *block, uint16_t d_f16, uint16_t m_f16, const int8_t *codes);

/* ggml's Q8_0 quantizer, rule for rule (so ebb's Q8_0 tensors are the bytes
 * llama.cpp would write): blocks of 32, d = absmax / 127 stored as f16,
 * codes roundf(x * (1/d)) computed with the unrounded d. n a multiple of 32. */
void ebb_quantize_q8_0(const float *src, void *dst, size_t n);

/* Quantized activations (never stored in files; made per token at run time):
 * int8 codes, groups of 64 channels, one f32 scale per group, symmetric:
 * a 4-bit group uses codes [-7, 7] (scale = absmax / 7), an 8-bit group
 * [-127, 127] (scale = absmax / 127). Keeping 4-bit codes in int8 lets one
 * integer kernel serve A4 and A8: the saving of A4 is in accuracy terms
 * (COMET's mixed precision), not in bytes moved, which the weights dominate.
 * Which groups are 8-bit is fixed per activation point by calibration: after
 * the point's channel permutation, the first n_hi groups. */
#define EBB_ACT_GROUP 64
EBB_STATIC_ASSERT(EBB_ACT_GROUP == EBB_W4G64_GROUP, "one activation group meets one W4G64 block");
/* The block of EBB_ACT_Q8B32 (below): one block of the legacy GGUF types. A
 * source-exact file's activation points are quantized in these blocks, the
 * first n_hi at 8 bits and the rest at 4, the same way. */
#define EBB_ACT_BLOCK 32
EBB_STATIC_ASSERT(EBB_ACT_BLOCK == EBB_Q8_0_GROUP, "one activation block meets one legacy-type block");

/* The form of the activations a weight type's product reads (ggml's
 * vec_dot_type): the backend's matmul[type] takes them in this form
 * (struct ebb_act in kernels/backend.h). */
enum ebb_act_form {
    EBB_ACT_NONE = 0,         /* ebb cannot multiply this type (yet) */
    EBB_ACT_F32,              /* the f32 activations as they are */
    EBB_ACT_Q8G64,            /* int8 codes, one f32 scale per EBB_ACT_GROUP channels
                                 (quantize_act's output, above) */
    EBB_ACT_Q8B32,            /* 8-bit codes per block of 32 with an f32 scale and the
                                 block's code sum (kernels/cpu/native.h): Q4_0 .. Q5_1, Q8_0 */
    EBB_ACT_Q8K,              /* 8-bit codes per super-block of 256 with an f32 scale and
                                 the code sum of every 16: the K-quants */
};

/* The weight types ebb multiplies, each as X(name, TYPE), name the lower-
 * case spelling op-table entries use (matmul_q4_0, ...): the GGUF types a
 * product reads as the file stores them (kernels/cpu/native.h) with ebb's
 * W2G64, which reads the same activation form; ebb's W4G64 (all of these
 * read integer activations); and f32. A table with an entry per
 * product type expands the list instead of writing it out again. */
#define EBB_NATIVE_PRODUCT_TYPES(X) \
    X(q4_0, EBB_TYPE_Q4_0) X(q4_1, EBB_TYPE_Q4_1) X(q5_0, EBB_TYPE_Q5_0) X(q5_1, EBB_TYPE_Q5_1) \
    X(q8_0, EBB_TYPE_Q8_0) X(q2_k, EBB_TYPE_Q2_K) X(q3_k, EBB_TYPE_Q3_K) X(q4_k, EBB_TYPE_Q4_K) \
    X(q5_k, EBB_TYPE_Q5_K) X(q6_k, EBB_TYPE_Q6_K) X(w2g64, EBB_TYPE_W2G64)
#define EBB_INT_PRODUCT_TYPES(X) X(w4g64, EBB_TYPE_W4G64) EBB_NATIVE_PRODUCT_TYPES(X)
#define EBB_PRODUCT_TYPES(X) X(f32, EBB_TYPE_F32) EBB_INT_PRODUCT_TYPES(X)

struct ebb_type_info {
    const char *name;         /* "Q4_1", as GGUF tools print it */
    uint32_t block_elems;     /* values per block (1 for plain scalars) */
    uint32_t block_bytes;     /* bytes per block */
    /* Converts n values (n a multiple of block_elems) from src to f32; NULL
     * when ebb can store the type but not compute with it. */
    void (*to_f32)(const void *src, float *dst, size_t n);
    enum ebb_act_form act;    /* what its product reads; EBB_ACT_NONE: no product */
};

/* The K-quants' packed sub-block scales, decoded once for the dequantizers
 * and the native products: Q4_K/Q5_K's sub-block j (0..7) scale and min
 * from their 12 bytes, and Q3_K's sixteen scales with the offset removed
 * (-32..31). */
void ebb_k4_scale_min(const uint8_t *scales12, int j, int *scale, int *min);
void ebb_q3_k_scales(const uint8_t *scales12, int out[16]);

/* NULL for a type number ebb does not know. */
const struct ebb_type_info *ebb_type_info(uint32_t type);
/* The ggml name of a GGUF tensor type ebb does not read (IQ4_NL, TQ1_0, ...),
 * so a refusal can name it; NULL for numbers no ggml release has used. */
const char *ebb_foreign_type_name(uint32_t type);

/* Bytes of a row of n values; 0 if n is not a whole number of blocks. */
size_t ebb_row_bytes(uint32_t type, uint64_t n);

/* KV8, KV4 and KV2 rows: how the KV cache (engine/kv.c) stores keys and
 * values at 8, 4 and 2 bits, described here once; the backend's kv_rows_q
 * and kv_rows_qc ops read them.
 * A row of n values is cut into groups of `group` values (64, 32, 16 or 8,
 * dividing n); each group has codes and an f16 pair dm = (d, m), and
 *     value = m + d * code,   code in 0 .. 2^bits - 1
 * (d * code is exact in float: 11 bits times at most 8, so fmaf(d, code, m)
 * gives the same float). The codes of a row's groups are consecutive, group 0
 * first. One packing rule covers every width: a group has B = group * bits / 8
 * code bytes, and value i of the group sits in byte i % B at bit shift
 * bits * (i / B). So at 8 bits one byte per value; at 4 bits value i (< B) in
 * the low nibble of byte i and value B + i in its high nibble (W4G64's order);
 * at 2 bits byte j holds values j, B + j, 2B + j, 3B + j from its low bits up.
 * A SIMD decoder thus gets consecutive values from one shift and mask of
 * consecutive bytes. The pairs are consecutive too, (d, m) of group 0 first,
 * stored apart from the codes (the cache puts a row's pairs after its codes).
 *
 * Per-channel codes (the 2-bit tier's keys, KIVI's layout): a pack of n_rows
 * rows of n values shares one pair per channel (column) i, dm[2i] = d_i and
 * dm[2i + 1] = m_i, chosen over that column's n_rows values, because keys'
 * outliers sit in fixed channels and a per-token group would spend its range
 * on them. Row r's codes are still a row of n codes packed in groups of
 * `group` by the rule above (group only decides the packing), at codes +
 * r * stride; value(r, i) = fmaf(d_i, code(r, i), m_i). */
#define EBB_KVQ_GROUP_MAX 64

/* The KV cache's pages (engine/kv.h; backend.h's struct ebb_kv_pages): a
 * page holds this many positions, and at 8 and 4 bits the first
 * EBB_KV_SINK_TOKENS positions are kept at f32 besides. */
#define EBB_KV_PAGE_TOKENS 64
#define EBB_KV_SINK_TOKENS 4

/* One row of n values (n % group == 0) at 8, 4 or 2 bits: codes (n * bits / 8
 * bytes) and n / group (d, m) pairs. Per group, m is the minimum rounded down
 * to a half and d the step (max - m) / (2^bits - 1) rounded up, so every value
 * comes back within d/2 of itself; values beyond f16's range (+-65504) are
 * clamped first, NaN becomes code 0. And back to f32, by the formula above. */
void ebb_kvq_quantize_row(int bits, const float *x, int n, int group, uint8_t *codes, uint16_t *dm);
void ebb_kvq_dequantize_row(int bits, const uint8_t *codes, const uint16_t *dm, int n, int group, float *out);

/* A pack of n_rows rows of n values (x[r * n + i], n % group == 0) with one
 * (d, m) per channel, the same rule as a row's group applied to each column:
 * n pairs in dm, row r's n * bits / 8 code bytes at codes + r * stride (the
 * bytes between rows are not touched). Bits 8, 4 or 2. And back to f32,
 * out[r * n + i]. */
void ebb_kvq_quantize_channels(int bits, const float *x, int n_rows, int n, int group, uint8_t *codes, size_t stride,
                               uint16_t *dm);
void ebb_kvq_dequantize_channels(int bits, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                                 int group, float *out);

/* The largest finite half, and a float clamped to +-that: what the KV
 * cache's f16 rows and (d, m) pairs do to values beyond f16's range. */
#define EBB_F16_MAX 65504.0f
static inline float ebb_f16_saturate(float v) { return v > EBB_F16_MAX ? EBB_F16_MAX : v < -EBB_F16_MAX ? -EBB_F16_MAX : v; }

/* IEEE half and bfloat16 conversions (portable; used by the scalar paths). */
float ebb_f16_to_f32(uint16_t h);
uint16_t ebb_f32_to_f16(float f);
float ebb_bf16_to_f32(uint16_t h);
#ifdef __cplusplus
}
#endif
#endif
