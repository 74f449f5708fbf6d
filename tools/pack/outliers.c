/* COMET's fine-grained mixed precision: which activation groups get 8 bits.
 *
 * At run time each token's activation is quantized in groups of 64 channels,
 * one scale per group and token, so a loud channel coarsens the grid of the
 * 63 others in its group. Two permutations keep the damage to few groups:
 *
 * 1. Before rotating (offline, folded into the weights like the rotation
 *    itself): each layer's SwiGLU outputs are sorted loudest first. The
 *    block Hadamard then mixes the few massive channels of down_proj's input
 *    only with each other, inside the leading 64-block(s), instead of
 *    spreading them over many groups of ordinary channels. (The residual
 *    stream needs no such step: the norm gain, applied before the online
 *    rotation, already tames its massive channels; see rotate.c.)
 *
 * 2. After rotating, per activation point (the I32 `.perm` tensors the
 *    engine applies at run time): whole 64-blocks are reordered, never single
 *    channels. After a Hadamard block the 64 channels of a block are loud on
 *    the same tokens (one loud input spreads over all of them), so sorting
 *    channels one by one by their calibration absmax would scatter a block's
 *    loudness over several groups; that measured worse than no permutation.
 *
 * Which groups are 8-bit: a group's cost at 4 bits is its quantization noise,
 * proportional per token to the square of its largest value, relative to the
 * energy of the whole activation (so the four points of a layer compare on
 * one scale: the share of signal lost). Each layer has a budget of 8-bit
 * groups (a share of its groups, 20% by default, the target); the
 * noisiest groups across the layer's four points take it, greedily. The
 * budget is always spent: an 8-bit group costs the integer kernel nothing
 * more than a 4-bit one (both are int8 codes), only the W4A4 claim.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tools/pack/pack.h"

struct ranked {
    double v;
    int32_t i;
};

static int by_rank(const void *pa, const void *pb) {
    const struct ranked *a = pa, *b = pb;
    if (a->v != b->v) return a->v > b->v ? -1 : 1;
    return a->i < b->i ? -1 : a->i > b->i;
}

int pack_order_by(const float *score, int n, int32_t *perm) {
    struct ranked *r = malloc((size_t)n * sizeof *r);
    if (!r) return -1;
    for (int i = 0; i < n; i++) r[i] = (struct ranked){score[i], i};
    qsort(r, (size_t)n, sizeof *r, by_rank);
    for (int i = 0; i < n; i++) perm[i] = r[i].i;
    free(r);
    return 0;
}

/* The 4-bit noise share of group g of a point: E[max^2] / E[||x||^2]. */
static double noise_share(const struct pack_act_stats *s, int g) {
    return s->energy > 0 ? s->gmax2[g] / s->energy : 0;
}

int pack_choose_act8(const struct pack_calib *c, int layer, double share, int32_t *const perm[ACT_POINTS],
                     int n_hi[ACT_POINTS]) {
    int total = 0;
    const int group = c->group;
    for (int p = 0; p < ACT_POINTS; p++) total += c->pt[layer * ACT_POINTS + p].n / group;
    struct ranked *all = malloc((size_t)total * sizeof *all);
    if (!all) return -1;
    /* Every group of the layer, ranked; i encodes (point, group). */
    int k = 0;
    for (int p = 0; p < ACT_POINTS; p++) {
        const struct pack_act_stats *s = &c->pt[layer * ACT_POINTS + p];
        for (int g = 0; g < s->n / group; g++) all[k++] = (struct ranked){noise_share(s, g), p * 65536 + g};
    }
    qsort(all, (size_t)total, sizeof *all, by_rank);
    const int budget = (int)(share * total + 1e-9);
    for (int p = 0; p < ACT_POINTS; p++) n_hi[p] = 0;
    for (int i = 0; i < budget && i < total; i++) n_hi[all[i].i / 65536]++;
    free(all);

    /* Per point: blocks noisiest first, so the promoted ones lead. */
    for (int p = 0; p < ACT_POINTS; p++) {
        const struct pack_act_stats *s = &c->pt[layer * ACT_POINTS + p];
        const int groups = s->n / group;
        struct ranked *r = malloc((size_t)groups * sizeof *r);
        if (!r) return -1;
        for (int g = 0; g < groups; g++) r[g] = (struct ranked){noise_share(s, g), g};
        qsort(r, (size_t)groups, sizeof *r, by_rank);
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < group; i++) perm[p][g * group + i] = r[g].i * group + i;
        free(r);
    }
    return 0;
}

int pack_act_order(int32_t *perm, int n, const double *hess, int segment) {
    struct ranked *r = malloc((size_t)segment * sizeof *r);
    if (!r) return -1;
    for (int b = 0; b < n; b += segment) {
        for (int i = 0; i < segment; i++) {
            const int32_t c = perm[b + i];
            r[i] = (struct ranked){hess[(size_t)c * n + c], c};
        }
        qsort(r, (size_t)segment, sizeof *r, by_rank);
        for (int i = 0; i < segment; i++) perm[b + i] = r[i].i;
    }
    free(r);
    return 0;
}

void pack_permute_cols(const float *w, int rows, int cols, const int32_t *perm, float *out) {
    for (int o = 0; o < rows; o++) {
        const float *src = w + (size_t)o * cols;
        float *dst = out + (size_t)o * cols;
        for (int i = 0; i < cols; i++) dst[i] = src[perm[i]];
    }
}

void pack_permute_hessian(const double *h, int n, const int32_t *perm, double *out) {
    for (int i = 0; i < n; i++) {
        const double *src = h + (size_t)perm[i] * n;
        double *dst = out + (size_t)i * n;
        for (int j = 0; j < n; j++) dst[j] = src[perm[j]];
    }
}
