/* The forward pass of a Llama-family model over a batch of tokens of one or
 * more sequences, each with its own KV cache.
 *
 * forward_layers() reads top to bottom like llama2.c's run.c: embed, then
 * per layer the attention block and the feed-forward block, each ending in
 * its residual add. Each matrix product covers the whole batch, so prefill
 * reads each weight once per chunk; `linear()` multiplies by whatever type a
 * matrix is stored in through the op table's per-type matmul. Attention is
 * split over (block of tokens, KV head) pairs on the worker pool; the
 * per-token steps between the products are split over token ranges for
 * prompt chunks.
 *
 * Everything a pass writes lives in the caller's `struct model_run`; the
 * model is only read, so one model can serve several runs (model.h).
 *
 * A model placed on a device (model_place) runs the same code: every
 * buffer an op touches is allocated from the backend (ebb_alloc), and the
 * host touches none of them. What the host computes -- the batch's token
 * ids, positions and RoPE angles -- goes up once per pass (ebb_upload), and
 * what it needs back -- logits, an embedding's rows -- comes down
 * (ebb_download); on the CPU those are plain copies. Ops queue in call
 * order, so a device run uses one thread: its workers would only contend
 * for the queue.
 */
#include "engine/model.h"

#include "engine/bitstack.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/formats.h"

/* A caller's run state: its workers and the scratch of a pass, sized for
 * MODEL_MAX_BATCH tokens (attention scratch and logits grow on demand). */
struct model_run {
    const struct model *m;
    struct ebb_pool *pool;
    act_capture_fn capture;    /* calibration hook, NULL normally */
    void *capture_ud;
    float *x;        /* [B][n_embd] residual stream */
    float *xb;       /* [B][n_embd] normed input */
    float *xb2;      /* [B][n_embd] a block's output, before it joins x */
    float *q;        /* [B][n_head*head_dim] */
    float *k, *v;    /* [B][n_head_kv*head_dim] */
    float *att;      /* [B][n_head*head_dim] attention output */
    float *gate, *up;/* [B][n_ff] */
    float *scores;   /* [n_workers][kv_attend_scratch(scores_ctx)]: kv_attend_block's scratch */
    float *rope_cos, *rope_sin; /* [B][rope_dim/2] */
    float *rope_host;           /* a device's: [2][B][rope_dim/2], the angles made on the host */
    int32_t *ids;               /* a device's: [B] the batch's token ids in its memory (get_rows) */
    float *host_row;            /* [n_embd] a row brought back (embeddings) */
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
    unsigned forms_ready;      /* 1 << enum ebb_act_form: the forms r->ax is in now */
    struct native_form {       /* r->ax quantized for the GGUF types (EBB_ACT_Q8B32, Q8K) */
        int8_t *q;             /* [B][widest] codes */
        float *d;              /* [B][widest/32] scales */
        int16_t *sums;         /* [B][widest/16] code sums */
    } b32, k256;
    int head_rows_cap;
    struct bitstack_scratch *stack_scratch;   /* BitStack models' sign-product scratch */
    int failed;                /* out of memory inside a pass */
};

/* The buffers the ops touch, in the backend's memory. */
#define RUN_OP_BUFFERS(X) X(x) X(xb) X(xb2) X(q) X(k) X(v) X(att) X(gate) X(up) X(scores) X(rope_cos) X(rope_sin) \
    X(ids) X(logits) X(xp) X(aq) X(as) X(b32.q) X(b32.d) X(b32.sums) X(k256.q) X(k256.d) X(k256.sums)

void model_run_free(struct model_run *r) {
    if (!r) return;
    const struct ebb_backend *be = r->m->be;
#define RELEASE(f) ebb_release(be, r->f);
    RUN_OP_BUFFERS(RELEASE)
#undef RELEASE
    free(r->rope_host); free(r->host_row); free(r->tok_kv); free(r->tok_pos); free(r->tok_id); free(r->blocks);
    bitstack_scratch_free(r->stack_scratch);
    if (r->pool) ebb_pool_destroy(r->pool);
    free(r);
}

struct model_run *model_run_new(const struct model *m, int n_threads) {
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    struct model_run *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->m = m;
    r->pool = ebb_pool_create(be->memory ? 1 : n_threads);
    const size_t B = MODEL_MAX_BATCH, QD = (size_t)c->n_head * c->head_dim;
    const size_t KD = (size_t)c->n_head_kv * c->head_dim;
    const size_t widest = QD > (size_t)c->n_embd ? QD : (size_t)c->n_embd;
    const size_t half = (size_t)c->rope_dim / 2 + 1;
    r->x = ebb_alloc(be, B * c->n_embd * sizeof(float));
    r->xb = ebb_alloc(be, B * widest * sizeof(float));
    r->xb2 = ebb_alloc(be, B * c->n_embd * sizeof(float));
    r->q = ebb_alloc(be, B * QD * sizeof(float));
    r->k = ebb_alloc(be, B * KD * sizeof(float));
    r->v = ebb_alloc(be, B * KD * sizeof(float));
    r->att = ebb_alloc(be, B * QD * sizeof(float));
    r->gate = ebb_alloc(be, B * c->n_ff * sizeof(float));
    r->up = ebb_alloc(be, B * c->n_ff * sizeof(float));
    r->rope_cos = ebb_alloc(be, B * half * sizeof(float));
    r->rope_sin = ebb_alloc(be, B * half * sizeof(float));
    if (be->memory) {   /* what the host makes goes up from here; on the CPU it is made in place */
        r->ids = ebb_alloc(be, B * sizeof *r->ids);
        r->rope_host = malloc(2 * B * half * sizeof(float));
    }
    r->host_row = malloc((size_t)c->n_embd * sizeof(float));
    r->tok_kv = malloc(B * sizeof *r->tok_kv);
    r->tok_pos = malloc(B * sizeof *r->tok_pos);
    r->tok_id = malloc(B * sizeof *r->tok_id);
    r->blocks = malloc(B * sizeof *r->blocks);
    const size_t act_w = widest > (size_t)c->n_ff ? widest : (size_t)c->n_ff;
    r->xp = ebb_alloc(be, B * act_w * sizeof(float));
    r->aq = ebb_alloc(be, B * act_w);
    r->as = ebb_alloc(be, B * (act_w / 64 + 1) * sizeof(float));
    struct native_form *forms[2] = {&r->b32, &r->k256};
    int forms_ok = 1;
    for (int f = 0; f < 2; f++) {
        forms[f]->q = ebb_alloc(be, B * act_w);
        forms[f]->d = ebb_alloc(be, B * (act_w / 32 + 1) * sizeof(float));
        forms[f]->sums = ebb_alloc(be, B * (act_w / 16 + 1) * sizeof(int16_t));
        forms_ok &= forms[f]->q && forms[f]->d && forms[f]->sums;
    }
    if (!forms_ok || !r->pool || !r->xp || !r->aq || !r->as || !r->x || !r->xb || !r->xb2 || !r->q || !r->k || !r->v ||
        !r->att || !r->gate || !r->up || !r->rope_cos || !r->rope_sin || (be->memory && (!r->ids || !r->rope_host)) || !r->host_row ||
        !r->tok_kv || !r->tok_pos || !r->tok_id || !r->blocks) {
        model_run_free(r);
        return NULL;
    }
    return r;
}

const struct model *model_run_model(const struct model_run *r) { return r->m; }

struct ebb_pool *model_run_pool(struct model_run *r) { return r->pool; }

void model_run_set_capture(struct model_run *r, act_capture_fn fn, void *ud) {
    r->capture = fn;
    r->capture_ud = ud;
}

/* Attention scratch grows to the longest cache the run has served, the
 * logits buffer to the most head rows of a multi-sequence batch. */
static int run_reserve(struct model_run *r, int max_ctx, int head_rows) {
    const struct model_config *c = &r->m->cfg;
    const struct ebb_backend *be = r->m->be;
    if (r->scores_ctx < max_ctx) {
        ebb_release(be, r->scores);
        r->scores = ebb_alloc(be, (size_t)ebb_pool_threads(r->pool) * kv_attend_scratch(c, max_ctx) * sizeof(float));
        r->scores_ctx = r->scores ? max_ctx : 0;
        if (!r->scores) return -1;
    }
    if (r->head_rows_cap < head_rows) {
        ebb_release(be, r->logits);
        r->logits = ebb_alloc(be, (size_t)head_rows * c->n_vocab * sizeof(float));
        r->head_rows_cap = r->logits ? head_rows : 0;
        if (!r->logits) return -1;
    }
    return 0;
}

/* cos/sin of every token's own position (tokens of different sequences sit at
 * different positions), made on the host; a device gets them and the
 * batch's token ids sent. */
static int send_batch(struct model_run *r, int n_tok) {
    const struct model *m = r->m;
    const int half = m->cfg.rope_dim / 2;
    float *cos_h = m->be->memory ? r->rope_host : r->rope_cos;
    float *sin_h = m->be->memory ? r->rope_host + (size_t)n_tok * half : r->rope_sin;
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < half; i++) {
            float theta = (float)r->tok_pos[t] * m->rope_inv_freq[i];
            cos_h[t * half + i] = cosf(theta);
            sin_h[t * half + i] = sinf(theta);
        }
    if (!m->be->memory) return 0;
    const size_t angles = (size_t)n_tok * half * sizeof(float);
    return ebb_upload(m->be, r->rope_cos, cos_h, angles) || ebb_upload(m->be, r->rope_sin, sin_h, angles) ||
           ebb_upload(m->be, r->ids, r->tok_id, (size_t)n_tok * sizeof *r->ids);
}

/* Rotates every head of token t's Q or K vector in place (the op table's
 * RoPE, with the angles rope_tables made). */
static void rope_apply(const struct model_run *r, float *vec, int n_heads, int t) {
    const struct model_config *c = &r->m->cfg;
    const int half = c->rope_dim / 2;
    r->m->be->rope_f32(vec, 0, 1, n_heads, c->head_dim, c->rope_dim, c->rope_style == ROPE_NEOX,
                       r->rope_cos + (size_t)t * half, r->rope_sin + (size_t)t * half);
}

/* Attention runs in blocks: up to kv_block_tokens() consecutive tokens of
 * one sequence with the query heads of one KV head (engine/kv.c), so a long
 * prompt converts each cached page once per block instead of once per
 * query. The blocks of a batch (r->blocks: first token and length) times
 * the KV heads are the work items; workers claim them one by one, the last
 * tokens' (longest) first. */
struct attn_job {
    struct model_run *r;
    int layer, n_items;
    atomic_int next;
};

static void attention_task(void *arg, int part, int n_parts) {
    (void)n_parts;
    struct attn_job *j = arg;
    const struct model_run *r = j->r;
    const struct model_config *c = &r->m->cfg;
    const int hd = c->head_dim, group = c->n_head / c->n_head_kv, QD = c->n_head * hd;
    float *scratch = r->scores + (size_t)part * kv_attend_scratch(c, r->scores_ctx);
    const float scale = 1.0f / sqrtf((float)hd);
    for (int i; (i = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        const int item = j->n_items - 1 - i, kvh = item % c->n_head_kv;
        const int t0 = r->blocks[item / c->n_head_kv][0], n = r->blocks[item / c->n_head_kv][1];
        const size_t at = (size_t)t0 * QD + (size_t)kvh * group * hd;
        kv_attend_block(r->tok_kv[t0], r->m->be, j->layer, kvh, r->q + at, r->att + at, (size_t)QD, n, group,
                        r->tok_pos[t0], scale, scratch);
    }
}

static void attention(struct model_run *r, int layer, int n_blocks) {
    struct attn_job job = {r, layer, n_blocks * r->m->cfg.n_head_kv, 0};
    ebb_pool_run(r->pool, attention_task, &job, ebb_pool_threads(r->pool));
}

/* Cuts the batch's runs of tokens of one sequence into attention blocks. */
static int attention_blocks(struct model_run *r, int n_tok) {
    const int max_len = kv_block_tokens(&r->m->cfg);
    int n = 0;
    for (int t = 0; t < n_tok;) {
        int len = 1;
        while (t + len < n_tok && len < max_len && r->tok_kv[t + len] == r->tok_kv[t]) len++;
        r->blocks[n][0] = t;
        r->blocks[n][1] = len;
        n++;
        t += len;
    }
    return n;
}

static void add_bias(const struct ebb_backend *be, float *x, const float *bias, int n_tok, int n) {
    if (!bias) return;
    for (int t = 0; t < n_tok; t++) be->add_f32(x + (size_t)t * n, bias, n);
}

/* x += the block's output: one elementwise add over the batch. */
static void residual_add(struct model_run *r, int n_tok) {
    r->m->be->add_f32(r->x, r->xb2, n_tok * r->m->cfg.n_embd);
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
    STEP_NORM,        /* xb = rmsnorm(x) * gain [; H64] */
    STEP_ACT,         /* permute and quantize an activation for the next products */
    STEP_ROPE_STORE,  /* RoPE on q and k, then k and v into each token's cache */
    STEP_SWIGLU,      /* gate = silu(gate) * up [; H64] */
};

struct token_job {
    struct model_run *r;
    const struct layer_weights *w;
    enum token_step step;
    int layer, n_tok;
    const float *gain;         /* STEP_NORM */
    enum act_point point;      /* STEP_ACT */
    const float *x;
    int n;
};

static void act_token(const struct token_job *j, int t);

static void token_range(void *arg, int part, int n_parts) {
    const struct token_job *j = arg;
    struct model_run *r = j->r;
    const struct model *m = r->m;
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    const int t0 = (int)((long)j->n_tok * part / n_parts), t1 = (int)((long)j->n_tok * (part + 1) / n_parts);
    const int E = c->n_embd, F = c->n_ff, QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    for (int t = t0; t < t1; t++) {
        switch (j->step) {
        case STEP_NORM: {
            float *xb = r->xb + (size_t)t * E;
            be->rmsnorm_f32(xb, r->x + (size_t)t * E, j->gain, E, c->rms_eps);
            if (m->hadamard_norm_out) be->hadamard64(xb, E);
            break;
        }
        case STEP_ROPE_STORE:
            rope_apply(r, r->q + (size_t)t * QD, c->n_head, t);
            rope_apply(r, r->k + (size_t)t * KD, c->n_head_kv, t);
            kv_store(r->tok_kv[t], be, j->layer, r->tok_pos[t], r->k + (size_t)t * KD, r->v + (size_t)t * KD);
            kv_observe_query(r->tok_kv[t], j->layer, r->tok_pos[t], r->q + (size_t)t * QD);   /* compression */
            break;
        case STEP_SWIGLU:
            be->swiglu_f32(r->gate + (size_t)t * F, r->up + (size_t)t * F, F);
            if (m->hadamard_ffn_down) be->hadamard64(r->gate + (size_t)t * F, F);
            break;
        case STEP_ACT:
            act_token(j, t);
            break;
        }
    }
}

static void for_tokens(struct token_job *j) {
    if (j->n_tok < PARALLEL_MIN_TOKENS) token_range(j, 0, 1);
    else ebb_pool_run(j->r->pool, token_range, j, ebb_pool_threads(j->r->pool));
}

static void run_step(struct model_run *r, const struct layer_weights *w, int layer, enum token_step step,
                     const float *gain, int n_tok) {
    struct token_job j = {.r = r, .w = w, .step = step, .layer = layer, .n_tok = n_tok, .gain = gain};
    for_tokens(&j);
}

/* Permutes token t of an activation into r->xp (a packed model's weights
 * had their input columns permuted the same way) and, on the integer path,
 * quantizes its groups, the first n_hi at 8 bits. A sink position (the
 * first KV_SINK_TOKENS of a sequence) is quantized with every group at 8
 * bits: every later token attends to it, so the error of its keys and
 * values would reach them all. It depends on the position only, so
 * batching does not change results. */
static void act_token(const struct token_job *j, int t) {
    struct model_run *r = j->r;
    const struct model *m = r->m;
    const int n = j->n, groups = n / m->act_group;
    const int32_t *perm = j->w->perm[j->point];
    const float *src = j->x + (size_t)t * n;
    float *dst = r->xp + (size_t)t * n;
    m->be->permute_f32(dst, src, perm, 1, n);
    if (m->act_bits == 16) return;
    const int n_hi = r->tok_pos[t] < KV_SINK_TOKENS ? groups : j->w->n_hi[j->point];
    if (m->act_form == EBB_ACT_Q8B32) {
        const size_t blocks = (size_t)t * (n / EBB_ACT_BLOCK);
        if (m->act8_per_token)   /* a source-exact file: each token's loudest blocks at 8 bits */
            m->be->quantize_q8b32_loudest(dst, n, n_hi, r->b32.q + (size_t)t * n, r->b32.d + blocks,
                                          r->b32.sums + blocks);
        else
            m->be->quantize_q8b32(dst, n, n_hi, r->b32.q + (size_t)t * n, r->b32.d + blocks, r->b32.sums + blocks);
    } else {
        m->be->quantize_act(dst, 1, n, n_hi, r->aq + (size_t)t * n, r->as + (size_t)t * groups);
    }
}

/* Readies the input of one activation point for the linear layers that read
 * it: a plain model uses x as it is; a packed model permutes and quantizes
 * it (act_token). */
static void act_prepare(struct model_run *r, const struct layer_weights *w, enum act_point p, const float *x,
                        int n_tok, int n) {
    const struct model *m = r->m;
    if (r->capture) r->capture(r->capture_ud, (int)(w - m->layers), p, x, n_tok, n);
    r->forms_ready = 1u << EBB_ACT_F32;
    if (!m->act_bits) {
        r->ax = x;
        return;
    }
    struct token_job j = {.r = r, .w = w, .step = STEP_ACT, .n_tok = n_tok, .point = p, .x = x, .n = n};
    for_tokens(&j);
    r->ax = r->xp;
    if (m->act_bits != 16) r->forms_ready |= 1u << m->act_form;
}

/* Quantizes the prepared activation (n_tok rows of n) into a GGUF type's
 * form, once per activation point whatever the number of matrices that
 * read it. */
static void native_form(struct model_run *r, enum ebb_act_form form, int n_tok, int n) {
    const struct ebb_backend *be = r->m->be;
    struct native_form *f = form == EBB_ACT_Q8K ? &r->k256 : &r->b32;
    const int per_d = form == EBB_ACT_Q8K ? 256 : 32, per_sum = form == EBB_ACT_Q8K ? 16 : 32;
    for (int t = 0; t < n_tok; t++) {
        const size_t at = (size_t)t * n;
        if (form == EBB_ACT_Q8K) be->quantize_q8k(r->ax + at, n, f->q + at, f->d + at / per_d, f->sums + at / per_sum);
        else be->quantize_q8b32(r->ax + at, n, n / per_d, f->q + at, f->d + at / per_d, f->sums + at / per_sum);
    }
    r->forms_ready |= 1u << form;
}

/* out = the prepared activation times w's stored rows: the op table's
 * product for their type, reading the activation form that type names
 * (kernels/formats.h). */
static void product(struct model_run *r, float *out, const struct matrix *w, int n_tok) {
    const enum ebb_act_form form = ebb_type_info(w->type)->act;
    struct ebb_act x = {.f = r->ax, .q = r->aq, .s = r->as};
    if (form == EBB_ACT_Q8B32 || form == EBB_ACT_Q8K) {
        if (!(r->forms_ready & 1u << form)) native_form(r, form, n_tok, w->n_in);
        const struct native_form *f = form == EBB_ACT_Q8K ? &r->k256 : &r->b32;
        x = (struct ebb_act){.q = f->q, .s = f->d, .sums = f->sums};
    }
    r->m->be->matmul[w->type](r->pool, out, &x, w->data, n_tok, w->n_in, w->n_out);
}

/* out = the prepared activation times w. A BitStack matrix used in place
 * adds its resident blocks' share (f32 activations, engine/bitstack.h) to
 * its base's product, or to zero when it has no base (data NULL). */
static void linear(struct model_run *r, float *out, const struct matrix *w, int n_tok) {
    if (w->data) product(r, out, w, n_tok);
    else memset(out, 0, (size_t)n_tok * w->n_out * sizeof *out);
    if (w->stack && bitstack_linear(r->m->be, r->pool, &r->stack_scratch, w->stack, r->ax, n_tok, out)) r->failed = 1;
}

/* The transformer over the n_tok tokens laid out in r->tok_*; leaves the
 * final residual stream in r->x. */
static void forward_layers(struct model_run *r, int n_tok) {
    const struct model *m = r->m;
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    const int E = c->n_embd, F = c->n_ff, QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;

    be->get_rows(r->x, m->embd.data, m->embd.type, be->memory ? r->ids : r->tok_id, n_tok, E);   /* the embeddings */
    const int n_blocks = attention_blocks(r, n_tok);

    for (int l = 0; l < c->n_layer; l++) {
        const struct layer_weights *w = &m->layers[l];

        /* attention */
        run_step(r, w, l, STEP_NORM, w->attn_norm, n_tok);
        act_prepare(r, w, ACT_ATTN_IN, r->xb, n_tok, E);
        linear(r, r->q, &w->wq, n_tok);
        linear(r, r->k, &w->wk, n_tok);
        linear(r, r->v, &w->wv, n_tok);
        add_bias(be, r->q, w->bq, n_tok, QD);
        add_bias(be, r->k, w->bk, n_tok, KD);
        add_bias(be, r->v, w->bv, n_tok, KD);
        run_step(r, w, l, STEP_ROPE_STORE, NULL, n_tok);
        attention(r, l, n_blocks);
        act_prepare(r, w, ACT_ATTN_OUT, r->att, n_tok, QD);
        linear(r, r->xb2, &w->wo, n_tok);
        residual_add(r, n_tok);

        /* feed-forward */
        run_step(r, w, l, STEP_NORM, w->ffn_norm, n_tok);
        act_prepare(r, w, ACT_FFN_IN, r->xb, n_tok, E);
        linear(r, r->gate, &w->w_gate, n_tok);
        linear(r, r->up, &w->w_up, n_tok);
        run_step(r, w, l, STEP_SWIGLU, NULL, n_tok);
        act_prepare(r, w, ACT_FFN_DOWN_IN, r->gate, n_tok, F);
        linear(r, r->xb2, &w->w_down, n_tok);
        residual_add(r, n_tok);
    }
}

/* Calibration: every token's head input, to the capture hook (model.h):
 * the final norm, rotated as the layers' norm outputs are. */
static void capture_head_input(struct model_run *r, int n_tok) {
    run_step(r, NULL, 0, STEP_NORM, r->m->output_norm, n_tok);
    r->capture(r->capture_ud, r->m->cfg.n_layer, ACT_ATTN_IN, r->xb, n_tok, r->m->cfg.n_embd);
}

/* Embeddings: each token's final norm, brought back and added to its
 * sequence's sum. Runs before the head, which reuses xb. */
static int sum_final_hidden(struct model_run *r, const struct batch_seq *seqs, int n_seqs) {
    const struct model *m = r->m;
    const int E = m->cfg.n_embd;
    int t = 0;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        for (int k = 0; q->embed_sum && k < q->n_tok; k++) {
            m->be->rmsnorm_f32(r->xb, r->x + (size_t)(t + k) * E, m->output_norm, E, m->cfg.rms_eps);
            if (ebb_download(m->be, r->host_row, r->xb, (size_t)E * sizeof(float))) return -1;
            for (int e = 0; e < E; e++) q->embed_sum[e] += r->host_row[e];
        }
        t += q->n_tok;
    }
    return 0;
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
static int forward_head(struct model_run *r, struct batch_seq *seqs, int n_seqs, int rows) {
    const struct model *m = r->m;
    const struct model_config *c = &m->cfg;
    const struct ebb_backend *be = m->be;
    const int E = c->n_embd;
    int row = 0, t = 0;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (q->logits) {
            int first = q->all_logits ? 0 : q->n_tok - 1;
            for (int k = first; k < q->n_tok; k++, row++)
                be->rmsnorm_f32(r->xb + (size_t)row * E, r->x + (size_t)(t + k) * E, m->output_norm, E, c->rms_eps);
        }
        t += q->n_tok;
    }
    /* An integer head reads every activation group at 8 bits; a W4G64 head
     * reads its input rotated. */
    if (m->hadamard_head) be->hadamard64(r->xb, rows * E);
    r->ax = r->xb;
    r->forms_ready = 1u << EBB_ACT_F32;
    if (ebb_type_info(m->output.type)->act == EBB_ACT_Q8G64) {
        be->quantize_act(r->xb, rows, E, E / EBB_ACT_GROUP, r->aq, r->as);
        r->forms_ready |= 1u << EBB_ACT_Q8G64;
    }
    /* A single sequence on the host writes straight into its buffer. */
    const int direct = n_seqs == 1 && !be->memory;
    linear(r, direct ? seqs[0].logits : r->logits, &m->output, rows);
    if (direct) return 0;
    row = 0;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (!q->logits) continue;
        int n = q->all_logits ? q->n_tok : 1;
        if (ebb_download(be, q->logits, r->logits + (size_t)row * c->n_vocab, (size_t)n * c->n_vocab * sizeof(float)))
            return -1;
        row += n;
    }
    return 0;
}

int model_forward_batch(struct model_run *r, struct batch_seq *seqs, int n_seqs) {
    const struct model *m = r->m;
    int n_tok = 0, max_ctx = 1;
    for (int i = 0; i < n_seqs; i++) {
        const struct batch_seq *q = &seqs[i];
        if (q->n_tok <= 0 || q->n_tok > q->kv->n_ctx - q->kv->n_past) return -1;
        for (int k = 0; k < q->n_tok; k++)
            if (q->tokens[k] < 0 || q->tokens[k] >= m->cfg.n_vocab) return -1;
        for (int j = 0; j < i; j++)
            if (seqs[j].kv == q->kv) return -1;   /* a sequence appears once per batch */
        if (q->kv->be->memory != m->be->memory) return -1;   /* its cache is where the model is */
        n_tok += q->n_tok;
        if (q->kv->n_past + q->n_tok > max_ctx) max_ctx = q->kv->n_past + q->n_tok;
    }
    if (n_tok == 0 || n_tok > MODEL_MAX_BATCH) return -1;
    const int rows = head_row_count(seqs, n_seqs);
    if (run_reserve(r, max_ctx, n_seqs > 1 || m->be->memory ? rows : 0)) return -1;
    for (int i = 0; i < n_seqs; i++)
        if (kv_cache_ensure(seqs[i].kv, seqs[i].kv->n_past + seqs[i].n_tok)) return -1;

    int t = 0;
    for (int i = 0; i < n_seqs; i++)
        for (int k = 0; k < seqs[i].n_tok; k++, t++) {
            r->tok_kv[t] = seqs[i].kv;
            r->tok_pos[t] = seqs[i].kv->n_past + k;
            r->tok_id[t] = seqs[i].tokens[k];
        }
    if (send_batch(r, n_tok)) return -1;
    r->failed = 0;
    forward_layers(r, n_tok);
    if (r->failed) return -1;   /* scratch could not grow: nothing stored counts */
    if (r->capture) capture_head_input(r, n_tok);
    for (int i = 0; i < n_seqs; i++) seqs[i].kv->n_past += seqs[i].n_tok;
    /* A device that fails here has lost its state; the caller sees -1. */
    if (sum_final_hidden(r, seqs, n_seqs)) return -1;
    if (rows && forward_head(r, seqs, n_seqs, rows)) return -1;
    if (m->be->memory && m->be->memory->sync()) return -1;
    return 0;
}

const char *model_run_failure(const struct model_run *r) {
    const struct ebb_backend_memory *mem = r->m->be->memory;
    return mem ? mem->error() : "out of memory";
}

int model_forward(struct model_run *r, struct kv_cache *kv, const int32_t *tokens, int n_tok, float *logits,
                  int all_logits) {
    if (n_tok <= 0 || n_tok > kv->n_ctx - kv->n_past) return -1;
    const int n_vocab = r->m->cfg.n_vocab;
    for (int done = 0; done < n_tok;) {
        int n = n_tok - done < MODEL_MAX_BATCH ? n_tok - done : MODEL_MAX_BATCH;
        struct batch_seq seq = {kv, tokens + done, n, NULL, all_logits, NULL};
        if (all_logits) seq.logits = logits + (size_t)done * n_vocab;
        else if (done + n == n_tok) seq.logits = logits;
        if (model_forward_batch(r, &seq, 1)) return -1;
        done += n;
    }
    return 0;
}
