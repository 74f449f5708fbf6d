/* Source-exact variants (`ebb pack --format source`): a 4-bit source's own
 * blocks kept bit for bit; only the activations are quantized.
 *
 * Requantizing a file that is already 4-bit (the rotated GPTQ variants of
 * pack.c) rounds its weights a second time and costs perplexity before any
 * activation is touched. COMET's FMPQ needs no rotation: its weights are
 * plain 4-bit groups and only the activations are split into 4- and 8-bit
 * channel groups. A Q4_0 or Q4_1 source already is such weights (blocks of
 * 32 with a scale, and a minimum for Q4_1), so this variant keeps them:
 *
 *   - per activation point, the blocks of 32 input channels are ranked by
 *     their 4-bit noise (calibration: the group maximum squared over the
 *     activation's energy, outliers.c, with groups of 32) and reordered so
 *     the noisiest lead; every matrix that reads the point gets the same
 *     order of its row's blocks. Whole blocks move, with their scales and
 *     minimums, so every code keeps its value: the file holds the source's
 *     blocks, permuted.
 *   - the engine permutes the activation to match (the `.perm` tensors) and
 *     quantizes it per token in blocks of 32, the first n_hi at 8 bits and
 *     the rest at 4 (W4A4; the layer's 8-bit budget as for w4a4 files), or
 *     all at 8 (W4A8, with identity orders: exactly the source served
 *     natively, which reads its activations in the same 8-bit blocks).
 *   - or (`ebb.act8_choice = "token"`, the default) the engine gives 8 bits
 *     to each token's own n_hi loudest blocks: outliers move from token to
 *     token, and on the held-out text this beat the fixed choice at every
 *     budget (docs/benchmarks.md). Calibration then only splits each
 *     layer's budget among its four points, and the orders stay identity.
 *
 * Everything else (embedding, head, norms, tokenizer, metadata) is the
 * source's, copied. On a CPU the permutation only decides which blocks are
 * 8-bit (every block is an int8 product either way); on a GPU it makes the
 * 8-bit blocks one contiguous range, as COMET's kernels want.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage/gguf_write.h"
#include "tools/pack/pack.h"


/* The activation point a layer tensor's suffix reads, or -1 for tensors
 * that are not one of the seven matrices. */
static int point_of(const char *suffix) {
    static const struct {
        const char *name;
        int point;
    } matrices[] = {
        {"attn_q.weight", ACT_ATTN_IN},     {"attn_k.weight", ACT_ATTN_IN},    {"attn_v.weight", ACT_ATTN_IN},
        {"attn_output.weight", ACT_ATTN_OUT}, {"ffn_gate.weight", ACT_FFN_IN}, {"ffn_up.weight", ACT_FFN_IN},
        {"ffn_down.weight", ACT_FFN_DOWN_IN},
    };
    for (size_t i = 0; i < sizeof matrices / sizeof *matrices; i++)
        if (!strcmp(suffix, matrices[i].name)) return matrices[i].point;
    return -1;
}

/* A tensor's layer and activation point when it is a layer matrix; -1 otherwise. */
static int layer_matrix(const struct gguf_tensor *t, int n_layer, int *layer) {
    char name[128], suffix[96];
    if (t->name.len >= sizeof name) return -1;
    memcpy(name, t->name.ptr, t->name.len);
    name[t->name.len] = 0;
    int l, used = 0;
    if (sscanf(name, "blk.%d.%95s%n", &l, suffix, &used) != 2 || name[used] || l < 0 || l >= n_layer) return -1;
    *layer = l;
    return point_of(suffix);
}

int pack_check_source(const struct model *m, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    if (c->n_embd % EBB_ACT_BLOCK || c->n_ff % EBB_ACT_BLOCK || (c->n_head * c->head_dim) % EBB_ACT_BLOCK) {
        snprintf(err, errlen, "%s: widths must be multiples of %d", m->file.path, EBB_ACT_BLOCK);
        return -1;
    }
    int matrices = 0;
    for (uint64_t i = 0; i < m->file.n_tensors; i++) {
        const struct gguf_tensor *t = &m->file.tensors[i];
        int l;
        if (layer_matrix(t, c->n_layer, &l) < 0) continue;
        matrices++;
        const struct ebb_type_info *ti = ebb_type_info(t->type);
        if (!ti || ti->act != EBB_ACT_Q8B32) {
            snprintf(err, errlen,
                     "%s: tensor '%.*s' is %s; a source-exact variant keeps blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1 "
                     "or Q8_0) and this file's are not (serve it natively, or pack --format w4a4)",
                     m->file.path, (int)t->name.len, t->name.ptr, ti ? ti->name : "of an unknown type");
            return -1;
        }
    }
    if (matrices != 7 * c->n_layer) {
        snprintf(err, errlen, "%s: found %d layer matrices, expected %d", m->file.path, matrices, 7 * c->n_layer);
        return -1;
    }
    return 0;
}

/* rows of a matrix with its blocks of 32 inputs in the order of perm (a
 * block permutation of n_in channels): dst block b is src block perm[32 b] / 32. */
static void permute_blocks(const uint8_t *src, uint8_t *dst, size_t rows, int n_in, size_t block_bytes,
                           const int32_t *perm) {
    const int blocks = n_in / EBB_ACT_BLOCK;
    const size_t row_bytes = (size_t)blocks * block_bytes;
    for (size_t o = 0; o < rows; o++)
        for (int b = 0; b < blocks; b++)
            memcpy(dst + o * row_bytes + (size_t)b * block_bytes,
                   src + o * row_bytes + (size_t)(perm[b * EBB_ACT_BLOCK] / EBB_ACT_BLOCK) * block_bytes, block_bytes);
}

int pack_write_source(struct gguf_writer *gw, const struct model *m, const struct pack_calib *cal,
                      const struct pack_options *o, struct pack_result *r, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int L = c->n_layer;
    int32_t **perm = calloc((size_t)L * ACT_POINTS, sizeof *perm);
    uint8_t *scratch = NULL;
    size_t scratch_bytes = 0;
    uint64_t linear_bytes = 0, linear_elems = 0;
    int rc = -1;
    if (!perm) goto oom;
    /* Block orders and 8-bit counts, layer by layer. */
    for (int l = 0; l < L; l++) {
        int n_hi[ACT_POINTS];
        for (int p = 0; p < ACT_POINTS; p++) {
            const int n = act_point_width(c, (enum act_point)p);
            int32_t *q = perm[l * ACT_POINTS + p] = malloc((size_t)n * sizeof(int32_t));
            if (!q) goto oom;
            for (int i = 0; i < n; i++) q[i] = i;
            n_hi[p] = n / EBB_ACT_BLOCK;
        }
        if (o->act_bits == 4 && pack_choose_act8(cal, l, o->act8_share, perm + l * ACT_POINTS, n_hi)) goto oom;
        /* Chosen per token, the 8-bit blocks need no place of their own:
         * the calibration only splits the layer's budget among its points. */
        for (int p = 0; p < ACT_POINTS && o->act8_per_token; p++)
            for (int i = 0; i < act_point_width(c, (enum act_point)p); i++) perm[l * ACT_POINTS + p][i] = i;
        for (int p = 0; p < ACT_POINTS; p++) {
            r->act8_groups[l * ACT_POINTS + p] = (uint32_t)n_hi[p];
            r->act_groups[l * ACT_POINTS + p] = (uint32_t)(act_point_width(c, (enum act_point)p) / EBB_ACT_BLOCK);
        }
    }
    /* The source's tensors in its order, layer matrices with their blocks
     * permuted. */
    for (uint64_t i = 0; i < m->file.n_tensors; i++) {
        const struct gguf_tensor *t = &m->file.tensors[i];
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        int l;
        const int p = layer_matrix(t, L, &l);
        const void *data = t->data;
        if (p >= 0) {
            if (t->nbytes > scratch_bytes) {
                free(scratch);
                scratch_bytes = (size_t)t->nbytes;
                scratch = malloc(scratch_bytes);
                if (!scratch) goto oom;
            }
            permute_blocks(t->data, scratch, (size_t)t->ne[1], (int)t->ne[0], ebb_type_info(t->type)->block_bytes,
                           perm[l * ACT_POINTS + p]);
            data = scratch;
            linear_bytes += t->nbytes;
            linear_elems += t->n_elems;
        }
        if (gguf_writer_add_tensor(gw, name, t->type, t->n_dims, t->ne, data, (size_t)t->nbytes)) goto oom;
    }
    for (int l = 0; l < L; l++)
        for (int p = 0; p < ACT_POINTS; p++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s.perm", l, act_point_name((enum act_point)p));
            const uint64_t ne[1] = {(uint64_t)act_point_width(c, (enum act_point)p)};
            if (gguf_writer_add_tensor(gw, name, EBB_TYPE_I32, 1, ne, perm[l * ACT_POINTS + p],
                                       (size_t)ne[0] * sizeof(int32_t)))
                goto oom;
        }
    r->linear_bpw = linear_elems ? 8.0 * (double)linear_bytes / (double)linear_elems : 0;
    rc = 0;
    goto out;
oom:
    snprintf(err, errlen, "out of memory writing the source-exact variant");
out:
    if (perm)
        for (int i = 0; i < L * ACT_POINTS; i++) free(perm[i]);
    free(perm);
    free(scratch);
    return rc;
}
