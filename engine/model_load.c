/* Loading a Llama-family model: configuration from GGUF metadata, every
 * tensor checked against it, weights as typed matrices (engine/model.h).
 *
 * Keys are prefixed with general.architecture, so "llama", "mistral",
 * "qwen2", ... share one path. A plain model's matrices are dequantized to
 * f32 copies (the reference-quality path the others are measured against);
 * a packed file's integer-path matrices stay in the file's mapping and are
 * multiplied in place. Nothing here runs the model: see engine/forward.c.
 */
#include "engine/model.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

#include "engine/bitstack.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/formats.h"
#include "storage/error.h"

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

/* A plain file's matrix: with native weights, used in place in the type
 * the file stores it in when the backend has a product for that type;
 * otherwise (MODEL_WEIGHTS_F32, F16/BF16 which have no product, or W4G64,
 * whose Q8G64 activations only a packed file's calibrated points provide)
 * an f32 copy the model owns. A source-exact file's embedding and head are
 * the source's, native whatever the weights setting (packed files are
 * computed one way). */
static void load_matrix(struct model *m, struct matrix *w, const char *name, uint64_t n_in, uint64_t n_out,
                        int *failed, char *err, size_t errlen) {
    const struct gguf_tensor *t = *failed ? NULL : gguf_find_tensor(&m->file, name);
    const int native = m->act_form == EBB_ACT_Q8B32 || (m->weights == MODEL_WEIGHTS_NATIVE && !m->act_bits);
    if (t && native && t->type < EBB_TYPE_COUNT_ &&
        m->be->matmul[t->type] && ebb_type_info(t->type)->act != EBB_ACT_Q8G64 &&
        t->ne[0] == n_in && t->ne[1] == n_out && t->ne[2] == 1 && t->ne[3] == 1) {
        m->weight_bytes += t->nbytes;
        *w = (struct matrix){(enum ebb_type)t->type, t->data, (int)n_in, (int)n_out, NULL, NULL};
        return;
    }
    float *rows = load_tensor(m, name, n_in, n_out, 0, failed, err, errlen);
    if (rows) *w = (struct matrix){EBB_TYPE_F32, rows, (int)n_in, (int)n_out, rows, NULL};
}

/* A packed file's quantized matrix, used in place: its type must be one
 * whose product reads the activation form the file quantizes into (W4G64
 * for Q8G64; Q4_0 .. Q5_1 and Q8_0 for Q8B32), its shape [n_in, n_out]. */
static void map_matrix(struct model *m, struct matrix *w, const char *name, enum ebb_act_form form, uint64_t n_in,
                       uint64_t n_out, int *failed, char *err, size_t errlen) {
    if (*failed) return;
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    const struct ebb_type_info *ti = t ? ebb_type_info(t->type) : NULL;
    if (!t || !ti || ti->act != form || !m->be->matmul[t->type] || t->ne[0] != n_in || t->ne[1] != n_out ||
        t->ne[2] != 1) {
        char want[128] = "";
        for (uint32_t k = 0, n = 0; k < EBB_TYPE_COUNT_; k++)
            if (ebb_type_info(k) && ebb_type_info(k)->act == form && m->be->matmul[k])
                n += snprintf(want + n, n < sizeof want ? sizeof want - n : 0, "%s%s", n ? " or " : "",
                              ebb_type_info(k)->name);
        load_error(err, errlen, m->file.path, "packed tensor '%s' is %s; expected %s [%llu, %llu]", name,
                   !t ? "missing" : ti ? ti->name : "of an unknown type", want, (unsigned long long)n_in,
                   (unsigned long long)n_out);
        *failed = 1;
        return;
    }
    m->weight_bytes += t->nbytes;
    *w = (struct matrix){(enum ebb_type)t->type, t->data, (int)n_in, (int)n_out, NULL, NULL};
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
    /* A stack of residual blocks: f32 activations, matrices rebuilt from
     * the blocks by bitstack_load and bitstack_fit. */
    if (gguf_str_eq(format, "bitstack")) return bitstack_load(m, err, errlen);
    const int source = gguf_str_eq(format, "source");
    if (!gguf_str_eq(format, "w4a4") && !source)
        return load_error(err, errlen, m->file.path, "unknown ebb.format '%.*s'", (int)format.len, format.ptr);
    const uint32_t want_group = source ? EBB_ACT_BLOCK : EBB_W4G64_GROUP;
    if (gguf_get_u32(&m->file, "ebb.group_size", &group) || group != want_group)
        return load_error(err, errlen, m->file.path, "ebb.group_size must be %u", want_group);
    if (gguf_get_u32(&m->file, "ebb.act_bits", &act_bits) || (act_bits != 4 && act_bits != 8 && (act_bits != 16 || source)))
        return load_error(err, errlen, m->file.path, "ebb.act_bits must be 4 or 8%s", source ? "" : " or 16");
    const struct model_config *c = &m->cfg;
    if (source) {
        /* The source's own blocks, permuted, against activations in blocks
         * of 32: no rotation, nothing folded (docs/formats.md). */
        struct gguf_str rotation;
        if (gguf_get_str(&m->file, "ebb.rotation", &rotation) || !gguf_str_eq(rotation, "none"))
            return load_error(err, errlen, m->file.path, "ebb.rotation must be \"none\" in a source-exact file");
        if (c->n_embd % 32 || c->n_ff % 32 || (c->n_head * c->head_dim) % 32)
            return load_error(err, errlen, m->file.path, "source-exact files need widths that are multiples of 32");
        m->act_bits = (int)act_bits;
        m->act_form = EBB_ACT_Q8B32;
        m->act_group = (int)group;
        /* Which blocks are 8-bit: fixed per point (the leading ones after
         * the permutation, "static", the default) or per token ("token"). */
        struct gguf_str choice;
        if (!gguf_get_str(&m->file, "ebb.act8_choice", &choice)) {
            if (!gguf_str_eq(choice, "token") && !gguf_str_eq(choice, "static"))
                return load_error(err, errlen, m->file.path, "ebb.act8_choice must be \"static\" or \"token\"");
            m->act8_per_token = gguf_str_eq(choice, "token");
        }
        return 0;
    }
    if (c->n_embd % 64 || c->n_ff % 64 || (c->n_head * c->head_dim) % 64)
        return load_error(err, errlen, m->file.path, "packed models need widths that are multiples of 64");
    /* "hadamard64" (QuaRot's rotated residual stream with folded norms) was
     * what the first packer wrote; files from it are refused, not misread. */
    struct gguf_str rotation;
    if (gguf_get_str(&m->file, "ebb.rotation", &rotation) || !gguf_str_eq(rotation, "hadamard64-inputs"))
        return load_error(err, errlen, m->file.path,
                          "ebb.rotation must be \"hadamard64-inputs\" (a file packed by an older ebb: pack it again)");
    m->act_bits = (int)act_bits;
    m->act_form = EBB_ACT_Q8G64;
    m->act_group = EBB_ACT_GROUP;
    m->hadamard_norm_out = 1;
    m->hadamard_ffn_down = 1;
    return 0;
}

const char *act_point_name(enum act_point p) {
    static const char *const names[ACT_POINTS] = {"attn_in", "attn_out", "ffn_in", "ffn_down_in"};
    return p < ACT_POINTS ? names[p] : "?";
}

int act_point_width(const struct model_config *c, enum act_point p) {
    return p == ACT_ATTN_OUT ? c->n_head * c->head_dim : p == ACT_FFN_DOWN_IN ? c->n_ff : c->n_embd;
}

/* Per layer and activation point, the leading 8-bit groups (ebb.act8_groups). */
static int read_act8_groups(struct model *m, char *err, size_t errlen) {
    const struct gguf_kv *kv = gguf_find(&m->file, "ebb.act8_groups");
    const struct model_config *c = &m->cfg;
    if (!kv || kv->type != GGUF_ARRAY || kv->arr_type == GGUF_STRING || kv->arr_n != (uint64_t)c->n_layer * ACT_POINTS)
        return load_error(err, errlen, m->file.path, "ebb.act8_groups must hold %d numbers", c->n_layer * ACT_POINTS);
    for (int l = 0; l < c->n_layer; l++)
        for (int p = 0; p < ACT_POINTS; p++) {
            double v = gguf_arr_num(kv, (uint64_t)l * ACT_POINTS + p);
            const int groups = act_point_width(c, (enum act_point)p) / m->act_group;
            if (!(v >= 0 && v <= groups))
                return load_error(err, errlen, m->file.path, "ebb.act8_groups[%d] = %g is out of range", l * ACT_POINTS + p, v);
            m->layers[l].n_hi[p] = m->act_bits == 8 ? groups : (int)v;
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

    /* Integer-activation packed models use their quantized matrices in
     * place; a plain model's are native or f32 (load_matrix). */
    const int int_path = m->act_bits == 4 || m->act_bits == 8;
    if (int_path && m->act_form == EBB_ACT_Q8G64) {
        map_matrix(m, &m->embd, "token_embd.weight", EBB_ACT_Q8B32, E, V, &failed, err, errlen);
        /* The head: the tied Q8_0 embedding, its own Q8_0 rows, or W4G64
         * rows whose input is the H64-rotated final norm (docs/formats.md). */
        const struct gguf_tensor *out = gguf_find_tensor(&m->file, "output.weight");
        if (out && out->type == EBB_TYPE_W4G64) {
            map_matrix(m, &m->output, "output.weight", EBB_ACT_Q8G64, E, V, &failed, err, errlen);
            m->hadamard_head = 1;
        } else if (out) {
            map_matrix(m, &m->output, "output.weight", EBB_ACT_Q8B32, E, V, &failed, err, errlen);
        }
    } else {
        load_matrix(m, &m->embd, "token_embd.weight", E, V, &failed, err, errlen);
        const struct gguf_tensor *out = gguf_find_tensor(&m->file, "output.weight");
        if (out) load_matrix(m, &m->output, "output.weight", E, V, &failed, err, errlen);
        /* A W4G64 head's rows carry H64 on their input side, dequantized or not. */
        m->hadamard_head = out && out->type == EBB_TYPE_W4G64;
    }
    if (!failed && !m->output.data) m->output = (struct matrix){m->embd.type, m->embd.data, m->embd.n_in,
                                                                m->embd.n_out, NULL, NULL};   /* tied embeddings */
    m->output_norm = load_tensor(m, "output_norm.weight", E, 1, 0, &failed, err, errlen);

    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) return load_error(err, errlen, m->file.path, "out of memory");
    for (int l = 0; l < c->n_layer && !failed; l++) {
        struct layer_weights *w = &m->layers[l];
        char name[96];
#define LOAD(field, suffix, ne0, ne1, opt) \
        (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), \
         w->field = load_tensor(m, name, ne0, ne1, opt, &failed, err, errlen))
#define MATRIX(field, suffix, ne0, ne1) \
        (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), \
         m->stack ? (void)0 : int_path ? map_matrix(m, &w->field, name, m->act_form, ne0, ne1, &failed, err, errlen) \
                  : load_matrix(m, &w->field, name, ne0, ne1, &failed, err, errlen))
        LOAD(attn_norm, "attn_norm.weight", E, 1, 0);
        MATRIX(wq, "attn_q.weight", E, QD);
        MATRIX(wk, "attn_k.weight", E, KD);
        MATRIX(wv, "attn_v.weight", E, KD);
        MATRIX(wo, "attn_output.weight", QD, E);
        MATRIX(w_gate, "ffn_gate.weight", E, F);
        MATRIX(w_up, "ffn_up.weight", E, F);
        MATRIX(w_down, "ffn_down.weight", F, E);
        LOAD(bq, "attn_q.bias", QD, 1, 1);
        LOAD(bk, "attn_k.bias", KD, 1, 1);
        LOAD(bv, "attn_v.bias", KD, 1, 1);
        LOAD(ffn_norm, "ffn_norm.weight", E, 1, 0);
        if (m->act_bits) {
            for (int p = 0; p < ACT_POINTS; p++) {
                snprintf(name, sizeof name, "blk.%d.%s.perm", l, act_point_name((enum act_point)p));
                w->perm[p] = load_perm(m, name, act_point_width(c, (enum act_point)p), &failed, err, errlen);
            }
        }
#undef MATRIX
#undef LOAD
    }
    if (failed) return -1;
    if (m->act_bits && read_act8_groups(m, err, errlen)) return -1;
    if (m->stack && bitstack_fit(m, SIZE_MAX, err, errlen)) return -1;

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

int model_load(struct model *m, const char *path, enum model_weights weights, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    m->weights = weights;
    m->be = ebb_backend_cpu();
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
    return 0;
fail:
    model_free(m);
    return -1;
}

/* ------------------------------------------------------------ placement
 *
 * Every tensor a pass reads, visited as a slot (where the model keeps its
 * pointer), its bytes and the host copy the model owns (a vector's own
 * pointer, a matrix's f32 copy; a matrix in the file mapping owns none):
 * what model_place sends to a device and model_free gives back. A tied
 * head is the embedding's slot. The RoPE frequencies stay on the host,
 * which makes the angles. */
typedef void (*tensor_fn)(void *ctx, void **slot, size_t bytes, void **host_copy);

static void visit_matrix(struct matrix *w, tensor_fn fn, void *ctx) {
    if (w->data)
        fn(ctx, (void **)(void *)&w->data, ebb_row_bytes(w->type, (uint64_t)w->n_in) * (size_t)w->n_out,
           (void **)(void *)&w->owned);
}

static void visit_vector(void *slot, size_t bytes, tensor_fn fn, void *ctx) {
    if (*(void **)slot) fn(ctx, (void **)slot, bytes, (void **)slot);
}

static void visit_tensors(struct model *m, tensor_fn fn, void *ctx) {
    const struct model_config *c = &m->cfg;
    const size_t E = (size_t)c->n_embd * sizeof(float), QD = (size_t)c->n_head * c->head_dim * sizeof(float);
    const size_t KD = (size_t)c->n_head_kv * c->head_dim * sizeof(float);
    const int tied = m->output.data == m->embd.data;   /* before fn may change the embedding's slot */
    visit_matrix(&m->embd, fn, ctx);
    if (!tied) visit_matrix(&m->output, fn, ctx);
    visit_vector(&m->output_norm, E, fn, ctx);
    for (int l = 0; m->layers && l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        visit_vector(&w->attn_norm, E, fn, ctx);
        visit_vector(&w->ffn_norm, E, fn, ctx);
        visit_vector(&w->bq, QD, fn, ctx);
        visit_vector(&w->bk, KD, fn, ctx);
        visit_vector(&w->bv, KD, fn, ctx);
        for (int i = 0; i < LAYER_MATRICES; i++) visit_matrix(layer_matrix_at(w, i), fn, ctx);
        for (int p = 0; p < ACT_POINTS; p++)
            visit_vector(&w->perm[p], (size_t)act_point_width(c, (enum act_point)p) * sizeof(int32_t), fn, ctx);
    }
}

/* Why a loaded model cannot run on this backend, or NULL. */
static const char *place_problem(const struct model *m, const struct ebb_backend *be) {
    if (!be->memory) return "the backend computes in host memory: nothing to place";
    if (m->placed) return "the model is already placed on a device";
    if (m->stack) return "a BitStack file runs on the CPU only (its blocks are not placed on devices)";
    if (!be->matmul[m->output.type]) return "the backend has no product for the output head's type";
    for (int l = 0; l < m->cfg.n_layer; l++)
        for (int i = 0; i < LAYER_MATRICES; i++)
            if (!be->matmul[layer_matrix_at(&m->layers[l], i)->type]) return "the backend has no product for a matrix's type";
    return NULL;
}

/* Sending the tensors: each uploaded into its own allocation, recorded in
 * order; the first failure stops the rest. */
struct placing {
    const struct ebb_backend *be;
    void **placed;
    int n, failed;
    char *why;
    size_t why_len;
};

static void place_tensor(void *ctx, void **slot, size_t bytes, void **host_copy) {
    (void)host_copy;
    struct placing *p = ctx;
    if (p->failed) return;
    void *d = p->be->memory->alloc(bytes);
    if (d) p->placed[p->n++] = d;
    if (!d || p->be->memory->upload(d, *slot, bytes)) {
        snprintf(p->why, p->why_len, "placing %zu bytes of weights on %s: %s", bytes, p->be->name,
                 p->be->memory->error());
        p->failed = 1;
    }
}

static void count_tensor(void *ctx, void **slot, size_t bytes, void **host_copy) {
    (void)slot, (void)bytes, (void)host_copy;
    ++*(int *)ctx;
}

/* The device has every tensor: each slot takes its device copy, in the
 * order place_tensor made them, and the host copies go. */
static void swap_tensor(void *ctx, void **slot, size_t bytes, void **host_copy) {
    (void)bytes;
    struct placing *p = ctx;
    free(*host_copy);
    *host_copy = NULL;
    *slot = p->placed[p->n++];
}

/* model_free's: the device copies were released; the slots forget them. */
static void forget_tensor(void *ctx, void **slot, size_t bytes, void **host_copy) {
    (void)ctx, (void)bytes;
    *slot = NULL;
    *host_copy = NULL;
}

int model_place(struct model *m, const struct ebb_backend *be, char *why, size_t why_len) {
    const char *problem = place_problem(m, be);
    if (problem) {
        snprintf(why, why_len, "%s", problem);
        return -1;
    }
    int count = 0;
    visit_tensors(m, count_tensor, &count);
    struct placing p = {be, calloc((size_t)count + 1, sizeof(void *)), 0, 0, why, why_len};   /* NULL-terminated */
    if (!p.placed) {
        snprintf(why, why_len, "out of host memory");
        return -1;
    }
    visit_tensors(m, place_tensor, &p);
    if (!p.failed) p.failed = be->memory->sync() ? (snprintf(why, why_len, "%s", be->memory->error()), 1) : 0;
    if (p.failed) {   /* nothing changed on the host: give back what was sent */
        for (int i = 0; i < p.n; i++) be->memory->release(p.placed[i]);
        free(p.placed);
        return -1;
    }
    const int tied = m->output.data == m->embd.data;
    p.n = 0;
    visit_tensors(m, swap_tensor, &p);
    if (tied) m->output.data = m->embd.data;
    m->placed = p.placed;
    m->be = be;
    model_release_pages(m);   /* the file's pages: the device holds the weights now */
    return 0;
}

int model_use_device(struct model *m, const char *device, char *why, size_t why_len) {
    if (ebb_device_is_host(device)) return 0;
    const struct ebb_backend *be = ebb_backend_for_device(device, why, why_len);
    return be ? model_place(m, be, why, why_len) : -1;
}

static void matrix_free(struct matrix *w) {
    free(w->owned);
    memset(w, 0, sizeof *w);
}

static void layer_free(struct layer_weights *w) {
    free(w->attn_norm); free(w->bq); free(w->bk); free(w->bv); free(w->ffn_norm);
    for (int i = 0; i < LAYER_MATRICES; i++) matrix_free(layer_matrix_at(w, i));
    for (int p = 0; p < ACT_POINTS; p++) free(w->perm[p]);
    memset(w, 0, sizeof *w);
}

void model_keep_layers(struct model *m, int n) {
    if (m->placed || m->stack || n < 1) return;
    for (int l = n; l < m->cfg.n_layer; l++) layer_free(&m->layers[l]);
    if (n < m->cfg.n_layer) m->cfg.n_layer = n;
}

void model_release_pages(const struct model *m) {
    if (m->file.map && m->file.size) madvise((void *)m->file.map, m->file.size, MADV_DONTNEED);
}

void model_free(struct model *m) {
    if (!m) return;
    if (m->placed) {
        for (void **d = m->placed; *d; d++) m->be->memory->release(*d);
        free(m->placed);
        const int tied = m->output.data == m->embd.data;
        visit_tensors(m, forget_tensor, NULL);
        if (tied) m->output.data = NULL;
    }
    if (m->layers) {
        for (int l = 0; l < m->cfg.n_layer; l++) layer_free(&m->layers[l]);
        free(m->layers);
    }
    matrix_free(&m->output);
    matrix_free(&m->embd);
    free(m->output_norm);
    free(m->rope_inv_freq);
    bitstack_free(m->stack);
    tokenizer_free(m->tok);
    gguf_close(&m->file);
    memset(m, 0, sizeof *m);
}

