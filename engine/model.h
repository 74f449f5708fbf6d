/* Llama-family model: the loaded weights (immutable once loaded) and the
 * forward pass, which runs in a caller's own run state.
 *
 * The forward pass reads top to bottom like llama2.c's: embed, then per layer
 * RMSNorm -> Q/K/V -> RoPE -> grouped-query attention over the cache -> output
 * projection -> residual add -> RMSNorm -> SwiGLU MLP -> residual add, then
 * the final norm and the output head. Prefill is the same code with n_tok > 1,
 * so every matrix product is a matrix-matrix product and the weights are read
 * once per batch, not once per token.
 *
 * Ownership and threads. model_load fills a `struct model`; after that the
 * engine never changes it, so any number of threads may read it (the packer,
 * which owns the f32 model it loaded, rewrites those copies before it runs
 * them). Everything a forward pass
 * writes -- activations, attention scratch, the worker pool that splits its
 * products, the calibration hook -- lives in a `struct model_run`, which one
 * thread uses at a time (the scheduler's engine thread, a command's main
 * thread). Loading is engine/model_load.c, the forward pass engine/forward.c.
 */
#ifndef EBB_ENGINE_MODEL_H
#define EBB_ENGINE_MODEL_H
#include <stddef.h>
#include <stdint.h>
#include "engine/kv.h"
#include "engine/model_config.h"
#include "kernels/formats.h"
#include "storage/gguf.h"

struct ebb_backend;
struct ebb_pool;
struct ebb_tokenizer;
struct bitstack;
struct bitstack_matrix;

/* The four activations of a layer that feed linear layers; the packer
 * calibrates each and the quantized path quantizes each once per token. */
enum act_point { ACT_ATTN_IN = 0, ACT_ATTN_OUT = 1, ACT_FFN_IN = 2, ACT_FFN_DOWN_IN = 3, ACT_POINTS = 4 };
/* A point's name in packed files ("attn_in", ... as in blk.N.attn_in.perm)
 * and its width (channels) for a model's shapes. */
const char *act_point_name(enum act_point p);
int act_point_width(const struct model_config *c, enum act_point p);

/* Sees the input of each activation point during a forward pass (n_tok rows
 * of n floats, after any online rotation): the packer's calibration. */
/* layer == n_layer, point ACT_ATTN_IN: the output head's input (the final
 * norm's output, H64-rotated when the model rotates norm outputs), for
 * every token of the pass, given to the hook only (the head itself reads
 * only the rows that want logits). */
typedef void (*act_capture_fn)(void *ud, int layer, enum act_point point, const float *x, int n_tok, int n);

/* A weight matrix as the op table multiplies it: n_out rows of n_in values
 * (GGUF's layout: the input dimension is contiguous) stored as `type`. The
 * type decides the product (kernels/backend.h's per-type matmul) and the
 * form of activations it reads (kernels/formats.h). */
struct matrix {
    enum ebb_type type;
    const void *data;     /* rows in the file mapping, or an f32 copy */
    int n_in, n_out;
    float *owned;         /* the f32 copy this matrix owns (freed with the model), or NULL */
    const struct bitstack_matrix *stack;   /* a BitStack matrix used in place (data NULL), else NULL */
};

/* Weights of a layer. A plain model's matrices are f32 copies. A packed
 * model (docs/formats.md) with integer activations keeps its W4G64
 * matrices in the file mapping, and each activation point has a channel
 * permutation and a count of 8-bit groups. A packed model with 16-bit
 * activations (W4A16, a quality reference) is dequantized to f32 at load
 * but keeps its permutations. */
struct layer_weights {
    float *attn_norm;                 /* [n_embd] */
    struct matrix wq, wk, wv, wo;
    float *bq, *bk, *bv;              /* optional biases (qwen2), else NULL */
    float *ffn_norm;                  /* [n_embd] */
    struct matrix w_gate, w_up, w_down;
    int32_t *perm[ACT_POINTS];        /* packed models: x_perm[i] = x[perm[i]] */
    int n_hi[ACT_POINTS];             /* leading 8-bit activation groups */
};

/* A layer's seven matrices by index, in one order -- q, k, v, o, gate, up,
 * down -- for code that treats them alike (placement, freeing; BitStack's
 * kinds follow the same order). */
#define LAYER_MATRICES 7
static inline struct matrix *layer_matrix_at(struct layer_weights *w, int i) {
    struct matrix *const all[LAYER_MATRICES] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
    return all[i];
}

/* How a plain GGUF's matrices are held: in the file's own types, used in
 * place (the default: resident weights are the file's bytes), or
 * dequantized to f32 copies (the reference the native path is measured
 * against, and what the packer transforms). Packed files are the same
 * either way. */
enum model_weights { MODEL_WEIGHTS_NATIVE = 0, MODEL_WEIGHTS_F32 = 1 };

struct model {
    struct model_config cfg;
    enum model_weights weights;
    struct gguf_file file;
    struct ebb_tokenizer *tok;
    struct matrix embd;               /* token_embd: one row dequantized per lookup */
    struct matrix output;             /* the head; tied: the embedding's rows (not owned) */
    float *output_norm;               /* [n_embd] */
    int act_bits;                     /* 0: plain f32 model; packed: 4, 8 or 16 */
    enum ebb_act_form act_form;       /* packed, 4 or 8 bits: what its points quantize into:
                                         Q8G64 (w4a4 files) or Q8B32 (source-exact files) */
    int act_group;                    /* packed: channels per activation group (64 or 32) */
    int act8_per_token;               /* source-exact files: each token's n_hi loudest blocks are
                                         8-bit (else the first n_hi after the permutation) */
    int hadamard_norm_out;            /* rotated models: H64 on the attention and FFN norm outputs */
    int hadamard_ffn_down;            /* rotated models: H64 on the down_proj input, online */
    int hadamard_head;                /* a W4G64 head: H64 on its input, online */
    struct layer_weights *layers;
    struct bitstack *stack;           /* a "bitstack" file's blocks (engine/bitstack.h), else NULL */
    size_t weight_bytes;              /* resident weight bytes (f32 copies and mapped matrices) */
    const struct ebb_backend *be;     /* the op table passes run on (whose memory the weights are in) */
    void **placed;                    /* placed on a device: its allocations, NULL-terminated; else NULL */
    float *rope_inv_freq;             /* [rope_dim/2] */
};

/* Loads a GGUF model, its tokenizer and weights. Returns 0, or -1 with
 * "PATH: problem" in err. */
int model_load(struct model *m, const char *path, enum model_weights weights, char *err, size_t errlen);
void model_free(struct model *m);
/* Keeps only the first n layers of a loaded model that is not placed (the
 * rest are freed): the same model, shorter, for tests whose reference path
 * is slow. */
void model_keep_layers(struct model *m, int n);
/* Moves a loaded model onto a device backend (one with its own memory,
 * kernels/backend.h): every tensor a pass reads is uploaded, the host
 * copies are freed and the file's pages handed back, and from then on
 * m->be is that backend, so passes and KV caches (whose account's `be` is
 * m->be) run there; the tokenizer and the RoPE frequencies stay on the
 * host. 0, or -1 with the reason in why and the model unchanged: not a
 * device backend, already placed, out of device memory, a BitStack file
 * (the device path does not run its stack), a matrix type the backend has
 * no product for. */
int model_place(struct model *m, const struct ebb_backend *be, char *why, size_t why_len);
/* The model on a named device (kernels/backend.h's ebb_backend_for_device):
 * "cpu" (or NULL) leaves it where it is; "cuda[:N]" places it there. 0, or
 * -1 with the reason (no such device, no CUDA in this build, model_place's
 * refusals). */
int model_use_device(struct model *m, const char *device, char *why, size_t why_len);
/* Hands the pages of the model's file mapping back to the kernel (they are
 * read again from the file when used): for a model that stops computing
 * while it stays loaded. Safe at any time no pass of it runs. */
void model_release_pages(const struct model *m);

/* A caller's state for running a model: its worker pool (n_threads <= 0:
 * one per core), the scratch of a forward pass, and the calibration hook.
 * Used by one thread at a time; the model must outlive it. NULL when out of
 * memory or threads. */
struct model_run *model_run_new(const struct model *m, int n_threads);
void model_run_free(struct model_run *r);
const struct model *model_run_model(const struct model_run *r);
/* The run's workers, for a caller's own parallel work between passes. */
struct ebb_pool *model_run_pool(struct model_run *r);
/* Calls fn at every activation point of later passes (NULL: none). The
 * hook reads the activations in place: host-memory models only (the
 * packer's). */
void model_run_set_capture(struct model_run *r, act_capture_fn fn, void *ud);

/* One sequence's share of a batch: n_tok tokens appended at positions
 * kv->n_past .. n_past+n_tok-1. logits == NULL: none wanted; else the last
 * token's row [n_vocab], or every token's [n_tok][n_vocab] if all_logits.
 * embed_sum, when set, gets every token's final hidden state (the output
 * norm's result, the head's input) added to it [n_embd]: embeddings. */
struct batch_seq {
    struct kv_cache *kv;
    const int32_t *tokens;
    int n_tok;
    float *logits;
    int all_logits;
    float *embed_sum;
};

/* Runs several sequences through the model in one pass (continuous
 * batching): matrix products cover every token of every sequence, attention
 * reads each token's own cache. At most MODEL_MAX_BATCH tokens in total.
 * Returns 0, or -1 (bad token id, cache full, out of memory) with no cache
 * changed. A row's result does not depend on what else is in the batch. */
int model_forward_batch(struct model_run *r, struct batch_seq *seqs, int n_seqs);
/* Why a pass that returned -1 for want of resources failed, in words: the
 * device's reason on a device, else out of memory. */
const char *model_run_failure(const struct model_run *r);

/* One sequence of any length (split into batches): the common case for the
 * command line and perplexity. */
int model_forward(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, int n_tok, float *logits,
                  int all_logits);
#endif
