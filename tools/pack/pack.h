/* `ebb pack`: turns an f32-loadable model into a W4A4 / W4A8 / W4A16 variant
 * (QuaRot rotations, GPTQ weights, COMET's fine-grained mixed-precision
 * activations), written as the packed GGUF that docs/formats.md describes.
 *
 * The pipeline, one file per stage:
 *   rotate.c     rotate every matrix's input by H (block-diagonal 64x64
 *                Walsh-Hadamard; the engine rotates the activations online
 *                to match) and V/O per head. The rotated f32 model computes
 *                the same function as the original.
 *   calibrate.c  sample windows of a calibration text, run the rotated model
 *                over them and collect, per layer and activation point, the
 *                Hessian X^T X and each channel's absolute maximum.
 *   outliers.c   per activation point, a channel permutation that gathers
 *                the loudest channels into the leading groups of 64 and how
 *                many of those groups are 8-bit.
 *   gptq.c       4-bit weights in W4G64 blocks: GPTQ against the permuted
 *                Hessian, or round-to-nearest as the baseline.
 *   bitstack.c   BitStack: a matrix as a stack of residual blocks, each a
 *                sign matrix times a low-rank magnitude.
 *   pack.c       the whole run: load, rotate, calibrate, quantize, write,
 *                summarise, register in the catalog.
 *
 * Everything here is offline and single-model; memory is the f32 model plus
 * one Hessian per layer and activation point (about 0.8 GB in double for the
 * default model).
 */
#ifndef EBB_TOOLS_PACK_H
#define EBB_TOOLS_PACK_H
#include <stddef.h>
#include <stdint.h>

#include "engine/bitstack.h"
#include "engine/model.h"
#include "kernels/formats.h"

struct ebb_pool;

/* ---------------------------------------------------------------- rotate.c */

/* 0 if the model's shapes allow the rotations and groups of 64 (n_embd,
 * n_ff and head_dim multiples of 64); -1 with the reason in err. */
int pack_check_shapes(const struct model_config *c, char *err, size_t errlen);

/* In place, each row of n values (n % 64 == 0) times the block-diagonal
 * orthonormal Walsh-Hadamard matrix (64x64 blocks scaled by 1/8): x -> x R.
 * R is symmetric and its own inverse. Double-precision butterflies. */
void pack_hadamard_rows(float *x, size_t rows, int n);
/* In place, the same transform down each column of a rows x cols row-major
 * matrix (rows % 64 == 0): W -> R W, i.e. on the output side of a weight
 * stored [out][in]. */
void pack_hadamard_cols(float *w, int rows, int cols);

/* Rotates, offline, every matrix's input by the block-diagonal Hadamard H:
 * q, k, v, gate, up and down (whose inputs the engine rotates online:
 * model->hadamard_norm_out and hadamard_ffn_down, both set here), and V/O
 * per head. Each layer's SwiGLU output is first permuted by perm_ffn[l]
 * (NULL: identity). Norms, embedding and head are untouched (see rotate.c
 * for why the gains are not folded). The model computes the same function.
 * It must have passed pack_check_shapes. -1 with err when out of memory (the
 * model is then unusable) or when the backend lacks hadamard64 (nothing
 * changed). */
int pack_rotate_model(struct model *m, int32_t *const *perm_ffn, char *err, size_t errlen);

/* ------------------------------------------------------------- calibrate.c */

/* What calibration learns about one activation point of one layer. */
struct pack_act_stats {
    int n;              /* channels */
    double *hess;       /* [n][n] sum over tokens of x^T x (symmetric), or NULL */
    float *absmax;      /* [n] max |x| per channel */
    double *abssum;     /* [n] sum over tokens of |x| per channel (BitStack's scales) */
    double *gmax2;      /* [n/group] sum over tokens of (max |x| in the group)^2 */
    double energy;      /* sum over tokens of ||x||^2 */
};

struct pack_calib {
    int n_layer;
    int group;                   /* channels per activation group: 64 (w4a4), 32 (source-exact) */
    struct pack_act_stats *pt;   /* [n_layer * ACT_POINTS + 1], index layer*ACT_POINTS + point; the
                                  * last is the output head's input (model.h's capture at n_layer) */
    long n_tokens;               /* tokens seen */
    float *scratch;              /* per-call X^T X in float (the largest n squared) */
    int scratch_n;
};

/* Allocates the statistics for a model, group noise per group of `group`
 * channels; want_hessian = 0 keeps only absmax and group noise
 * (round-to-nearest needs no Hessian). -1 when out of memory. */
int pack_calib_init(struct pack_calib *c, const struct model_config *cfg, int group, int want_hessian);
void pack_calib_free(struct pack_calib *c);
/* The capture hook (engine/model.h act_capture_fn) that feeds a pack_calib. */
void pack_calib_capture(void *ud, int layer, enum act_point point, const float *x, int n_tok, int n);

/* The packer's deterministic generator (splitmix64): the next 64 bits of
 * the stream *state names. */
uint64_t pack_splitmix64(uint64_t *state);

/* Picks n_seqs windows of len tokens out of a token stream, without
 * replacement from its len-aligned windows, in an order fixed by seed; with
 * bos >= 0 every window starts with it (as `ebb ppl` does). out holds
 * n_seqs*len tokens. Returns the number of windows taken (fewer when the text
 * is short; 0 when it holds none). */
int pack_sample_windows(const int32_t *tokens, int n_tokens, int n_seqs, int len, uint64_t seed, int32_t bos,
                        int32_t *out);

/* Runs the model over n_seqs windows of len tokens with the capture hook set
 * to c; a progress bar on stderr labelled with label (NULL: none). 0, or -1
 * with err. */
int pack_calibrate(struct model_run *run, struct pack_calib *c, const int32_t *windows, int n_seqs, int len,
                   const char *label, char *err, size_t errlen);

/* -------------------------------------------------------------- outliers.c */

/* perm = the indices of score, largest first (ties: lower index first).
 * -1 when out of memory. */
int pack_order_by(const float *score, int n, int32_t *perm);

/* One layer's 8-bit groups (of c->group channels), from the statistics of the rotated model: a
 * budget of share times the layer's groups goes to the groups whose 4-bit
 * noise is the largest share of their activation's energy, across the four
 * points; n_hi[p] receives each point's count and perm[p] (n of point p
 * entries) its block permutation, noisiest blocks first. Needs gmax2 and
 * energy in c. -1 when out of memory. */
int pack_choose_act8(const struct pack_calib *c, int layer, double share, int32_t *const perm[ACT_POINTS],
                     int n_hi[ACT_POINTS]);

/* GPTQ's act-order, within the freedom the activation groups leave: inside
 * each segment of perm (n % segment == 0), channels are reordered by their
 * Hessian diagonal, largest first, so GPTQ quantizes the columns that see
 * the most input energy first and spreads their errors onto the rest. With
 * segment = 64 the groups keep their channels (W4A4); with segment = n the
 * order is the full act-order (W4A8, W4A16: the weights' groups then follow
 * it). -1 when out of memory. */
int pack_act_order(int32_t *perm, int n, const double *hess, int segment);

/* out[o][i] = w[o][perm[i]] (input columns of a [rows][cols] matrix). */
void pack_permute_cols(const float *w, int rows, int cols, const int32_t *perm, float *out);
/* out[i][j] = h[perm[i]][perm[j]]. */
void pack_permute_hessian(const double *h, int n, const int32_t *perm, double *out);

/* ------------------------------------------------------------------ gptq.c */

/* GPTQ's preparation for one Hessian: damps it (damp times the mean of its
 * diagonal added to the diagonal; dead channels, whose diagonal is 0, get 1),
 * inverts it and returns the upper Cholesky factor U of the inverse
 * (H^-1 = U^T U) in u[n][n] (lower triangle zero). If the damped Hessian is
 * not positive definite the damping is raised tenfold, up to three times.
 * dead[i] (may be NULL) is set for dead channels. 0, or -1 with err. */
int pack_gptq_prepare(const double *hess, int n, double damp, float *u, uint8_t *dead, char *err,
                      size_t errlen);

/* Quantizes w[rows][cols] (cols % 64 == 0) into rows*cols/64 W4G64 blocks,
 * GPTQ: columns left to right, each rounding error spread over the columns
 * still to come through U, lazily in batches of 128 columns; a group's scale
 * is chosen when the group starts, from its values at that point (a short
 * search over clipping). w is overwritten (it holds the updated weights
 * after). Rows are independent and run on pool (may be NULL). Columns marked
 * dead are zeroed first. */
void pack_gptq_quantize(float *w, int rows, int cols, const float *u, const uint8_t *dead,
                        struct ebb_pool *pool, struct ebb_block_w4g64 *out);

/* The same sweep into W2G64 blocks (20 bytes per 64 values at out): each
 * group's step and minimum from ebb_quantize_w2g64's range search on its
 * values when the group starts, codes 0..3. */
void pack_gptq_quantize_w2g64(float *w, int rows, int cols, const float *u, const uint8_t *dead,
                              struct ebb_pool *pool, uint8_t *out);

/* Round to nearest, the format's own rule (ebb_quantize_w4g64_rtn). */
void pack_rtn_quantize(const float *w, int rows, int cols, struct ebb_block_w4g64 *out);

/* One W4G64 block from a scale (an f16 bit pattern) and 64 codes in [-8, 7]. */
void pack_w4g64_block(struct ebb_block_w4g64 *b, uint16_t d_f16, const int8_t *codes);

/* ---------------------------------------------------------------- source.c */

struct gguf_writer;
struct pack_options;
struct pack_result;

/* 0 when m (loaded from a plain GGUF) can give a source-exact variant: its
 * seven matrices per layer all in types that read blocks of 32 (Q4_0, Q4_1,
 * Q5_0, Q5_1, Q8_0); -1 naming the first tensor that is not. */
int pack_check_source(const struct model *m, char *err, size_t errlen);
/* Adds the source's tensors to gw, each layer matrix with its blocks of 32
 * reordered by its activation point's block order (the noisiest first when
 * o->act_bits is 4 and the 8-bit blocks are fixed per point, from cal's
 * groups of 32; identity at 8 or when they are chosen per token), and the order
 * of every point as an I32 `.perm` tensor; fills r's group counts and
 * linear_bpw. 0, or -1 with err. */
int pack_write_source(struct gguf_writer *gw, const struct model *m, const struct pack_calib *cal,
                      const struct pack_options *o, struct pack_result *r, char *err, size_t errlen);

/* ------------------------------------------------------------------ pack.c */

enum pack_format { PACK_W4A4 = 0, PACK_W4A16 = 1, PACK_SOURCE = 2, PACK_BITSTACK = 3 };
enum pack_weight_quant { PACK_GPTQ = 0, PACK_RTN = 1 };
/* Order of the blocks within a level of a stack (bitstack.c): the largest
 * calibration-weighted error reduction first, a shuffle seeded by the
 * options' seed, or matrix index order. */
enum pack_bitstack_order { PACK_ORDER_IMPORTANCE = 0, PACK_ORDER_RANDOM = 1, PACK_ORDER_UNIFORM = 2 };

struct pack_options {
    const char *model_path;
    const char *out_path;
    const char *calib_path;       /* calibration text (UTF-8) */
    enum pack_format format;
    int act_bits;                 /* 4 or 8 for w4a4 and source; ignored for w4a16 (16) */
    enum pack_weight_quant weight_quant;
    int calib_seqs, calib_len;    /* windows and their length in tokens */
    uint64_t seed;
    float act8_share;             /* 8-bit activation groups per layer (W4A4) */
    double damp;                  /* GPTQ damping, fraction of the mean diagonal */
    int n_threads;                /* <= 0: one per core */
    int progress;                 /* progress bars on stderr */
    int head_bits;                /* output head: 8 (Q8_0, tied when the source is) or 4 (W4G64) */
    int act8_per_token;           /* source at 4 bits: each token's loudest blocks are 8-bit (the
                                   * default), else the blocks ranked first by calibration */
    int bitstack_base_bits;       /* bitstack: 2, the stack sits on a W2G64 copy of each matrix
                                   * and peels its residual; 0: a plain stack */
    int bitstack_levels;          /* bitstack: levels per matrix; 0: enough to pass the source's size */
    double bitstack_rank_bits;    /* bitstack: bits per weight the low-rank factors may cost */
    enum pack_bitstack_order bitstack_order;
    int bitstack_checkpoints;     /* bitstack: perplexity checkpoints measured into the file (0: none) */
    int bitstack_checkpoint_windows;   /* windows of 512 tokens each checkpoint scores */
    /* bitstack: the text the checkpoints score (UTF-8, not owned), its
     * length and its name in the file's ebb.bitstack.checkpoint_text; NULL:
     * the first calibration windows, so in-sample */
    const char *checkpoint_text;
    size_t checkpoint_text_len;
    const char *checkpoint_text_name;
};

/* A vector of n floats (F32) and a [rows][cols] matrix quantized to Q8_0,
 * added to gw as name. 0, or -1 when out of memory. */
int pack_add_f32(struct gguf_writer *gw, const char *name, const float *x, int n);
int pack_add_q8_0(struct gguf_writer *gw, const char *name, const float *x, int rows, int cols);
/* What every packed variant carries outside its layers: the Q8_0 embedding,
 * the f32 output norm, the head as its own Q8_0 rows when the source does
 * not tie it and q8_head is set, and rope_freqs as the source has it. 0, or
 * -1 with err. */
int pack_add_outer(struct gguf_writer *gw, const struct model *m, int q8_head, char *err, size_t errlen);

/* The defaults `ebb pack` documents in its --help. */
void pack_options_default(struct pack_options *o);

struct pack_result {
    uint64_t file_bytes;
    double bits_per_weight;       /* file bits over the source model's parameters */
    double linear_bpw;            /* bits per weight of the layer matrices alone */
    long calib_tokens;
    int n_layer;
    uint32_t *act8_groups;        /* [n_layer * ACT_POINTS] as written */
    uint32_t *act_groups;         /* [n_layer * ACT_POINTS] groups of each point */
    int n_checkpoints;            /* bitstack: the checkpoints written (0: none) */
    uint64_t *checkpoint_bytes;
    float *checkpoint_ppl;
    char checkpoint_text[BITSTACK_CHECKPOINT_TEXT_MAX + 1];   /* what they scored (ebb.bitstack.checkpoint_text) */
    double seconds;
};
void pack_result_free(struct pack_result *r);

/* Runs the whole pipeline and writes o->out_path. 0, or -1 with err. */
int pack_run(const struct pack_options *o, struct pack_result *r, char *err, size_t errlen);

/* The calibration provenance line for ebb.calibration: the text of
 * PATH.source when it exists (written by tools/calibration.py), else the
 * path and its sha256. Malloc'd; NULL when out of memory or unreadable. */
char *pack_calib_provenance(const char *calib_path);
/* -------------------------------------------------------------- bitstack.c */

/* One level of one matrix as the packer makes it: the block (engine/
 * bitstack.h) and the one allocation behind its signs and factors. */
struct bitstack_level {
    struct bitstack_block b;
    void *mem;
};

/* The rank that makes the factors cost about rank_bits a weight (BitStack's
 * r = 16 for 4096 x 4096 at 1/8 bit), at least 1. */
int bitstack_rank_for(int rows, int cols, double rank_bits);
/* Peels `levels` blocks of rank `rank` off W diag(scale) (scale NULL: ones)
 * into blocks[0..levels); residual[l] (may be NULL) gets the Frobenius norm
 * of what is left after level l. 0, or -1 with err (nothing to free). */
int bitstack_decompose(const float *w, int rows, int cols, const float *scale, int levels, int rank,
                       struct bitstack_level *blocks, double *residual, char *err, size_t errlen);
void bitstack_level_free(struct bitstack_level *l);
/* The stack order (enum pack_bitstack_order) of n_matrices * levels blocks
 * into order: gain[block] is what each block takes away (importance only;
 * block = matrix * levels + level), seed draws the random order. Always
 * level by level. 0, or -1 when out of memory. */
int pack_bitstack_order(enum pack_bitstack_order kind, int n_matrices, int levels, const double *gain, uint64_t seed,
                        uint32_t *order);
/* Loads the stack file at path (native weights) and measures perplexity
 * over n_windows windows of len tokens (one after another in windows; first
 * token replaced by bos when >= 0) at up to n_checkpoints prefix sizes,
 * evenly spaced in bytes from one full level to all of the stack (fewer when
 * two land on the same prefix). *bytes_out (prefix bytes, increasing, the
 * last the whole stack) and *ppl_out are malloc'd, *n_out their length. 0,
 * or -1 with err. */
int pack_bitstack_checkpoints(const char *path, const int32_t *windows, int n_windows, int len, int32_t bos,
                              int n_checkpoints, int n_threads, int progress, uint64_t **bytes_out, float **ppl_out,
                              int *n_out, char *err, size_t errlen);
/* The stack of every layer matrix of m (an f32 model) into gw: activation
 * scales from cal (abssum), o->bitstack_levels levels of each matrix, the
 * blocks ordered level by level and by importance within a level (see
 * bitstack.c), the Q8_0 embedding and head and the f32 norms; with
 * o->bitstack_base_bits, each matrix's W2G64 base first (GPTQ with cal's
 * Hessians on pool when o->weight_quant says so, else round to nearest) and
 * the stack on what it leaves. Fills r's linear_bpw (of the base and the
 * whole stack). 0, or -1 with err. */
int pack_write_bitstack(struct gguf_writer *gw, const struct model *m, const struct pack_calib *cal,
                        struct ebb_pool *pool, const struct pack_options *o, struct pack_result *r, char *err,
                        size_t errlen);

#endif
