/* A Llama-family model's shape, as read from GGUF metadata, and the batch
 * limit of one forward pass.
 *
 * Its own header because the KV cache (kv.h) sizes pages and attention
 * scratch from the shape and the batch limit, while the model (model.h)
 * holds caches: with the shape here, kv.h and model.h no longer include
 * each other.
 */
#ifndef EBB_ENGINE_MODEL_CONFIG_H
#define EBB_ENGINE_MODEL_CONFIG_H

/* Most tokens one model_forward_batch call may carry: enough to amortise
 * reading the weights, few enough that activations stay a few MB. */
#define MODEL_MAX_BATCH 256

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
#endif
