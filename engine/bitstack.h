/* BitStack weights at run time: each layer matrix as a stack of residual
 * blocks, of which a prefix of the file's global order is resident.
 *
 * A block is one level of one matrix W [rows][cols] (outputs by inputs):
 *
 *     W_k = sign_k .* (u_k v_k^T)      signs: 1 bit a weight; u, v: rank r, f16
 *
 * and the matrix a model computes with, at depth d, is
 *
 *     W = (W_1 + ... + W_d) diag(1 / s)
 *
 * where s is the activation-aware scale of its input channels (the packer
 * decomposed W diag(s); tools/pack/bitstack.c says why).
 *
 * A stack may sit on a base: every matrix also has a W2G64 copy Q (2-bit,
 * kernels/formats.h), always resident, and the blocks were peeled off the
 * scaled residual (W - Q) diag(s), so that the model computes with
 *
 *     W = Q + (W_1 + ... + W_d) diag(1 / s).
 *
 * Measured on the default model (docs/benchmarks.md), a level on a 2-bit
 * base takes away far more error than a level of a plain stack: the base
 * costs 2.5 bits a weight and the stack's first levels, which on this model's
 * narrow matrices (ranks 2-3) buy little, are not needed. The file orders
 * every block of every matrix in one stack, level by level (no matrix gets
 * its k+1-th block before every matrix has its k-th), the more important
 * first within a level; a memory budget keeps the longest prefix that fits,
 * so quality follows the budget megabyte by megabyte.
 *
 * The packer may also record the perplexity it measured at a few prefix
 * sizes (checkpoints, on the held-out text it names, or on calibration
 * windows when it had none), so that the runtime can say
 * what quality a budget buys without measuring: bitstack_ppl_at
 * interpolates them.
 *
 * Two ways to compute with the prefix (bitstack_fit), as the model's
 * weights setting says:
 *   native (the default): the blocks are used in place from the file
 *     mapping by the backend's sign products (bitstack_linear): per token
 *     and level, t_j = v_j .* (x / s) quantized to int8 with one scale per
 *     rank, then every row's sign-masked sums of t_j (integers, a tile of
 *     rows against a block of tokens at once) weighted by u (backend.h's
 *     exact contracts). Nothing is copied, so resident weights are the
 *     prefix's bytes; blocks beyond it are handed back to the kernel
 *     (madvise) when the prefix shrinks and read again from the file when
 *     it grows.
 *   f32: each matrix's prefix rebuilt as a dense f32 copy, the reference
 *     the sign product is measured against.
 * The file layout is docs/formats.md's "bitstack".
 */
#ifndef EBB_ENGINE_BITSTACK_H
#define EBB_ENGINE_BITSTACK_H
#include <stddef.h>
#include <stdint.h>

struct model;

/* Blocks per matrix a file may have. */
#define BITSTACK_MAX_LEVELS 64
/* Longest ebb.bitstack.checkpoint_text, in bytes (docs/formats.md). */
#define BITSTACK_CHECKPOINT_TEXT_MAX 255

/* One block as the file holds it (views into the mapping, or the packer's
 * buffers). */
struct bitstack_block {
    int rows, cols, rank;
    const uint8_t *signs;   /* rows * cols bits, row-major; bit k of byte k/8 set: negative */
    const uint16_t *u;      /* f16 [rows][rank] */
    const uint16_t *v;      /* f16 [cols][rank] */
};

/* The seven matrices of a layer, in the order the stack numbers them:
 * matrix index = layer * BITSTACK_KINDS + kind. */
enum bitstack_kind { BS_Q, BS_K, BS_V, BS_O, BS_GATE, BS_UP, BS_DOWN, BITSTACK_KINDS };
/* Its tensor name stem ("attn_q", ...) and the activation point feeding it. */
const char *bitstack_kind_name(enum bitstack_kind k);
int bitstack_kind_point(enum bitstack_kind k);
struct layer_weights;
struct model_config;
struct matrix;
/* The layer matrix a kind is, and its shape (rows = outputs, cols = inputs). */
struct matrix *bitstack_kind_matrix(struct layer_weights *w, enum bitstack_kind k);
void bitstack_kind_shape(const struct model_config *c, enum bitstack_kind k, int *rows, int *cols);

/* Bytes of one block in the file: the packed signs and both factors. A
 * matrix's blocks lie one after another, each whole (signs, then u, then v),
 * so that the levels a shrink gives up are one run of bytes and go back to
 * the kernel with their factors: with each kind in its own tensor, a level's
 * factors (1-13 KiB here) shared pages with the levels kept, and a tenth of
 * the stack stayed resident whatever the budget. */
size_t bitstack_block_bytes(int rows, int cols, int rank);
/* w[rows][cols] += the block (the dense reference). */
void bitstack_block_add_dense(const struct bitstack_block *b, float *w);
/* y[rows] += block x[cols] without a dense copy: per rank, a sign-masked sum
 * of v_j .* x weighted by u_j. t is scratch of rank * cols floats. */
void bitstack_block_apply(const struct bitstack_block *b, const float *x, float *t, float *y);

/* One matrix's blocks and how many are in use (struct matrix points here). */
struct bitstack_matrix {
    const struct bitstack_block *levels;   /* [levels] */
    int depth;
    const float *scale;                    /* its input channels' s */
    const void *base;                      /* its W2G64 base rows (in the mapping), or NULL */
};

/* A model's stack (model->stack; NULL for other files). */
struct bitstack {
    struct bitstack_matrix *matrices;      /* [n_matrices] */
    size_t outer_weight_bytes;             /* the model's weights outside the stack and the base
                                              (embedding, head, norms, scales) */
    size_t base_bytes;                     /* every matrix's W2G64 base; 0 without one */
    int levels, n_matrices;
    struct bitstack_block *blocks;   /* [n_matrices][levels] */
    uint32_t *order;                 /* [n_matrices * levels]: block index (matrix * levels + level), stack order */
    size_t *cum_bytes;               /* [n_matrices * levels + 1]: bytes of the first k blocks of the order */
    const float **scale;             /* [n_layer][ACT_POINTS]: input scales, s */
    int *depth;                      /* [n_matrices]: blocks resident */
    size_t resident_bytes;           /* cum_bytes of the prefix in use */
    int fitted;                      /* bitstack_fit has run */
    int n_checkpoints;               /* 0 when the file has none */
    uint64_t *checkpoint_bytes;      /* [n_checkpoints]: prefix bytes (as cum_bytes counts), increasing */
    float *checkpoint_ppl;           /* [n_checkpoints]: perplexity the packer measured with that prefix */
    char checkpoint_text[BITSTACK_CHECKPOINT_TEXT_MAX + 1];   /* what they scored ("heldout.txt, 4 windows of 512"); "" without them */
};

/* Reads the stack of a "bitstack" file (docs/formats.md) into m->stack,
 * every tensor and the order checked. 0, or -1 with "PATH: problem". */
int bitstack_load(struct model *m, char *err, size_t errlen);
void bitstack_free(struct bitstack *s);
/* The perplexity the file's checkpoints give for a prefix of stack_bytes:
 * linear in bytes between the two checkpoints around it, the last one's at
 * or beyond it; NaN when the file has no checkpoints or stack_bytes is below
 * the first. */
float bitstack_ppl_at(const struct bitstack *s, size_t stack_bytes);
/* Keeps the longest prefix of the order whose blocks fit in stack_bytes
 * (SIZE_MAX: all): in place (native weights) or as dense f32 copies (f32
 * weights), and sets m->weight_bytes. Not while a forward pass runs. 0, or
 * -1 with err (out of memory: the matrices are then unusable). */
int bitstack_fit(struct model *m, size_t stack_bytes, char *err, size_t errlen);

/* Stack bytes: the least servable prefix (one level of every matrix, the
 * order being level-major; none on a base, which computes alone), the whole
 * stack, and the longest prefix that fits in bytes (0 when not even one
 * block does). */
size_t bitstack_min_bytes(const struct bitstack *s);
size_t bitstack_full_bytes(const struct bitstack *s);
size_t bitstack_prefix_bytes(const struct bitstack *s, size_t bytes);
/* The weights a model holds at its least: a stack file's weights outside
 * the stack, its base and its least prefix; any other file's all. */
size_t bitstack_least_weight_bytes(const struct model *m);
/* The number of blocks in that prefix. */
size_t bitstack_prefix_blocks(const struct bitstack *s, size_t bytes);

/* Per-run scratch of bitstack_linear (NULL until first used). */
struct bitstack_scratch;
void bitstack_scratch_free(struct bitstack_scratch *s);
struct ebb_backend;
struct ebb_pool;
/* out[t][rows] += the resident levels' share of W x[t][cols] for n_tok
 * tokens, (W_1 + ... + W_d) diag(1 / s) x (the base's product is the
 * caller's: an ordinary W2G64 matmul), each token on its own (batch
 * invariant), rows split over pool. 0, or -1 when out of memory. */
int bitstack_linear(const struct ebb_backend *be, struct ebb_pool *pool, struct bitstack_scratch **scratch,
                    const struct bitstack_matrix *bm, const float *x, int n_tok, float *out);
#endif
