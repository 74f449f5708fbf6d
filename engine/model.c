/* Llama-family model: load and forward pass.
 *
 * Loading reads the architecture from GGUF metadata (keys are prefixed with
 * general.architecture, so "llama", "mistral", "qwen2", ... share one path),
 * checks the shape of every tensor it will use against that configuration,
 * and dequantizes the weights to f32. Quantized compute paths come later with
 * their own formats; this is the reference-quality path the others are
 * measured against.
 *
 * The forward pass processes a batch of tokens of one sequence. Each matrix
 * product covers the whole batch, so prefill reads each weight once per
 * chunk. Attention is parallelised over (token, head) pairs on the worker
 * pool; everything else is per-row work that is cheap next to the products.
 */
#include "engine/model.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/formats.h"
#include "storage/error.h"

/* Per-forward scratch, sized for MODEL_MAX_BATCH tokens (large enough to
 * amortise reading the weights, small enough that activations stay a few
 * MB); owned by the model and used only by the thread that runs it. */
struct run_state {
    float *x;        /* [B][n_embd] residual stream */
    float *xb;       /* [B][n_embd] normed input */
    float *xb2;      /* [B][n_embd] a block's output, before it joins x */
    float *q;        /* [B][n_head*head_dim] */
    float *k, *v;    /* [B][n_head_kv*head_dim] */
    float *att;      /* [B][n_head*head_dim] attention output */
    float *gate, *up;/* [B][n_ff] */
    float *scores;   /* [n_workers][kv_attend_scratch(scores_ctx)]: kv_attend_block's scratch */
    float *rope_cos, *rope_sin; /* [B][rope_dim/2] */
    int scores_ctx;             /* the longest context that scratch covers */
    struct kv_cache **tok_kv;  /* [B] the sequence each batch token belongs to */
    int *tok_pos;              /* [B] its position */
    int32_t *tok_id;           /* [B] its id */
    int (*blocks)[2];          /* [B] attention blocks: first token, length */
    float *logits;             /* [head_rows_cap][n_vocab], multi-sequence batches */
    const float *ax;           /* the prepared activation (act_prepare) */
    float *xp;                 /* [B][widest] permuted activation (packed models) */
    int8_t *aq;                /* [B][widest] its int8 codes */
    float *as;                 /* [B][widest/64] its group scales */
    int head_rows_cap;
};

/* "PATH: message" (storage/error.h); returns -1. */
#define load_error(err, errlen, path, fmt, ...) errf(err, errlen, "%s: " fmt, path, ##__VA_ARGS__)

/* Reads "<arch>.<suffix>" as an integer. */
static int arch_u32(const struct model *m, const char *suffix, uint32_t *out) {
    char key[96];
    snprintf(key, sizeof key, "%s.%s", m->cfg.arch, suffix);
    return gguf_get_u32(&m->file, key, out);
}

static int arch_f32(const struct model *m, const char *suffix, float *out) {
    char key[96];
    snprintf(key, sizeof key, "%s.%s", m->cfg.arch, suffix);
    return gguf_get_f32(&m->file, key, out);
}

static int read_config(struct model *m, char *err, size_t errlen) {
    struct model_config *c = &m->cfg;
    const char *path = m->file.path;
    struct gguf_str arch;
    if (gguf_get_str(&m->file, "general.architecture", &arch) || arch.len == 0 ||
        arch.len >= sizeof c->arch)
        return load_error(err, errlen, path, "missing or bad general.architecture");
    memcpy(c->arch, arch.ptr, arch.len);
    c->arch[arch.len] = 0;
    /* Architectures whose graph is the Llama one (possibly with Q/K/V biases). */
    static const char *const supported[] = {"llama", "mistral", "qwen2", NULL};
    int ok = 0;
    for (int i = 0; supported[i]; i++) ok |= !strcmp(c->arch, supported[i]);
    if (!ok) return load_error(err, errlen, path, "architecture '%s' is not supported", c->arch);
    c->rope_style = !strcmp(c->arch, "qwen2") ? ROPE_NEOX : ROPE_NORM;

    uint32_t n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx = 4096, head_dim, rope_dim;
    if (arch_u32(m, "block_count", &n_layer) || arch_u32(m, "embedding_length", &n_embd) ||
        arch_u32(m, "attention.head_count", &n_head) || arch_u32(m, "feed_forward_length", &n_ff))
        return load_error(err, errlen, path, "missing %s.block_count/embedding_length/"
                          "attention.head_count/feed_forward_length", c->arch);
    if (arch_u32(m, "attention.head_count_kv", &n_head_kv)) n_head_kv = n_head;
    arch_u32(m, "context_length", &n_ctx);
    if (n_layer == 0 || n_layer > 1024 || n_embd == 0 || n_embd > 65536 || n_head == 0 ||
        n_head > 1024 || n_head_kv == 0 || n_head % n_head_kv || n_ff == 0 || n_ff > 1 << 20)
        return load_error(err, errlen, path, "implausible configuration (layers %u, embd %u, "
                          "heads %u/%u, ffn %u)", n_layer, n_embd, n_head, n_head_kv, n_ff);
    if (arch_u32(m, "attention.key_length", &head_dim)) {
        if (n_embd % n_head) return load_error(err, errlen, path, "embedding %u not divisible by %u heads", n_embd, n_head);
        head_dim = n_embd / n_head;
    }
    if (arch_u32(m, "rope.dimension_count", &rope_dim)) rope_dim = head_dim;
    if (head_dim == 0 || head_dim > 1024 || rope_dim > head_dim || rope_dim % 2)
        return load_error(err, errlen, path, "bad head size %u / rope dimensions %u", head_dim, rope_dim);
    c->rope_base = 10000.0f;
    arch_f32(m, "rope.freq_base", &c->rope_base);
    c->rms_eps = 1e-5f;
    arch_f32(m, "attention.layer_norm_rms_epsilon", &c->rms_eps);
    if (!(c->rope_base > 0) || !(c->rms_eps > 0))
        return load_error(err, errlen, path, "bad rope.freq_base or rms epsilon");

    c->n_layer = (int)n_layer;
    c->n_embd = (int)n_embd;
    c->n_head = (int)n_head;
    c->n_head_kv = (int)n_head_kv;
    c->head_dim = (int)head_dim;
    c->n_ff = (int)n_ff;
    c->n_ctx_train = (int)n_ctx;
    c->rope_dim = (int)rope_dim;
    return 0;
}

/* Finds a tensor, checks its shape (ne0 = contiguous) and returns it as a
 * freshly allocated f32 array. Optional tensors return NULL without error
 * when absent (*missing set). */
static float *load_tensor(struct model *m, const char *name, uint64_t ne0, uint64_t ne1,
                          int optional, int *failed, char *err, size_t errlen) {
    if (*failed) return NULL;
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    if (!t) {
        if (!optional) {
            load_error(err, errlen, m->file.path, "tensor '%s' is missing", name);
            *failed = 1;
        }
        return NULL;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        load_error(err, errlen, m->file.path, "tensor '%s' has shape [%llu, %llu, %llu], expected [%llu, %llu]",
                   name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                   (unsigned long long)t->ne[2], (unsigned long long)ne0, (unsigned long long)ne1);
        *failed = 1;
        return NULL;
    }
    float *dst = malloc(t->n_elems * sizeof(float));
    if (!dst) {
        load_error(err, errlen, m->file.path, "out of memory loading '%s'", name);
        *failed = 1;
        return NULL;
    }
    if (gguf_tensor_to_f32(t, dst)) {
        const struct ebb_type_info *ti = ebb_type_info(t->type);
        load_error(err, errlen, m->file.path, "tensor '%s' has type %s, which ebb cannot compute with",
                   name, ti ? ti->name : "?");
        free(dst);
        *failed = 1;
        return NULL;
    }
    m->weight_bytes += t->n_elems * sizeof(float);
    return dst;
}

/* A quantized matrix used in place: checks type and shape, returns its bytes
 * in the mapping. */
static const void *load_packed(struct model *m, const char *name, uint32_t type, uint64_t ne0, uint64_t ne1,
                               int *failed, char *err, size_t errlen) {
    if (*failed) return NULL;
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    const struct ebb_type_info *ti = t ? ebb_type_info(t->type) : NULL;
    if (!t || t->type != type || t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1) {
        load_error(err, errlen, m->file.path, "packed tensor '%s' is %s; expected %s [%llu, %llu]", name,
                   !t ? "missing" : ti ? ti->name : "of an unknown type", ebb_type_info(type)->name,
                   (unsigned long long)ne0, (unsigned long long)ne1);
        *failed = 1;
        return NULL;
    }
    m->weight_bytes += t->nbytes;
    return t->data;
}

/* A channel permutation: n distinct indices in [0, n). */
static int32_t *load_perm(struct model *m, const char *name, int n, int *failed, char *err, size_t errlen) {
    if (*failed) return NULL;
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    int32_t *perm = NULL;
    uint8_t *seen = calloc((size_t)n, 1);
    if (t && t->type == EBB_TYPE_I32 && t->n_elems == (uint64_t)n && t->n_dims == 1 && seen &&
        (perm = malloc((size_t)n * sizeof *perm))) {
        memcpy(perm, t->data, (size_t)n * sizeof *perm);
        for (int i = 0; i < n && perm; i++) {
            if (perm[i] < 0 || perm[i] >= n || seen[perm[i]]) { free(perm); perm = NULL; }
            else seen[perm[i]] = 1;
        }
    }
    free(seen);
    if (!perm) {
        load_error(err, errlen, m->file.path, "tensor '%s' is missing or not a permutation of %d channels", name, n);
        *failed = 1;
    }
    return perm;
}

/* ebb.* metadata of a packed file (docs/formats.md); 0 for a plain model. */
static int read_packing(struct model *m, char *err, size_t errlen) {
    struct gguf_str format;
    if (gguf_get_str(&m->file, "ebb.format", &format)) return 0;
    uint32_t group = 0, act_bits = 0;
    if (!gguf_str_eq(format, "w4a4"))
        return load_error(err, errlen, m->file.path, "unknown ebb.format '%.*s'", (int)format.len, format.ptr);
    if (gguf_get_u32(&m->file, "ebb.group_size", &group) || group != EBB_W4G64_GROUP)
        return load_error(err, errlen, m->file.path, "ebb.group_size must be %d", EBB_W4G64_GROUP);
    if (gguf_get_u32(&m->file, "ebb.act_bits", &act_bits) || (act_bits != 4 && act_bits != 8 && act_bits != 16))
        return load_error(err, errlen, m->file.path, "ebb.act_bits must be 4, 8 or 16");
    const struct model_config *c = &m->cfg;
    if (c->n_embd % 64 || c->n_ff % 64 || (c->n_head * c->head_dim) % 64)
        return load_error(err, errlen, m->file.path, "packed models need widths that are multiples of 64");
    /* "hadamard64" (QuaRot's rotated residual stream with folded norms) was
     * what the first packer wrote; files from it are refused, not misread. */
    struct gguf_str rotation;
    if (gguf_get_str(&m->file, "ebb.rotation", &rotation) || !gguf_str_eq(rotation, "hadamard64-inputs"))
        return load_error(err, errlen, m->file.path,
                          "ebb.rotation must be \"hadamard64-inputs\" (a file packed by an older ebb: pack it again)");
    m->act_bits = (int)act_bits;
    m->hadamard_norm_out = 1;
    m->hadamard_ffn_down = 1;
    return 0;
}

/* Per layer and activation point, the leading 8-bit groups (ebb.act8_groups). */
static int read_act8_groups(struct model *m, char *err, size_t errlen) {
    const struct gguf_kv *kv = gguf_find(&m->file, "ebb.act8_groups");
    const struct model_config *c = &m->cfg;
    const int widths[ACT_POINTS] = {c->n_embd, c->n_head * c->head_dim, c->n_embd, c->n_ff};
    if (!kv || kv->type != GGUF_ARRAY || kv->arr_type == GGUF_STRING || kv->arr_n != (uint64_t)c->n_layer * ACT_POINTS)
        return load_error(err, errlen, m->file.path, "ebb.act8_groups must hold %d numbers", c->n_layer * ACT_POINTS);
    for (int l = 0; l < c->n_layer; l++)
        for (int p = 0; p < ACT_POINTS; p++) {
            double v = gguf_arr_num(kv, (uint64_t)l * ACT_POINTS + p);
            if (!(v >= 0 && v <= widths[p] / 64))
                return load_error(err, errlen, m->file.path, "ebb.act8_groups[%d] = %g is out of range", l * ACT_POINTS + p, v);
            m->layers[l].n_hi[p] = m->act_bits == 8 ? widths[p] / 64 : (int)v;
        }
    return 0;
}

static int load_weights(struct model *m, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    const uint64_t E = (uint64_t)c->n_embd, F = (uint64_t)c->n_ff;
    const uint64_t QD = (uint64_t)c->n_head * c->head_dim, KD = (uint64_t)c->n_head_kv * c->head_dim;
    int failed = 0;
    const struct gguf_tensor *emb = gguf_find_tensor(&m->file, "token_embd.weight");
    if (!emb) return load_error(err, errlen, m->file.path, "tensor 'token_embd.weight' is missing");
    if (emb->ne[1] == 0 || emb->ne[1] > (1u << 22))
        return load_error(err, errlen, m->file.path, "implausible vocabulary size %llu",
                          (unsigned long long)emb->ne[1]);
    m->cfg.n_vocab = (int)emb->ne[1];
    const uint64_t V = (uint64_t)m->cfg.n_vocab;

    /* Integer-activation packed models use their 8- and 4-bit matrices in
     * place; everything else is dequantized to f32. */
    const int int_path = m->act_bits == 4 || m->act_bits == 8;
    if (int_path) {
        m->q_embd = load_packed(m, "token_embd.weight", EBB_TYPE_Q8_0, E, V, &failed, err, errlen);
        /* The head: the tied Q8_0 embedding, its own Q8_0 rows, or W4G64
         * rows whose input is the H64-rotated final norm (docs/formats.md). */
        const struct gguf_tensor *out = gguf_find_tensor(&m->file, "output.weight");
        if (out && out->type == EBB_TYPE_W4G64)
            m->w4_output = load_packed(m, "output.weight", EBB_TYPE_W4G64, E, V, &failed, err, errlen);
        else
            m->q_output = out ? load_packed(m, "output.weight", EBB_TYPE_Q8_0, E, V, &failed, err, errlen)
                              : m->q_embd;   /* tied embeddings */
    } else {
        m->tok_embd = load_tensor(m, "token_embd.weight", E, V, 0, &failed, err, errlen);
        m->output = load_tensor(m, "output.weight", E, V, 1, &failed, err, errlen);
        if (!failed && !m->output) m->output = m->tok_embd;   /* tied embeddings */
    }
    m->output_norm = load_tensor(m, "output_norm.weight", E, 1, 0, &failed, err, errlen);

    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) return load_error(err, errlen, m->file.path, "out of memory");
    for (int l = 0; l < c->n_layer && !failed; l++) {
        struct layer_weights *w = &m->layers[l];
        char name[96];
#define LOAD(field, suffix, ne0, ne1, opt) \
        (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), \
         w->field = load_tensor(m, name, ne0, ne1, opt, &failed, err, errlen))
#define PACKED(field, suffix, ne0, ne1) \
        (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), \
         w->field = load_packed(m, name, EBB_TYPE_W4G64, ne0, ne1, &failed, err, errlen))
        LOAD(attn_norm, "attn_norm.weight", E, 1, 0);
        if (int_path) {
            PACKED(pq, "attn_q.weight", E, QD);
            PACKED(pk, "attn_k.weight", E, KD);
            PACKED(pv, "attn_v.weight", E, KD);
            PACKED(po, "attn_output.weight", QD, E);
            PACKED(pgate, "ffn_gate.weight", E, F);
            PACKED(pup, "ffn_up.weight", E, F);
            PACKED(pdown, "ffn_down.weight", F, E);
        } else {
            LOAD(wq, "attn_q.weight", E, QD, 0);
            LOAD(wk, "attn_k.weight", E, KD, 0);
            LOAD(wv, "attn_v.weight", E, KD, 0);
            LOAD(wo, "attn_output.weight", QD, E, 0);
            LOAD(w_gate, "ffn_gate.weight", E, F, 0);
            LOAD(w_up, "ffn_up.weight", E, F, 0);
            LOAD(w_down, "ffn_down.weight", F, E, 0);
        }
        LOAD(bq, "attn_q.bias", QD, 1, 1);
        LOAD(bk, "attn_k.bias", KD, 1, 1);
        LOAD(bv, "attn_v.bias", KD, 1, 1);
        LOAD(ffn_norm, "ffn_norm.weight", E, 1, 0);
        if (m->act_bits) {
            static const char *const point[ACT_POINTS] = {"attn_in", "attn_out", "ffn_in", "ffn_down_in"};
            const int widths[ACT_POINTS] = {(int)E, (int)QD, (int)E, (int)F};
            for (int p = 0; p < ACT_POINTS; p++) {
                snprintf(name, sizeof name, "blk.%d.%s.perm", l, point[p]);
                w->perm[p] = load_perm(m, name, widths[p], &failed, err, errlen);
            }
        }
#undef PACKED
#undef LOAD
    }
    if (failed) return -1;
    if (m->act_bits && read_act8_groups(m, err, errlen)) return -1;

    /* Llama 3 style frequency factors scale the rotation per dimension. */
    const int half = c->rope_dim / 2;
    m->rope_inv_freq = malloc((size_t)half * sizeof(float));
    if (!m->rope_inv_freq) return load_error(err, errlen, m->file.path, "out of memory");
    float *factors = load_tensor(m, "rope_freqs.weight", (uint64_t)half, 1, 1, &failed, err, errlen);
    if (failed) return -1;
    for (int i = 0; i < half; i++) {
        double f = pow((double)c->rope_base, -2.0 * i / c->rope_dim);
        m->rope_inv_freq[i] = (float)(factors ? f / factors[i] : f);
    }
    if (factors) {
        m->weight_bytes -= (size_t)half * sizeof(float);
        free(factors);
    }
    return 0;
}

int model_load(struct model *m, const char *path, int n_threads, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    if (gguf_open(&m->file, path, err, errlen)) return -1;
    if (read_config(m, err, errlen) || read_packing(m, err, errlen)) goto fail;
    m->tok = tokenizer_load(&m->file, err, errlen);
    if (!m->tok) goto fail;
    if (load_weights(m, err, errlen)) goto fail;
    if (tokenizer_n_vocab(m->tok) > m->cfg.n_vocab) {
        load_error(err, errlen, path, "tokenizer has %d tokens but the embedding only %d rows",
                   tokenizer_n_vocab(m->tok), m->cfg.n_vocab);
        goto fail;
    }
    m->be = ebb_backend_cpu();
    m->pool = ebb_pool_create(n_threads);
    if (!m->pool) {
        load_error(err, errlen, path, "cannot start worker threads");
        goto fail;
    }
    return 0;
fail:
    model_free(m);
    return -1;
}

static void run_state_free(struct run_state *s) {
    if (!s) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->att);
    free(s->gate); free(s->up); free(s->scores); free(s->rope_cos); free(s->rope_sin);
    free(s->tok_kv); free(s->tok_pos); free(s->tok_id); free(s->blocks); free(s->logits);
    free(s->xp); free(s->aq); free(s->as);
    free(s);
}

void model_free(struct model *m) {
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->cfg.n_layer; l++) {
            struct layer_weights *w = &m->layers[l];
            free(w->attn_norm); free(w->wq); free(w->wk); free(w->wv); free(w->wo);
            free(w->bq); free(w->bk); free(w->bv);
            free(w->ffn_norm); free(w->w_gate); free(w->w_up); free(w->w_down);
            for (int p = 0; p < ACT_POINTS; p++) free(w->perm[p]);
        }
        free(m->layers);
    }
    if (m->output != m->tok_embd) free(m->output);
    free(m->tok_embd);
    free(m->output_norm);
    free(m->rope_inv_freq);
    run_state_free(m->run);
    if (m->pool) ebb_pool_destroy(m->pool);
    tokenizer_free(m->tok);
    gguf_close(&m->file);
    memset(m, 0, sizeof *m);
}

/* Scratch grows to the largest cache it has served; batches never exceed
 * MODEL_MAX_BATCH tokens. */
static struct run_state *run_state_get(struct model *m, int max_ctx, int head_rows) {
    const struct model_config *c = &m->cfg;
    struct run_state *s = m->run;
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return NULL;
        m->run = s;
        const size_t B = MODEL_MAX_BATCH, QD = (size_t)c->n_head * c->head_dim;
        const size_t KD = (size_t)c->n_head_kv * c->head_dim;
        const size_t widest = QD > (size_t)c->n_embd ? QD : (size_t)c->n_embd;
        s->x = malloc(B * c->n_embd * sizeof(float));
        s->xb = malloc(B * widest * sizeof(float));
        s->xb2 = malloc(B * c->n_embd * sizeof(float));
        s->q = malloc(B * QD * sizeof(float));
        s->k = malloc(B * KD * sizeof(float));
        s->v = malloc(B * KD * sizeof(float));
        s->att = malloc(B * QD * sizeof(float));
        s->gate = malloc(B * c->n_ff * sizeof(float));
        s->up = malloc(B * c->n_ff * sizeof(float));
        s->rope_cos = malloc(B * (c->rope_dim / 2 + 1) * sizeof(float));
        s->rope_sin = malloc(B * (c->rope_dim / 2 + 1) * sizeof(float));
        s->tok_kv = malloc(B * sizeof *s->tok_kv);
        s->tok_pos = malloc(B * sizeof *s->tok_pos);
        s->tok_id = malloc(B * sizeof *s->tok_id);
        s->blocks = malloc(B * sizeof *s->blocks);
        const size_t act_w = widest > (size_t)c->n_ff ? widest : (size_t)c->n_ff;
        s->xp = malloc(B * act_w * sizeof(float));
        s->aq = malloc(B * act_w);
        s->as = malloc(B * (act_w / 64 + 1) * sizeof(float));
        if (!s->xp || !s->aq || !s->as || !s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att || !s->gate || !s->up ||
            !s->rope_cos || !s->rope_sin || !s->tok_kv || !s->tok_pos || !s->tok_id || !s->blocks)
            goto fail;
    }
    if (s->scores_ctx < max_ctx) {
        free(s->scores);
        s->scores = malloc((size_t)ebb_pool_threads(m->pool) * kv_attend_scratch(&m->cfg, max_ctx) * sizeof(float));
        s->scores_ctx = s->scores ? max_ctx : 0;
        if (!s->scores) goto fail;
    }
    if (s->head_rows_cap < head_rows) {
        free(s->logits);
        s->logits = malloc((size_t)head_rows * c->n_vocab * sizeof(float));
        s->head_rows_cap = s->logits ? head_rows : 0;
        if (!s->logits) goto fail;
    }
    return s;
fail:
    run_state_free(s);
    m->run = NULL;
    return NULL;
}

/* cos/sin of every token's own position (tokens of different sequences sit at
 * different positions). */
static void rope_tables(const struct model *m, struct run_state *s, int n_tok) {
    const int half = m->cfg.rope_dim / 2;
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < half; i++) {
            float theta = (float)s->tok_pos[t] * m->rope_inv_freq[i];
            s->rope_cos[t * half + i] = cosf(theta);
            s->rope_sin[t * half + i] = sinf(theta);
        }
}

/* Rotates every head of one token's Q or K vector in place. */
static void rope_apply(const struct model *m, const struct run_state *s, float *vec, int n_heads, int t) {
    const int hd = m->cfg.head_dim, half = m->cfg.rope_dim / 2;
    const float *cs = s->rope_cos + t * half, *sn = s->rope_sin + t * half;
    for (int h = 0; h < n_heads; h++) {
        float *x = vec + h * hd;
        for (int i = 0; i < half; i++) {
            int a = m->cfg.rope_style == ROPE_NORM ? 2 * i : i;
            int b = m->cfg.rope_style == ROPE_NORM ? 2 * i + 1 : i + half;
            float x0 = x[a], x1 = x[b];
            x[a] = x0 * cs[i] - x1 * sn[i];
            x[b] = x0 * sn[i] + x1 * cs[i];
        }
    }
}

/* Attention runs in blocks: up to kv_block_tokens() consecutive tokens of
 * one sequence with the query heads of one KV head (engine/kv.c), so a long
 * prompt converts each cached page once per block instead of once per
 * query. The blocks of a batch (s->blocks: first token and length) times
 * the KV heads are the work items; workers claim them one by one, the last
 * tokens' (longest) first. */
struct attn_job {
    const struct model *m;
    struct run_state *s;
    int layer, n_items;
    atomic_int next;
};

static void attention_task(void *arg, int part, int n_parts) {
    (void)n_parts;
    struct attn_job *j = arg;
    const struct model_config *c = &j->m->cfg;
    const int hd = c->head_dim, group = c->n_head / c->n_head_kv, QD = c->n_head * hd;
    float *scratch = j->s->scores + (size_t)part * kv_attend_scratch(c, j->s->scores_ctx);
    const float scale = 1.0f / sqrtf((float)hd);
    for (int i; (i = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        const int item = j->n_items - 1 - i, kvh = item % c->n_head_kv;
        const int t0 = j->s->blocks[item / c->n_head_kv][0], n = j->s->blocks[item / c->n_head_kv][1];
        const size_t at = (size_t)t0 * QD + (size_t)kvh * group * hd;
        kv_attend_block(j->s->tok_kv[t0], j->m->be, j->layer, kvh, j->s->q + at, j->s->att + at, (size_t)QD, n, group,
                        j->s->tok_pos[t0], scale, scratch);
    }
}

/* Cuts the batch's runs of tokens of one sequence into attention blocks. */
static int attention_blocks(const struct model *m, struct run_state *s, int n_tok) {
    const int max_len = kv_block_tokens(&m->cfg);
    int n = 0;
    for (int t = 0; t < n_tok;) {
        int len = 1;
        while (t + len < n_tok && len < max_len && s->tok_kv[t + len] == s->tok_kv[t]) len++;
        s->blocks[n][0] = t;
        s->blocks[n][1] = len;
        n++;
        t += len;
    }
    return n;
}

static void add_bias(const struct ebb_backend *be, float *x, const float *bias, int n_tok, int n) {
    if (!bias) return;
    for (int t = 0; t < n_tok; t++) be->add_f32(x + (size_t)t * n, bias, n);
}

/* ------------------------------------------------------- per-token steps
 *
 * Between the matrix products a layer does per-token work: norms, the
 * online rotations, permuting and quantizing activations, RoPE and storing
 * keys and values. A prompt chunk has hundreds of tokens, so these steps
 * are split over the pool by token ranges (each token's result is computed
 * the same way whatever range it falls in); decode steps, with a handful of
 * tokens, stay on the calling thread, where waking the workers would cost
 * more than the work. */

#define PARALLEL_MIN_TOKENS 16

enum token_step {
    STEP_NORM,        /* [x += add;] xb = rmsnorm(x) * gain [; H64] */
    STEP_ACT,         /* permute and quantize an activation for the next products */
    STEP_ROPE_STORE,  /* RoPE on q and k, then k and v into each token's cache */
    STEP_SWIGLU,      /* gate = silu(gate) * up [; H64] */
};

struct token_job {
    struct model *m;
    struct run_state *s;
    const struct layer_weights *w;
    enum token_step step;
    int layer, n_tok;
    const float *gain, *add;   /* STEP_NORM */
    enum act_point point;      /* STEP_ACT */
    const float *x;
    int n;
};

static void act_token(const struct token_job *j, int t);

static void token_range(void *arg, int part, int n_parts) {
    const struct token_job *j = arg;
    const struct model *m = j->m;
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    struct run_state *s = j->s;
    const int t0 = (int)((long)j->n_tok * part / n_parts), t1 = (int)((long)j->n_tok * (part + 1) / n_parts);
    const int E = c->n_embd, F = c->n_ff, QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    for (int t = t0; t < t1; t++) {
        switch (j->step) {
        case STEP_NORM: {
            float *x = s->x + (size_t)t * E, *xb = s->xb + (size_t)t * E;
            if (j->add) be->add_f32(x, j->add + (size_t)t * E, E);
            be->rmsnorm_f32(xb, x, j->gain, E, c->rms_eps);
            if (m->hadamard_norm_out) be->hadamard64(xb, E);
            break;
        }
        case STEP_ROPE_STORE:
            rope_apply(m, s, s->q + (size_t)t * QD, c->n_head, t);
            rope_apply(m, s, s->k + (size_t)t * KD, c->n_head_kv, t);
            kv_store(s->tok_kv[t], be, j->layer, s->tok_pos[t], s->k + (size_t)t * KD, s->v + (size_t)t * KD);
            break;
        case STEP_SWIGLU:
            be->swiglu_f32(s->gate + (size_t)t * F, s->up + (size_t)t * F, F);
            if (m->hadamard_ffn_down) be->hadamard64(s->gate + (size_t)t * F, F);
            break;
        case STEP_ACT:
            act_token(j, t);
            break;
        }
    }
}

static void for_tokens(struct token_job *j) {
    if (j->n_tok < PARALLEL_MIN_TOKENS) token_range(j, 0, 1);
    else ebb_pool_run(j->m->pool, token_range, j, ebb_pool_threads(j->m->pool));
}

/* Permutes token t of an activation into s->xp (a packed model's weights
 * had their input columns permuted the same way) and, on the integer path,
 * quantizes its groups, the first n_hi at 8 bits. A sink position (the
 * first KV_SINK_TOKENS of a sequence) is quantized with every group at 8
 * bits: every later token attends to it, so the error of its keys and
 * values would reach them all. It depends on the position only, so
 * batching does not change results. */
static void act_token(const struct token_job *j, int t) {
    const struct model *m = j->m;
    struct run_state *s = j->s;
    const int n = j->n, groups = n / EBB_ACT_GROUP;
    const int32_t *perm = j->w->perm[j->point];
    const float *src = j->x + (size_t)t * n;
    float *dst = s->xp + (size_t)t * n;
    for (int i = 0; i < n; i++) dst[i] = src[perm[i]];
    if (m->act_bits == 16) return;
    const int n_hi = s->tok_pos[t] < KV_SINK_TOKENS ? groups : j->w->n_hi[j->point];
    m->be->quantize_act(dst, 1, n, n_hi, s->aq + (size_t)t * n, s->as + (size_t)t * groups);
}

/* Readies the input of one activation point for the linear layers that read
 * it: a plain model uses x as it is; a packed model permutes and quantizes
 * it (act_token). */
static void act_prepare(struct model *m, struct run_state *s, const struct layer_weights *w, enum act_point p,
                        const float *x, int n_tok, int n) {
    if (m->capture) m->capture(m->capture_ud, (int)(w - m->layers), p, x, n_tok, n);
    if (!m->act_bits) {
        s->ax = x;
        return;
    }
    struct token_job j = {.m = m, .s = s, .w = w, .step = STEP_ACT, .n_tok = n_tok, .point = p, .x = x, .n = n};
    for_tokens(&j);
    s->ax = s->xp;
}

/* out = the prepared activation times one weight matrix, in whichever form
 * the model holds it. */
static void linear(struct model *m, struct run_state *s, float *out, const float *wf, const void *wq, int n_tok,
                   int n_in, int n_out) {
    if (wq) m->be->matmul_w4a8(m->pool, out, s->aq, s->as, wq, n_tok, n_in, n_out);
    else m->be->matmul_f32(m->pool, out, s->ax, wf, n_tok, n_in, n_out);
}

static void embed(const struct model *m, float *dst, int32_t id) {
    const int E = m->cfg.n_embd;
    if (m->q_embd) {
        const size_t row = ebb_row_bytes(EBB_TYPE_Q8_0, (uint64_t)E);
        ebb_type_info(EBB_TYPE_Q8_0)->to_f32((const char *)m->q_embd + (size_t)id * row, dst, (size_t)E);
    } else {
        memcpy(dst, m->tok_embd + (size_t)id * E, (size_t)E * sizeof(float));
    }
}

/* The transformer over the n_tok tokens laid out in s->tok_*; leaves the
 * final residual stream in s->x. */
static void forward_layers(struct model *m, struct run_state *s, int n_tok) {
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    const int E = c->n_embd, F = c->n_ff, hd = c->head_dim;
    const int QD = c->n_head * hd, KD = c->n_head_kv * hd;

    for (int t = 0; t < n_tok; t++) embed(m, s->x + (size_t)t * E, s->tok_id[t]);
    rope_tables(m, s, n_tok);
    const int n_blocks = attention_blocks(m, s, n_tok);

    for (int l = 0; l < c->n_layer; l++) {
        const struct layer_weights *w = &m->layers[l];
        struct token_job step = {.m = m, .s = s, .w = w, .layer = l, .n_tok = n_tok};

        /* attention block (the previous layer's feed-forward output joins
         * the residual stream here) */
        step.step = STEP_NORM;
        step.gain = w->attn_norm;
        step.add = l > 0 ? s->xb2 : NULL;
        for_tokens(&step);
        act_prepare(m, s, w, ACT_ATTN_IN, s->xb, n_tok, E);
        linear(m, s, s->q, w->wq, w->pq, n_tok, E, QD);
        linear(m, s, s->k, w->wk, w->pk, n_tok, E, KD);
        linear(m, s, s->v, w->wv, w->pv, n_tok, E, KD);
        add_bias(be, s->q, w->bq, n_tok, QD);
        add_bias(be, s->k, w->bk, n_tok, KD);
        add_bias(be, s->v, w->bv, n_tok, KD);
        step.step = STEP_ROPE_STORE;
        for_tokens(&step);
        struct attn_job job = {m, s, l, n_blocks * c->n_head_kv, 0};
        ebb_pool_run(m->pool, attention_task, &job, ebb_pool_threads(m->pool));
        act_prepare(m, s, w, ACT_ATTN_OUT, s->att, n_tok, QD);
        linear(m, s, s->xb2, w->wo, w->po, n_tok, QD, E);

        /* feed-forward block */
        step.step = STEP_NORM;
        step.gain = w->ffn_norm;
        step.add = s->xb2;
        for_tokens(&step);
        act_prepare(m, s, w, ACT_FFN_IN, s->xb, n_tok, E);
        linear(m, s, s->gate, w->w_gate, w->pgate, n_tok, E, F);
        linear(m, s, s->up, w->w_up, w->pup, n_tok, E, F);
        step.step = STEP_SWIGLU;
        for_tokens(&step);
        act_prepare(m, s, w, ACT_FFN_DOWN_IN, s->gate, n_tok, F);
        linear(m, s, s->xb2, w->w_down, w->pdown, n_tok, F, E);
    }
    for (int t = 0; t < n_tok; t++) be->add_f32(s->x + (size_t)t * E, s->xb2 + (size_t)t * E, E);
}

/* Calibration: every token's head input, to the capture hook (model.h):
 * the final norm, rotated as the layers' norm outputs are. */
static void capture_head_input(struct model *m, struct run_state *s, int n_tok) {
    struct token_job norm = {.m = m, .s = s, .step = STEP_NORM, .n_tok = n_tok, .gain = m->output_norm};
    for_tokens(&norm);
    m->capture(m->capture_ud, m->cfg.n_layer, ACT_ATTN_IN, s->xb, n_tok, m->cfg.n_embd);
}

/* Rows of the batch that need logits, in batch order. */
static int head_row_count(const struct batch_seq *seqs, int n_seqs) {
    int rows = 0;
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].logits) rows += seqs[i].all_logits ? seqs[i].n_tok : 1;
    return rows;
}

/* Final norm and output head over the rows that want logits: gathered into
 * one product (the head is the largest matrix; reading it once per step
 * matters), then copied to each sequence's buffer. */
static void forward_head(struct model *m, struct run_state *s, struct batch_seq *seqs, int n_seqs, int rows) {
    const struct model_config *c = &m->cfg;
    const int E = c->n_embd;
    int r = 0, t = 0;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (q->logits) {
            int first = q->all_logits ? 0 : q->n_tok - 1;
            for (int k = first; k < q->n_tok; k++, r++)
                m->be->rmsnorm_f32(s->xb + (size_t)r * E, s->x + (size_t)(t + k) * E, m->output_norm, E, c->rms_eps);
        }
        t += q->n_tok;
    }
    /* A single sequence writes straight into its buffer. */
    float *out = n_seqs == 1 ? seqs[0].logits : s->logits;
    if (m->w4_output) {  /* 4-bit head: rotated input, every activation group at 8 bits */
        m->be->hadamard64(s->xb, rows * E);
        m->be->quantize_act(s->xb, rows, E, E / EBB_ACT_GROUP, s->aq, s->as);
        m->be->matmul_w4a8(m->pool, out, s->aq, s->as, m->w4_output, rows, E, c->n_vocab);
    } else if (m->q_output) {   /* 8-bit head: every activation group at 8 bits */
        m->be->quantize_act(s->xb, rows, E, E / EBB_ACT_GROUP, s->aq, s->as);
        m->be->matmul_q8a8(m->pool, out, s->aq, s->as, m->q_output, rows, E, c->n_vocab);
    } else {
        m->be->matmul_f32(m->pool, out, s->xb, m->output, rows, E, c->n_vocab);
    }
    if (n_seqs == 1) return;
    r = 0;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (!q->logits) continue;
        int n = q->all_logits ? q->n_tok : 1;
        memcpy(q->logits, s->logits + (size_t)r * c->n_vocab, (size_t)n * c->n_vocab * sizeof(float));
        r += n;
    }
}

int model_forward_batch(struct model *m, struct batch_seq *seqs, int n_seqs) {
    int n_tok = 0, max_ctx = 1;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (q->n_tok <= 0 || q->n_tok > q->kv->n_ctx - q->kv->n_past) return -1;
        for (int k = 0; k < q->n_tok; k++)
            if (q->tokens[k] < 0 || q->tokens[k] >= m->cfg.n_vocab) return -1;
        for (int j = 0; j < i; j++)
            if (seqs[j].kv == q->kv) return -1;   /* a sequence appears once per batch */
        n_tok += q->n_tok;
        if (q->kv->n_past + q->n_tok > max_ctx) max_ctx = q->kv->n_past + q->n_tok;
    }
    if (n_tok == 0 || n_tok > MODEL_MAX_BATCH) return -1;
    const int rows = head_row_count(seqs, n_seqs);
    struct run_state *s = run_state_get(m, max_ctx, n_seqs > 1 ? rows : 0);
    if (!s) return -1;
    for (int i = 0; i < n_seqs; i++)
        if (kv_cache_ensure(seqs[i].kv, seqs[i].kv->n_past + seqs[i].n_tok)) return -1;

    int t = 0;
    for (int i = 0; i < n_seqs; i++)
        for (int k = 0; k < seqs[i].n_tok; k++, t++) {
            s->tok_kv[t] = seqs[i].kv;
            s->tok_pos[t] = seqs[i].kv->n_past + k;
            s->tok_id[t] = seqs[i].tokens[k];
        }
    forward_layers(m, s, n_tok);
    if (m->capture) capture_head_input(m, s, n_tok);
    for (int i = 0; i < n_seqs; i++) seqs[i].kv->n_past += seqs[i].n_tok;
    if (rows) forward_head(m, s, seqs, n_seqs, rows);
    return 0;
}

int model_forward(struct model *m, struct kv_cache *kv, const int32_t *tokens, int n_tok,
                  float *logits, int all_logits) {
    if (n_tok <= 0 || n_tok > kv->n_ctx - kv->n_past) return -1;
    for (int done = 0; done < n_tok;) {
        int n = n_tok - done < MODEL_MAX_BATCH ? n_tok - done : MODEL_MAX_BATCH;
        struct batch_seq seq = {kv, tokens + done, n, NULL, all_logits};
        if (all_logits) seq.logits = logits + (size_t)done * m->cfg.n_vocab;
        else if (done + n == n_tok) seq.logits = logits;
        if (model_forward_batch(m, &seq, 1)) return -1;
        done += n;
    }
    return 0;
}
