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
 * decomposed W diag(s); tools/pack/bitstack.c says why). The file orders
 * every block of every matrix in one stack, level by level (no matrix gets
 * its k+1-th block before every matrix has its k-th), the more important
 * first within a level; a memory budget keeps the longest prefix that fits,
 * so quality follows the budget megabyte by megabyte.
 *
 * This first runtime reconstructs each matrix's prefix as a dense f32 copy
 * (bitstack_fit): the reference the sign-product kernels will be tested
 * against, and what measures perplexity against bytes (`ebb ppl
 * --stack-bytes`). Its resident memory is therefore the f32 model's, not
 * the prefix's bytes; the stack bytes are reported on their own.
 * The file layout is docs/formats.md's "bitstack".
 */
#ifndef EBB_ENGINE_BITSTACK_H
#define EBB_ENGINE_BITSTACK_H
#include <stddef.h>
#include <stdint.h>

struct model;

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

/* Bytes of one block in the file: the packed signs and both factors. */
size_t bitstack_block_bytes(int rows, int cols, int rank);
/* w[rows][cols] += the block (the dense reference). */
void bitstack_block_add_dense(const struct bitstack_block *b, float *w);
/* y[rows] += block x[cols] without a dense copy: per rank, a sign-masked sum
 * of v_j .* x weighted by u_j. t is scratch of rank * cols floats. */
void bitstack_block_apply(const struct bitstack_block *b, const float *x, float *t, float *y);

/* A model's stack (model->stack; NULL for other files). */
struct bitstack {
    int levels, n_matrices;
    struct bitstack_block *blocks;   /* [n_matrices][levels] */
    uint32_t *order;                 /* [n_matrices * levels]: block index (matrix * levels + level), stack order */
    size_t *cum_bytes;               /* [n_matrices * levels + 1]: bytes of the first k blocks of the order */
    const float **scale;             /* [n_layer][ACT_POINTS]: input scales, s */
    int *depth;                      /* [n_matrices]: blocks resident */
    size_t resident_bytes;           /* cum_bytes of the prefix in use */
};

/* Reads the stack of a "bitstack" file (docs/formats.md) into m->stack,
 * every tensor and the order checked. 0, or -1 with "PATH: problem". */
int bitstack_load(struct model *m, char *err, size_t errlen);
void bitstack_free(struct bitstack *s);
/* Keeps the longest prefix of the order whose blocks fit in stack_bytes
 * (SIZE_MAX: all) and rebuilds every layer matrix as its dense f32 copy.
 * Not while a forward pass runs. 0, or -1 with err (out of memory: the
 * matrices are then unusable). */
int bitstack_fit(struct model *m, size_t stack_bytes, char *err, size_t errlen);
#endif
