/* `ebb pack`, the whole run (see pack.h for the stages).
 *
 *   load f32 -> [W4A4: a short pass finds each layer's loud SwiGLU
 *   channels] -> permute, rotate ->
 *   calibrate (Hessians, group noise) -> per layer: the block permutation
 *   and 8-bit groups of each activation point, GPTQ (or RTN) per matrix ->
 *   Q8_0 embedding and head -> GGUF written atomically.
 *
 * The file layout is docs/formats.md's "w4a4": every metadata key of the
 * source, the ebb.* keys, and per layer the W4G64 matrices with their input
 * columns in the permuted order of the activation that feeds them, plus the
 * I32 permutation of each of the four activation points. W4A8 is the same
 * file with every group 8-bit and identity permutations (a permutation only
 * matters for deciding which groups are 8-bit); W4A16 likewise with
 * ebb.act_bits = 16 (activations stay f32 at run time).
 *
 * Cost for the default model on 2 cores: calibration dominates (one f32
 * forward pass per window plus a float SYRK per activation point; 40K
 * tokens in all with the defaults); GPTQ runs at BLAS speed (about 20 s).
 * The output is checked by tests/unit/test_pack.c, which dequantizes it
 * back into an f32 model and also runs it through the engine.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/generate.h"
#include "engine/perplexity.h"
#include "engine/tokenizer.h"
#include "engine/utf8.h"
#include "storage/gguf_write.h"
#include "storage/sha256.h"
#include "tools/pack/pack.h"


void pack_options_default(struct pack_options *o) {
    memset(o, 0, sizeof *o);
    o->format = PACK_W4A4;
    o->act_bits = 4;
    o->weight_quant = PACK_GPTQ;
    o->calib_seqs = 64;
    o->calib_len = 512;
    o->seed = 1;
    o->act8_share = 0.2f;
    o->damp = 0.01;
    o->progress = 1;
    o->head_bits = 8;
    o->act8_per_token = 1;
    o->bitstack_rank_bits = 0.125;
    o->bitstack_base_bits = 2;
    o->bitstack_order = PACK_ORDER_IMPORTANCE;
    o->bitstack_checkpoints = 8;
    o->bitstack_checkpoint_windows = 4;
}

void pack_result_free(struct pack_result *r) {
    free(r->act8_groups);
    free(r->act_groups);
    free(r->checkpoint_bytes);
    free(r->checkpoint_ppl);
    memset(r, 0, sizeof *r);
}

char *pack_calib_provenance(const char *calib_path) {
    char hex[65];
    if (sha256_file(calib_path, hex)) return NULL;

    char source[1024] = "";
    size_t plen = strlen(calib_path);
    char *side = malloc(plen + 8);
    if (!side) return NULL;
    memcpy(side, calib_path, plen);
    memcpy(side + plen, ".source", 8);
    FILE *s = fopen(side, "rb");
    free(side);
    if (s) {
        size_t k = fread(source, 1, sizeof source - 1, s);
        fclose(s);
        source[k] = 0;
        while (k && (source[k - 1] == '\n' || source[k - 1] == '\r')) source[--k] = 0;
    }
    size_t len = strlen(source) + strlen(calib_path) + 128;
    char *out = malloc(len);
    if (!out) return NULL;
    if (source[0]) snprintf(out, len, "%s; text sha256 %s", source, hex);
    else snprintf(out, len, "%s (sha256 %s)", calib_path, hex);
    return out;
}

/* Fails early, before minutes of work, when the output cannot be created. */
static int check_writable(const char *out_path, char *err, size_t errlen) {
    size_t n = strlen(out_path);
    char *tmp = malloc(n + 5);
    if (!tmp) { snprintf(err, errlen, "out of memory"); return -1; }
    memcpy(tmp, out_path, n);
    memcpy(tmp + n, ".tmp", 5);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int e = errno;
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    free(tmp);
    if (fd < 0 && e != EEXIST) {
        snprintf(err, errlen, "cannot write %s: %s", out_path, strerror(e));
        return -1;
    }
    return 0;
}

/* The calibration windows: the text tokenized, windows sampled by seed. */
static int32_t *load_windows(const struct model *m, const struct pack_options *o, int *n_seqs, char *err,
                             size_t errlen) {
    FILE *f = fopen(o->calib_path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open the calibration text %s: %s (make it with: python3 "
                 "tools/calibration.py)", o->calib_path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 20, len = 0;
    char *text = malloc(cap);
    while (text) {
        len += fread(text + len, 1, cap - len, f);
        if (len < cap) break;
        char *grown = realloc(text, cap * 2);
        if (!grown) { free(text); text = NULL; break; }
        text = grown;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!text || bad) {
        free(text);
        snprintf(err, errlen, "cannot read %s", o->calib_path);
        return NULL;
    }
    int32_t *ids = NULL;
    int n_ids = tokenizer_encode(m->tok, text, len, 0, &ids);
    free(text);
    if (n_ids < 0) {
        snprintf(err, errlen, "%s is not valid UTF-8", o->calib_path);
        return NULL;
    }
    int32_t *win = malloc((size_t)o->calib_seqs * o->calib_len * sizeof(int32_t));
    if (!win) {
        free(ids);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const int32_t bos = tokenizer_bos_to_add(m->tok);
    *n_seqs = pack_sample_windows(ids, n_ids, o->calib_seqs, o->calib_len, o->seed, bos, win);
    free(ids);
    if (*n_seqs == 0) {
        free(win);
        snprintf(err, errlen, "%s has %d tokens, fewer than one window of %d", o->calib_path, n_ids, o->calib_len);
        return NULL;
    }
    if (*n_seqs < o->calib_seqs && o->progress)
        fprintf(stderr, "ebb pack: the calibration text holds only %d windows of %d tokens\n", *n_seqs,
                o->calib_len);
    return win;
}

/* Scratch for one layer's quantization. */
struct layer_work {
    double *hperm;     /* [n][n] permuted Hessian */
    float *u;          /* [n][n] upper Cholesky of its inverse */
    uint8_t *dead;     /* [n] */
    float *wperm;      /* the largest matrix, permuted */
    struct ebb_block_w4g64 *blocks;
};

/* Quantizes w[rows][cols] (overwritten: GPTQ updates it as it goes) into
 * blocks, with GPTQ when lw->u holds the prepared inverse Hessian of its
 * input (have_u), else round-to-nearest, and adds it as name. */
static int add_w4_quantized(struct gguf_writer *gw, const char *name, float *w, int rows, int cols,
                            const struct layer_work *lw, int have_u, struct ebb_pool *pool,
                            struct ebb_block_w4g64 *blocks) {
    if (have_u) pack_gptq_quantize(w, rows, cols, lw->u, lw->dead, pool, blocks);
    else pack_rtn_quantize(w, rows, cols, blocks);
    const size_t nbytes = (size_t)rows * ebb_row_bytes(EBB_TYPE_W4G64, (uint64_t)cols);
    const uint64_t ne[2] = {(uint64_t)cols, (uint64_t)rows};
    return gguf_writer_add_tensor(gw, name, EBB_TYPE_W4G64, 2, ne, blocks, nbytes);
}

/* A layer's matrix: its input columns permuted, then quantized and added. */
static int add_w4_matrix(struct gguf_writer *gw, const char *name, const float *w, int rows, int cols,
                         const int32_t *perm, const struct pack_options *o, struct layer_work *lw,
                         int have_u, struct ebb_pool *pool, size_t *w4_bytes, size_t *w4_elems) {
    pack_permute_cols(w, rows, cols, perm, lw->wperm);
    *w4_bytes += (size_t)rows * ebb_row_bytes(EBB_TYPE_W4G64, (uint64_t)cols);
    *w4_elems += (size_t)rows * cols;
    return add_w4_quantized(gw, name, lw->wperm, rows, cols, lw, o->weight_quant == PACK_GPTQ && have_u, pool,
                            lw->blocks);
}

int pack_add_f32(struct gguf_writer *gw, const char *name, const float *x, int n) {
    const uint64_t ne[1] = {(uint64_t)n};
    return gguf_writer_add_tensor(gw, name, EBB_TYPE_F32, 1, ne, x, (size_t)n * sizeof(float));
}

int pack_add_outer(struct gguf_writer *gw, const struct model *m, int q8_head, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    if (pack_add_q8_0(gw, "token_embd.weight", m->embd.owned, c->n_vocab, c->n_embd) ||
        pack_add_f32(gw, "output_norm.weight", m->output_norm, c->n_embd) ||
        (q8_head && m->output.data != m->embd.data &&
         pack_add_q8_0(gw, "output.weight", m->output.owned, c->n_vocab, c->n_embd))) {
        snprintf(err, errlen, "out of memory writing the embedding");
        return -1;
    }
    const struct gguf_tensor *rf = gguf_find_tensor(&m->file, "rope_freqs.weight");
    if (rf && gguf_writer_add_tensor(gw, "rope_freqs.weight", rf->type, rf->n_dims, rf->ne, rf->data,
                                     (size_t)rf->nbytes)) {
        snprintf(err, errlen, "cannot copy rope_freqs.weight");
        return -1;
    }
    return 0;
}

int pack_add_q8_0(struct gguf_writer *gw, const char *name, const float *x, int rows, int cols) {
    const size_t nbytes = (size_t)rows * ebb_row_bytes(EBB_TYPE_Q8_0, (uint64_t)cols);
    void *q = malloc(nbytes);
    if (!q) return -1;
    ebb_quantize_q8_0(x, q, (size_t)rows * cols);
    const uint64_t ne[2] = {(uint64_t)cols, (uint64_t)rows};
    int rc = gguf_writer_add_tensor(gw, name, EBB_TYPE_Q8_0, 2, ne, q, nbytes);
    free(q);
    return rc;
}

/* The output head at 4 bits (head_bits 4): its rows take H64 on their
 * input side, as the layers' matrices do (the engine rotates the final
 * norm's output to match), then GPTQ with the Hessian of that rotated input
 * (calibration's head slot), or round-to-nearest. No permutation: the
 * head's input is quantized with every group at 8 bits. The embedding keeps
 * its Q8_0 rows for lookups, so a tied source gets a separate head. */
static int add_w4_head(struct gguf_writer *gw, const struct model *m, struct ebb_pool *pool,
                       const struct pack_calib *cal, const struct pack_options *o, struct layer_work *lw, char *err,
                       size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int rows = c->n_vocab, cols = c->n_embd;
    const size_t nbytes = (size_t)rows * ebb_row_bytes(EBB_TYPE_W4G64, (uint64_t)cols);
    float *w = malloc((size_t)rows * cols * sizeof(float));
    struct ebb_block_w4g64 *blocks = malloc(nbytes);
    int rc = -1;
    if (!w || !blocks) {
        snprintf(err, errlen, "out of memory for the 4-bit head");
        goto out;
    }
    memcpy(w, m->output.data, (size_t)rows * cols * sizeof(float));
    pack_hadamard_rows(w, (size_t)rows, cols);
    const struct pack_act_stats *st = cal ? &cal->pt[c->n_layer * ACT_POINTS] : NULL;
    const int gptq = o->weight_quant == PACK_GPTQ && st && st->hess;
    if (gptq && pack_gptq_prepare(st->hess, cols, o->damp, lw->u, lw->dead, err, errlen)) goto out;
    rc = add_w4_quantized(gw, "output.weight", w, rows, cols, lw, gptq, pool, blocks);
    if (rc) snprintf(err, errlen, "out of memory writing the head");
out:
    free(w);
    free(blocks);
    return rc;
}

/* One layer: permutations, 8-bit groups, the seven matrices. */
static int pack_layer(const struct model *m, struct ebb_pool *pool, int l, const struct pack_calib *cal,
                      const struct pack_options *o, struct gguf_writer *gw, struct layer_work *lw,
                      struct pack_result *r, size_t *w4_bytes, size_t *w4_elems, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    const int E = c->n_embd, F = c->n_ff, QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    char name[96];
    int rc = 0, n_hi[ACT_POINTS];
    int32_t *perm[ACT_POINTS] = {0};
    for (int p = 0; p < ACT_POINTS; p++) {
        const int n = act_point_width(c, (enum act_point)p);
        perm[p] = malloc((size_t)n * sizeof(int32_t));
        if (!perm[p]) rc = -1;
        for (int i = 0; perm[p] && i < n; i++) perm[p][i] = i;
        n_hi[p] = n / EBB_ACT_GROUP;   /* W4A8 and W4A16: every group 8-bit or more */
    }
    if (!rc && o->format == PACK_W4A4 && o->act_bits == 4) rc = pack_choose_act8(cal, l, o->act8_share, perm, n_hi);
    if (rc) {
        for (int p = 0; p < ACT_POINTS; p++) free(perm[p]);
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    for (int p = 0; p < ACT_POINTS && !rc; p++) {
        const int n = act_point_width(c, (enum act_point)p);
        const struct pack_act_stats *st = cal ? &cal->pt[l * ACT_POINTS + p] : NULL;
        r->act8_groups[l * ACT_POINTS + p] = (uint32_t)n_hi[p];
        r->act_groups[l * ACT_POINTS + p] = (uint32_t)(n / EBB_ACT_GROUP);

        int have_u = 0;
        if (o->weight_quant == PACK_GPTQ && st && st->hess) {
            const int segment = o->format == PACK_W4A4 && o->act_bits == 4 ? EBB_ACT_GROUP : n;
            if (pack_act_order(perm[p], n, st->hess, segment)) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }
            pack_permute_hessian(st->hess, n, perm[p], lw->hperm);
            if (pack_gptq_prepare(lw->hperm, n, o->damp, lw->u, lw->dead, err, errlen)) {
                rc = -1;
                break;
            }
            have_u = 1;
        }
#define W4(suffix, mat, rows, cols) \
        (snprintf(name, sizeof name, "blk.%d.%s", l, suffix), \
         add_w4_matrix(gw, name, mat.owned, rows, cols, perm[p], o, lw, have_u, pool, w4_bytes, w4_elems))
        switch (p) {
        case ACT_ATTN_IN:
            rc = W4("attn_q.weight", w->wq, QD, E) || W4("attn_k.weight", w->wk, KD, E) ||
                 W4("attn_v.weight", w->wv, KD, E);
            break;
        case ACT_ATTN_OUT:
            rc = W4("attn_output.weight", w->wo, E, QD);
            break;
        case ACT_FFN_IN:
            rc = W4("ffn_gate.weight", w->w_gate, F, E) || W4("ffn_up.weight", w->w_up, F, E);
            break;
        default:
            rc = W4("ffn_down.weight", w->w_down, E, F);
            break;
        }
#undef W4
        if (!rc) {
            snprintf(name, sizeof name, "blk.%d.%s.perm", l, act_point_name((enum act_point)p));
            const uint64_t ne[1] = {(uint64_t)n};
            rc = gguf_writer_add_tensor(gw, name, EBB_TYPE_I32, 1, ne, perm[p], (size_t)n * sizeof(int32_t));
        }
    }
    for (int p = 0; p < ACT_POINTS; p++) free(perm[p]);
    if (!rc) {
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        rc = pack_add_f32(gw, name, w->attn_norm, E);
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        rc = rc || pack_add_f32(gw, name, w->ffn_norm, E);
        if (w->bq) { snprintf(name, sizeof name, "blk.%d.attn_q.bias", l); rc = rc || pack_add_f32(gw, name, w->bq, QD); }
        if (w->bk) { snprintf(name, sizeof name, "blk.%d.attn_k.bias", l); rc = rc || pack_add_f32(gw, name, w->bk, KD); }
        if (w->bv) { snprintf(name, sizeof name, "blk.%d.attn_v.bias", l); rc = rc || pack_add_f32(gw, name, w->bv, KD); }
    }
    if (rc && !err[0]) snprintf(err, errlen, "out of memory adding layer %d", l);
    return rc ? -1 : 0;
}

static int layer_work_init(struct layer_work *lw, const struct model_config *c) {
    const size_t n = (size_t)(c->n_ff > c->n_embd ? c->n_ff : c->n_embd);
    const size_t QD = (size_t)c->n_head * c->head_dim;
    const size_t nmax = n > QD ? n : QD;
    const size_t big = (size_t)c->n_ff * c->n_embd > QD * c->n_embd ? (size_t)c->n_ff * c->n_embd
                                                                     : QD * c->n_embd;
    lw->hperm = malloc(nmax * nmax * sizeof(double));
    lw->u = malloc(nmax * nmax * sizeof(float));
    lw->dead = malloc(nmax);
    lw->wperm = malloc(big * sizeof(float));
    lw->blocks = malloc(big / EBB_W4G64_GROUP * sizeof(struct ebb_block_w4g64));
    return lw->hperm && lw->u && lw->dead && lw->wperm && lw->blocks ? 0 : -1;
}

static void layer_work_free(struct layer_work *lw) {
    free(lw->hperm);
    free(lw->u);
    free(lw->dead);
    free(lw->wperm);
    free(lw->blocks);
}

/* Metadata: the source's keys verbatim (less the alignment, which this
 * writer fixes at 32), then ebb's. */
static void write_metadata(struct gguf_writer *gw, const struct model *m, const struct pack_options *o,
                           const char *calibration, const struct pack_result *r) {
    for (uint64_t i = 0; i < m->file.n_kv; i++) {
        const struct gguf_kv *kv = &m->file.kv[i];
        if (gguf_str_eq(kv->key, "general.alignment")) continue;
        gguf_writer_copy_kv(gw, kv);
    }
    if (o->format == PACK_BITSTACK) {   /* its own keys are pack_write_bitstack's */
        gguf_writer_set_str(gw, "ebb.calibration", calibration);
        return;
    }
    const int source = o->format == PACK_SOURCE;
    gguf_writer_set_str(gw, "ebb.format", source ? "source" : "w4a4");
    gguf_writer_set_u32(gw, "ebb.group_size", source ? EBB_ACT_BLOCK : EBB_W4G64_GROUP);
    gguf_writer_set_u32(gw, "ebb.act_bits", o->format == PACK_W4A16 ? 16u : (uint32_t)o->act_bits);
    gguf_writer_set_str(gw, "ebb.weight_quant", source ? "source" : o->weight_quant == PACK_GPTQ ? "gptq" : "rtn");
    gguf_writer_set_str(gw, "ebb.rotation", source ? "none" : "hadamard64-inputs");
    if (source && o->act_bits == 4) gguf_writer_set_str(gw, "ebb.act8_choice", o->act8_per_token ? "token" : "static");
    gguf_writer_set_str(gw, "ebb.calibration", calibration);
    gguf_writer_set_arr_u32(gw, "ebb.act8_groups", r->act8_groups, (size_t)r->n_layer * ACT_POINTS);
}

static void free_perms(int32_t ***perm_ffn, int n_layer) {
    if (*perm_ffn)
        for (int l = 0; l < n_layer; l++) free((*perm_ffn)[l]);
    free(*perm_ffn);
    *perm_ffn = NULL;
}

/* The SwiGLU permutations from absmax statistics of the unrotated model over
 * a quarter of the calibration windows (the loud channels show at once; the
 * Hessians come from the full second pass). */
static int choose_ffn_perms(struct model_run *run, const struct pack_options *o, const int32_t *windows,
                            int n_seqs, int32_t ***perm_ffn, char *err, size_t errlen) {
    const struct model_config *c = &model_run_model(run)->cfg;
    struct pack_calib pre;
    if (pack_calib_init(&pre, c, EBB_ACT_GROUP, 0)) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    const int n_pre = n_seqs >= 4 ? n_seqs / 4 : 1;
    if (pack_calibrate(run, &pre, windows, n_pre, o->calib_len, o->progress ? "outlier channels" : NULL, err,
                       errlen)) {
        pack_calib_free(&pre);
        return -1;
    }
    *perm_ffn = calloc((size_t)c->n_layer, sizeof(int32_t *));
    int bad = !*perm_ffn;
    for (int l = 0; l < c->n_layer && !bad; l++) {
        (*perm_ffn)[l] = malloc((size_t)c->n_ff * sizeof(int32_t));
        if (!(*perm_ffn)[l]) bad = 1;
        else bad = pack_order_by(pre.pt[l * ACT_POINTS + ACT_FFN_DOWN_IN].absmax, c->n_ff, (*perm_ffn)[l]);
    }
    pack_calib_free(&pre);
    if (bad) {
        free_perms(perm_ffn, c->n_layer);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

static void progress_layers(int done, int total, double elapsed) {
    char bar[31];
    int fill = (int)((long)done * 30 / total);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\rquantizing  [%s] %d/%d layers  %.0f s", bar, done, total, elapsed);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

/* The rotated model's weights requantized into gw: Q8_0 embedding (and
 * head), the layers' W4G64 matrices, a 4-bit head when asked. */
static int pack_requantize(struct gguf_writer *gw, const struct model *m, struct model_run *run,
                           const struct pack_calib *cal, const struct pack_options *o, struct layer_work *lw,
                           struct pack_result *r, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    if (layer_work_init(lw, c)) { snprintf(err, errlen, "out of memory"); return -1; }
    /* Tensors first (the act8 counts are known only afterwards), metadata
     * set at the end keeps its place in the file: the writer orders keys,
     * not calls. */
    size_t w4_bytes = 0, w4_elems = 0;
    if (pack_add_outer(gw, m, o->head_bits != 4, err, errlen)) return -1;
    const double tq = ebb_now_seconds();
    for (int l = 0; l < c->n_layer; l++) {
        if (pack_layer(m, model_run_pool(run), l, cal, o, gw, lw, r, &w4_bytes, &w4_elems, err, errlen)) return -1;
        if (o->progress) progress_layers(l + 1, c->n_layer, ebb_now_seconds() - tq);
    }
    if (o->head_bits == 4) {
        if (o->progress) fprintf(stderr, "ebb pack: output head at 4 bits\n");
        if (add_w4_head(gw, m, model_run_pool(run), cal, o, lw, err, errlen)) return -1;
    }
    r->linear_bpw = w4_elems ? 8.0 * (double)w4_bytes / (double)w4_elems : 0;
    return 0;
}

/* A file name as the label's UTF-8 line: at most 128 bytes, and any byte
 * that does not start a well-formed character (Linux names are bytes)
 * written as '?', so the loader never refuses the file for its name. */
static void label_name(char *dst, size_t cap, const char *name) {
    const size_t n = strlen(name);
    size_t o = 0;
    for (size_t i = 0; i < n && o + 4 < cap;) {
        const size_t len = utf8_seq_len(name + i, n - i);
        if (len == 0 || (unsigned char)name[i] < 0x20) {
            dst[o++] = '?';
            i++;
        } else {
            memcpy(dst + o, name + i, len);
            o += len;
            i += len;
        }
    }
    dst[o] = 0;
}

/* A stack's perplexity checkpoints, measured on the file just written --
 * on the evaluation text when the caller gives one (held out, so the
 * numbers compare with the packed variants' perplexities), else on the
 * first calibration windows -- then the file written again with them and
 * the name of what they scored: the metadata precedes the tensors, and the
 * writer still holds both. The measurement is deterministic, so the same
 * inputs give the same bytes. */
static int add_checkpoints(struct gguf_writer *gw, const struct model *m, const struct pack_options *o,
                           const int32_t *windows, int n_seqs, struct pack_result *r, char *err, size_t errlen) {
    /* What to score: the text's first windows of 512, or the calibration's. */
    int32_t *tokens = NULL;
    const int32_t *scored = windows;
    int n_win = o->bitstack_checkpoint_windows < n_seqs ? o->bitstack_checkpoint_windows : n_seqs, len = o->calib_len;
    char *label = r->checkpoint_text;
    if (o->checkpoint_text) {
        int n_tokens;
        if (perplexity_tokens(m, o->checkpoint_text, o->checkpoint_text_len, 512, o->bitstack_checkpoint_windows,
                              &tokens, &n_tokens, &n_win, err, errlen))
            return -1;
        char name[129];
        label_name(name, sizeof name, o->checkpoint_text_name);
        scored = tokens;
        len = 512;
        snprintf(label, sizeof r->checkpoint_text, "%s, %d window%s of 512", name, n_win, n_win == 1 ? "" : "s");
    } else {
        snprintf(label, sizeof r->checkpoint_text, "calibration (in-sample), %d window%s of %d", n_win,
                 n_win == 1 ? "" : "s", len);
    }
    const int rc = pack_bitstack_checkpoints(o->out_path, scored, n_win, len, tokenizer_bos_to_add(m->tok),
                                             o->bitstack_checkpoints, o->n_threads, o->progress, &r->checkpoint_bytes,
                                             &r->checkpoint_ppl, &r->n_checkpoints, err, errlen);
    free(tokens);
    if (rc) return -1;
    if (gguf_writer_set_arr_u64(gw, "ebb.bitstack.checkpoint_bytes", r->checkpoint_bytes, (size_t)r->n_checkpoints) ||
        gguf_writer_set_arr_f32(gw, "ebb.bitstack.checkpoint_ppl", r->checkpoint_ppl, (size_t)r->n_checkpoints) ||
        gguf_writer_set_str(gw, "ebb.bitstack.checkpoint_text", label)) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return gguf_writer_write(gw, o->out_path, err, errlen);
}

int pack_run(const struct pack_options *o, struct pack_result *r, char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    err[0] = 0;
    const double t0 = ebb_now_seconds();
    const int source = o->format == PACK_SOURCE, bitstack = o->format == PACK_BITSTACK;
    if (bitstack && (o->bitstack_levels < 0 || o->bitstack_levels > 64 || !(o->bitstack_rank_bits > 0) ||
                     o->bitstack_rank_bits > 4 || o->bitstack_checkpoints < 0 || o->bitstack_checkpoints > 4096 ||
                     o->bitstack_checkpoint_windows < 1 || (o->bitstack_base_bits != 0 && o->bitstack_base_bits != 2))) {
        snprintf(err, errlen, "bitstack levels must be 1 to 64, rank bits in (0, 4], checkpoints 0 to 4096 over at "
                              "least one window, base bits 0 or 2");
        return -1;
    }
    if (o->format != PACK_W4A16 && o->act_bits != 4 && o->act_bits != 8) {
        snprintf(err, errlen, "activation bits must be 4 or 8, not %d", o->act_bits);
        return -1;
    }
    if (o->calib_seqs < 1 || o->calib_len < 2) {
        snprintf(err, errlen, "bad calibration size %d x %d", o->calib_seqs, o->calib_len);
        return -1;
    }
    if (check_writable(o->out_path, err, errlen)) return -1;

    struct model m;
    char lerr[512];
    if (model_load(&m, o->model_path, MODEL_WEIGHTS_F32, lerr, sizeof lerr)) {
        snprintf(err, errlen, "%s", lerr);
        return -1;
    }
    struct model_run *run = model_run_new(&m, o->n_threads);
    if (!run) {
        snprintf(err, errlen, "out of memory or threads");
        model_free(&m);
        return -1;
    }
    const struct model_config *c = &m.cfg;
    int rc = -1;
    int32_t *windows = NULL;
    char *calibration = NULL;
    struct pack_calib cal = {0};
    struct gguf_writer *gw = NULL;
    struct layer_work lw = {0};
    int n_seqs = 0;
    int32_t **perm_ffn = NULL;

    if (gguf_find(&m.file, "ebb.format")) {
        snprintf(err, errlen, "%s is already a packed ebb variant", o->model_path);
        goto out;
    }
    if (source ? pack_check_source(&m, err, errlen) : pack_check_shapes(c, lerr, sizeof lerr)) {
        if (!source) snprintf(err, errlen, "%s: %s", o->model_path, lerr);
        goto out;
    }
    struct pack_options bo;   /* bitstack: the levels, once the source's size is known */
    if (bitstack) {
        bo = *o;
        if (!bo.bitstack_levels) {
            /* Enough levels to pass the source's bits per weight (BitStack's
             * own range ends there; the native file serves beyond it). */
            uint64_t bytes = 0, elems = 0;
            for (uint64_t i = 0; i < m.file.n_tensors; i++) {
                const struct gguf_tensor *t = &m.file.tensors[i];
                if (t->n_dims == 2 && !strncmp(t->name.ptr, "blk.", 4)) { bytes += t->nbytes; elems += t->n_elems; }
            }
            const double src_bpw = elems ? 8.0 * (double)bytes / (double)elems : 4.5;
            const double base_bpw = bo.bitstack_base_bits ? 8.0 * EBB_W2G64_BLOCK_BYTES / EBB_W2G64_GROUP : 0;
            const double above = src_bpw > base_bpw ? src_bpw - base_bpw : 0;
            bo.bitstack_levels = (int)(above / (1.0 + bo.bitstack_rank_bits)) + 1;
        }
        o = &bo;
    }
    /* GPTQ's Hessians: for the matrices of w4a4 and w4a16, and for a stack's base */
    const int need_hessian = !source && (!bitstack || o->bitstack_base_bits) && o->weight_quant == PACK_GPTQ;
    const int need_absmax = bitstack || (o->format != PACK_W4A16 && o->act_bits == 4);
    const int calibrate = need_hessian || need_absmax;
    if (calibrate) {
        if (o->calib_len > c->n_ctx_train) {
            snprintf(err, errlen, "calibration windows of %d tokens exceed the model's context of %d", o->calib_len,
                     c->n_ctx_train);
            goto out;
        }
        windows = load_windows(&m, o, &n_seqs, err, errlen);
        if (!windows) goto out;
        char *prov = pack_calib_provenance(o->calib_path);
        size_t len = (prov ? strlen(prov) : 0) + 160;
        calibration = malloc(len);
        if (calibration)
            snprintf(calibration, len, "%s; %d windows of %d tokens (%ld tokens), seed %llu",
                     prov ? prov : o->calib_path, n_seqs, o->calib_len, (long)n_seqs * o->calib_len,
                     (unsigned long long)o->seed);
        free(prov);
    } else {
        calibration = strdup("none (round-to-nearest weights, no activation statistics needed)");
    }
    if (!calibration) { snprintf(err, errlen, "out of memory"); goto out; }

    /* Mixed precision: a short first pass over the unrotated model finds
     * the loud channels of each SwiGLU output, which the rotation then keeps
     * together in the leading blocks. */
    if (!source && !bitstack) {
        if (need_absmax && choose_ffn_perms(run, o, windows, n_seqs, &perm_ffn, err, errlen)) goto out;
        if (o->progress) fprintf(stderr, "ebb pack: rotating (block-diagonal Hadamard 64)\n");
        if (pack_rotate_model(&m, perm_ffn, err, errlen)) goto out;
    }

    r->n_layer = c->n_layer;
    r->act8_groups = calloc((size_t)c->n_layer * ACT_POINTS, sizeof(uint32_t));
    r->act_groups = calloc((size_t)c->n_layer * ACT_POINTS, sizeof(uint32_t));
    if (!r->act8_groups || !r->act_groups) { snprintf(err, errlen, "out of memory"); goto out; }
    if (calibrate) {
        if (pack_calib_init(&cal, c, source ? EBB_ACT_BLOCK : EBB_ACT_GROUP, need_hessian)) {
            snprintf(err, errlen, "out of memory for the calibration statistics");
            goto out;
        }
        if (pack_calibrate(run, &cal, windows, n_seqs, o->calib_len, o->progress ? "calibrating" : NULL, err,
                           errlen))
            goto out;
        r->calib_tokens = cal.n_tokens;
    }

    gw = gguf_writer_new();
    if (!gw) { snprintf(err, errlen, "out of memory"); goto out; }
    if (bitstack) {
        if (pack_write_bitstack(gw, &m, &cal, model_run_pool(run), o, r, err, errlen)) goto out;
    } else if (source) {
        if (pack_write_source(gw, &m, calibrate ? &cal : NULL, o, r, err, errlen)) goto out;
    } else if (pack_requantize(gw, &m, run, calibrate ? &cal : NULL, o, &lw, r, err, errlen)) {
        goto out;
    }
    write_metadata(gw, &m, o, calibration, r);

    if (gguf_writer_write(gw, o->out_path, err, errlen)) goto out;
    if (bitstack && o->bitstack_checkpoints > 0 &&
        add_checkpoints(gw, &m, o, windows, n_seqs, r, err, errlen))
        goto out;
    r->file_bytes = gguf_writer_size(gw);
    uint64_t params = 0;
    for (uint64_t i = 0; i < m.file.n_tensors; i++) params += m.file.tensors[i].n_elems;
    r->bits_per_weight = params ? 8.0 * (double)r->file_bytes / (double)params : 0;
    r->seconds = ebb_now_seconds() - t0;
    rc = 0;
out:
    free_perms(&perm_ffn, c->n_layer);
    layer_work_free(&lw);
    gguf_writer_free(gw);
    pack_calib_free(&cal);
    free(windows);
    free(calibration);
    model_run_free(run);
    model_free(&m);
    if (rc) pack_result_free(r);
    return rc;
}
