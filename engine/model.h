/* Llama-family model: configuration from GGUF metadata, f32 weights, and the
 * forward pass over a batch of tokens of one sequence with its KV cache.
 *
 * The forward pass reads top to bottom like llama2.c's: embed, then per layer
 * RMSNorm -> Q/K/V -> RoPE -> grouped-query attention over the cache -> output
 * projection -> residual -> RMSNorm -> SwiGLU MLP -> residual, then the final
 * norm and the output head. Prefill is the same code with n_tok > 1, so every
 * matrix product is a matrix-matrix product and the weights are read once per
 * batch, not once per token.
 */
#ifndef EBB_ENGINE_MODEL_H
#define EBB_ENGINE_MODEL_H
#include <stddef.h>
#include <stdint.h>
#include "engine/kv.h"
#include "storage/gguf.h"

struct ebb_backend;
struct ebb_pool;
struct ebb_tokenizer;

enum rope_style {
    ROPE_NORM = 0,   /* rotate adjacent pairs (x[2i], x[2i+1]): llama as GGUF stores Q/K */
    ROPE_NEOX = 1    /* rotate halves (x[i], x[i+d/2]): qwen2 and friends */
};

struct model_config {
    char arch[32];
    int n_layer;
    int n_embd;
    int n_head;
    int n_head_kv;
    int head_dim;
    int n_ff;
    int n_vocab;
    int n_ctx_train;
    int rope_dim;          /* dimensions rotated per head (<= head_dim) */
    float rope_base;
    float rms_eps;
    enum rope_style rope_style;
};

/* The four activations of a layer that feed linear layers; the packer
 * calibrates each and the quantized path quantizes each once per token. */
enum act_point { ACT_ATTN_IN = 0, ACT_ATTN_OUT = 1, ACT_FFN_IN = 2, ACT_FFN_DOWN_IN = 3, ACT_POINTS = 4 };

/* Sees the input of each activation point during model_forward (n_tok rows
 * of n floats, after any online rotation): the packer's calibration. */
/* layer == n_layer, point ACT_ATTN_IN: the output head's input (the final
 * norm's output, H64-rotated when the model rotates norm outputs), for
 * every token of the pass, given to the hook only (the head itself reads
 * only the rows that want logits). */
typedef void (*act_capture_fn)(void *ud, int layer, enum act_point point, const float *x, int n_tok, int n);

/* Weights of a layer. A plain model has f32 matrices. A packed model
 * (docs/formats.md) with integer activations keeps its W4G64 matrices in
 * the file mapping instead (the p* pointers; the f32 ones are NULL), and
 * each activation point has a channel permutation and a count of 8-bit
 * groups. A packed model with 16-bit activations (W4A16, a quality
 * reference) is dequantized to f32 at load but keeps its permutations. */
struct layer_weights {
    float *attn_norm;                 /* [n_embd] */
    float *wq, *wk, *wv, *wo;         /* [out][in] */
    float *bq, *bk, *bv;              /* optional biases (qwen2), else NULL */
    float *ffn_norm;                  /* [n_embd] */
    float *w_gate, *w_up, *w_down;
    const void *pq, *pk, *pv, *po, *pgate, *pup, *pdown;   /* W4G64 rows, in the mapping */
    int32_t *perm[ACT_POINTS];        /* packed models: x_perm[i] = x[perm[i]] */
    int n_hi[ACT_POINTS];             /* leading 8-bit activation groups */
};

struct model {
    struct model_config cfg;
    struct gguf_file file;
    struct ebb_tokenizer *tok;
    float *tok_embd;                  /* [n_vocab][n_embd] */
    float *output_norm;               /* [n_embd] */
    float *output;                    /* [n_vocab][n_embd]; == tok_embd when tied */
    int act_bits;                     /* 0: plain f32 model; packed: 4, 8 or 16 */
    const void *q_embd, *q_output;    /* packed, integer path: Q8_0 rows in the mapping */
    const void *w4_output;            /* or a W4G64 head (its input H64-rotated), else NULL */
    struct layer_weights *layers;
    size_t weight_bytes;              /* resident f32 weight bytes */
    const struct ebb_backend *be;
    struct ebb_pool *pool;
    float *rope_inv_freq;             /* [rope_dim/2] */
    struct run_state *run;            /* forward scratch (engine/model.c) */
    int hadamard_norm_out;            /* rotated models: H64 on the attention and FFN norm outputs */
    int hadamard_ffn_down;            /* rotated models: H64 on the down_proj input, online */
    act_capture_fn capture;           /* calibration hook, NULL normally */
    void *capture_ud;
};

/* Loads a GGUF model, its tokenizer and f32 weights. n_threads <= 0: one per
 * core. Returns 0, or -1 with "PATH: problem" in err. */
int model_load(struct model *m, const char *path, int n_threads, char *err, size_t errlen);
void model_free(struct model *m);

/* Most tokens one model_forward_batch call may carry. */
#define MODEL_MAX_BATCH 256

/* One sequence's share of a batch: n_tok tokens appended at positions
 * kv->n_past .. n_past+n_tok-1. logits == NULL: none wanted; else the last
 * token's row [n_vocab], or every token's [n_tok][n_vocab] if all_logits. */
struct batch_seq {
    struct kv_cache *kv;
    const int32_t *tokens;
    int n_tok;
    float *logits;
    int all_logits;
};

/* Runs several sequences through the model in one pass (continuous
 * batching): matrix products cover every token of every sequence, attention
 * reads each token's own cache. At most MODEL_MAX_BATCH tokens in total.
 * Returns 0, or -1 (bad token id, cache full, out of memory) with no cache
 * changed. A row's result does not depend on what else is in the batch. */
int model_forward_batch(struct model *m, struct batch_seq *seqs, int n_seqs);

/* One sequence of any length (split into batches): the common case for the
 * command line and perplexity. */
int model_forward(struct model *m, struct kv_cache *kv, const int32_t *tokens, int n_tok,
                  float *logits, int all_logits);
#endif
