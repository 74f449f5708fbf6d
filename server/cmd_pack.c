/* `ebb pack`: the command line of the packer (tools/pack/) plus catalog
 * registration.
 *
 * The packing itself lives in libebbtools (it links LAPACK), and this file
 * is linked only into the ebb-pack program (server/main_pack.c), which
 * `ebb pack` executes: the daemon's binary never carries either. It only
 * parses flags, prints the summary and, when the source model is registered
 * in the catalog (matched by its absolute path), adds the packed file as a
 * variant with its bytes, bits per weight, sha256 and perplexity. The
 * perplexity is measured right after packing by the engine running the
 * written file (engine/perplexity.c, as `ebb ppl` does) on the held-out
 * text (tools/heldout.py's cache) unless another is named, over 16 windows
 * of 512 tokens, with the KV cache the variant is meant for: 4 bits for
 * w4a4/w4a8, 32 for w4a16. Without a text the column stays empty.
 *
 * Exit status: 0 packed (and registered, or skipped because the model is not
 * in the catalog), 1 the packing or the registration failed, 2 bad usage.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/bitstack.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "server/cli.h"
#include "server/config.h"
#include "storage/catalog.h"
#include "storage/sha256.h"
#include "tools/pack/pack.h"

static void pack_usage(FILE *out) {
    fprintf(out,
        "usage: ebb pack -m MODEL --format w4a4|w4a16|source|bitstack -o FILE [options]\n"
        "  -m MODEL              source GGUF (any type ebb loads; computed in f32)\n"
        "  -o FILE               packed GGUF to write (atomically)\n"
        "  --format F            w4a4 (rotated 4-bit weights requantized, quantized activations),\n"
        "                        w4a16 (the same weights, f32 activations) or source (the source's\n"
        "                        own Q4_0/Q4_1/Q5_x/Q8_0 blocks bit for bit, only activations\n"
        "                        quantized, in blocks of 32) or bitstack (every layer matrix as a\n"
        "                        stack of residual blocks, sign times low rank, that a memory budget\n"
        "                        keeps a prefix of; f32 activations); default w4a4\n"
        "  --base-bits 0|2       bitstack: 2 = the stack sits on a 2-bit copy of each matrix (W2G64,\n"
        "                        2.5 bits a weight, always resident) and peels what it leaves; 0 = a\n"
        "                        plain stack, which reaches lower budgets (default 2)\n"
        "  --levels L            bitstack: blocks per matrix (default: enough to pass the source's size)\n"
        "  --rank-bits B         bitstack: bits per weight the low-rank factors cost (default 0.125)\n"
        "  --bitstack-order O    bitstack: order of the blocks within a level: importance (the largest\n"
        "                        calibration-weighted error reduction first, default), random (a\n"
        "                        shuffle drawn from --seed) or uniform (matrix index order)\n"
        "  --checkpoints N       bitstack: perplexity measured at N prefix sizes from one level to all\n"
        "                        and stored in the file (default 8; 0: none)\n"
        "  --checkpoint-windows N  bitstack: windows of 512 tokens each checkpoint scores (default 4):\n"
        "                        the first of the evaluation text (held out, as the variants'\n"
        "                        perplexities are), or of the calibration text with --no-eval\n"
        "  --act-bits 4|8        w4a4 and source: 4 = outlier groups 8-bit, the rest 4-bit;\n"
        "                        8 = every group 8-bit (W4A8); default 4\n"
        "  --weight-quant Q      gptq (default) or rtn (round to nearest, the baseline); for a bitstack\n"
        "                        base rtn is the default (the stack on a GPTQ base measured worse)\n"
        "  --head-bits 8|4       output head: 8 = Q8_0 per row, tied to the embedding when the source\n"
        "                        ties them (default); 4 = its own W4G64 copy (half the bytes a\n"
        "                        decoded token reads for the head; costs some perplexity)\n"
        "  --calib FILE          calibration text (default $EBB_CACHE/calibration.txt, else\n"
        "                        ~/.cache/ebb/calibration.txt; python3 tools/calibration.py makes it)\n"
        "  --calib-seqs N        calibration windows (default 64)\n"
        "  --calib-len N         tokens per window (default 512)\n"
        "  --seed S              which windows are drawn (default 1)\n"
        "  --act8-share F        4-bit activations: the share of each layer's activation groups kept\n"
        "                        at 8 bits, given to the noisiest (default 0.2)\n"
        "  --act8-choice C       source at 4 bits: token (each token's loudest blocks, default) or\n"
        "                        static (the blocks calibration ranks noisiest, the same for all tokens)\n"
        "  --damp F              GPTQ damping, fraction of the Hessian's mean diagonal (default 0.01)\n"
        "  -t THREADS            compute threads (default: one per core)\n"
        "  --catalog PATH        catalog to register the variant in (default as `ebb models`)\n"
        "  --config FILE         read the catalog location from this configuration\n"
        "  --no-register         do not touch the catalog\n"
        "  --eval FILE           text whose perplexity under the packed file is recorded in the\n"
        "                        catalog (default $EBB_CACHE/heldout.txt when it exists)\n"
        "  --eval-chunks N       windows of 512 tokens scored (default 16)\n"
        "  --eval-kv-bits N      KV cache precision for it (default 4 for w4a4, 32 for w4a16)\n"
        "  --no-eval             skip the perplexity measurement\n"
        "  -q, --quiet           no progress bars\n");
}

/* $EBB_CACHE/NAME, else ~/.cache/ebb/NAME. */
static void cache_path(const char *name, char *buf, size_t len) {
    const char *cache = getenv("EBB_CACHE");
    const char *home = getenv("HOME");
    if (cache && *cache) snprintf(buf, len, "%s/%s", cache, name);
    else snprintf(buf, len, "%s/.cache/ebb/%s", home && *home ? home : ".", name);
}

struct eval_options {
    const char *path;   /* NULL: no measurement */
    int windows, kv_bits;
};

static void eval_progress(void *ud, int done, int total, const struct ppl_result *r, double seconds) {
    (void)ud;
    if (done == 0) return;
    fprintf(stderr, "\rperplexity   [%d/%d windows] %.4f  %.0f s", done, total, r->ppl, seconds);
    if (done == total) fputc('\n', stderr);
}

/* The packed file's perplexity on the evaluation text; ppl_text receives
 * what it was measured on. 0, or -1 with a message printed. */
static int measure_variant(const struct pack_options *o, const struct eval_options *e, int n_threads, double *ppl,
                           char *ppl_text, size_t text_len) {
    size_t len;
    char *text = cli_read_file("pack", e->path, &len);
    if (!text) return -1;
    struct model m;
    char err[512];
    if (model_load(&m, o->out_path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        fprintf(stderr, "ebb pack: cannot load the packed file back: %s\n", err);
        free(text);
        return -1;
    }
    struct model_run *run = model_run_new(&m, n_threads);
    if (!run) {
        fprintf(stderr, "ebb pack: out of memory or threads\n");
        model_free(&m);
        free(text);
        return -1;
    }
    struct ppl_result r;
    const int rc = perplexity_measure(run, text, len, 512, 0, e->windows, e->kv_bits, NULL, NULL, o->progress ? eval_progress : NULL,
                                      NULL, &r, err, sizeof err);
    model_run_free(run);
    model_free(&m);
    free(text);
    if (rc) {
        fprintf(stderr, "ebb pack: perplexity on %s: %s\n", e->path, err);
        return -1;
    }
    const char *base = strrchr(e->path, '/');
    snprintf(ppl_text, text_len, "%s, %d window%s of 512 (%ld tokens scored), kv_bits %d",
             base ? base + 1 : e->path, r.windows, r.windows == 1 ? "" : "s", r.scored, e->kv_bits);
    printf("perplexity %.4f +/- %.4f on %s\n", r.ppl, r.err, ppl_text);
    *ppl = r.ppl;
    return 0;
}

static const char *variant_kind(const struct pack_options *o) {
    if (o->format == PACK_SOURCE) return o->act_bits == 8 ? "source-w4a8" : "source-w4a4";
    if (o->format == PACK_BITSTACK) return "bitstack";
    static const char *const kinds[3][2][2] = {
        {{"w4a16", "w4a16-head4"}, {"w4a16-rtn", "w4a16-rtn-head4"}},
        {{"w4a8", "w4a8-head4"}, {"w4a8-rtn", "w4a8-rtn-head4"}},
        {{"w4a4", "w4a4-head4"}, {"w4a4-rtn", "w4a4-rtn-head4"}},
    };
    const int f = o->format == PACK_W4A16 ? 0 : o->act_bits == 8 ? 1 : 2;
    return kinds[f][o->weight_quant != PACK_GPTQ][o->head_bits == 4];
}

static void print_summary(const struct pack_options *o, const struct pack_result *r) {
    const int source = o->format == PACK_SOURCE;
    printf("wrote %s: %llu bytes, %.3f bits per source parameter (%s matrices %.2f bpw), %.1f s\n",
           o->out_path, (unsigned long long)r->file_bytes, r->bits_per_weight,
           source ? "layer" : o->format == PACK_BITSTACK ? "stack" : "W4G64",
           r->linear_bpw, r->seconds);
    const char *weights = source ? "the source's blocks, permuted"
                          : o->format != PACK_BITSTACK ? (o->weight_quant == PACK_GPTQ ? "gptq" : "rtn")
                          : !o->bitstack_base_bits ? "residual blocks"
                          : o->weight_quant == PACK_GPTQ ? "residual blocks on a W2G64 base (gptq)"
                                                         : "residual blocks on a W2G64 base (rtn)";
    printf("format %s, weights %s, calibration %ld tokens\n", variant_kind(o), weights, r->calib_tokens);
    if (r->n_checkpoints) printf("checkpoints on %s:\n", r->checkpoint_text);
    for (int i = 0; i < r->n_checkpoints; i++)
        printf("  %.1f MB of stack: perplexity %.3f\n", (double)r->checkpoint_bytes[i] / 1e6,
               (double)r->checkpoint_ppl[i]);
    if (o->format == PACK_W4A16 || o->format == PACK_BITSTACK || o->act_bits != 4) return;
    printf("8-bit activation groups per layer (%s / %s / %s / %s):\n", act_point_name(ACT_ATTN_IN), act_point_name(ACT_ATTN_OUT), act_point_name(ACT_FFN_IN),
           act_point_name(ACT_FFN_DOWN_IN));
    unsigned long hi_all = 0, all = 0;
    for (int l = 0; l < r->n_layer; l++) {
        unsigned long hi = 0, g = 0;
        printf("  layer %2d:", l);
        for (int p = 0; p < ACT_POINTS; p++) {
            printf(" %2u/%-2u", r->act8_groups[l * ACT_POINTS + p], r->act_groups[l * ACT_POINTS + p]);
            hi += r->act8_groups[l * ACT_POINTS + p];
            g += r->act_groups[l * ACT_POINTS + p];
        }
        printf("   %5.1f%%\n", 100.0 * hi / g);
        hi_all += hi;
        all += g;
    }
    printf("  all layers: %lu of %lu groups 8-bit (%.1f%%)\n", hi_all, all, 100.0 * hi_all / all);
}

/* A BitStack file's block directory as the catalog keeps it (docs/formats.md
 * "bitstack"), read back from the written file: each block of the stack's
 * order with its place in the file and the prefix bytes through it, and the
 * packer's checkpoint perplexities on the prefixes they measured, and what
 * those scored (text, "" without checkpoints). 0, or -1 with a message
 * printed. */
static int stack_directory(const char *path, struct catalog_block **out, size_t *n_out, char *text,
                           size_t text_len) {
    struct model m;
    char err[512];
    *out = NULL;
    *n_out = 0;
    if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        fprintf(stderr, "ebb pack: cannot load the packed file back: %s\n", err);
        return -1;
    }
    const struct bitstack *s = m.stack;
    const size_t n = s ? (size_t)s->n_matrices * s->levels : 0;
    snprintf(text, text_len, "%s", s && s->n_checkpoints ? s->checkpoint_text : "");
    struct catalog_block *b = calloc(n ? n : 1, sizeof *b);
    int rc = b ? 0 : -1;
    for (size_t i = 0; i < n && !rc; i++) {
        const uint32_t k = s->order[i];
        const int matrix = (int)(k / (uint32_t)s->levels), level = (int)(k % (uint32_t)s->levels);
        const struct bitstack_block *blk = &s->blocks[k];
        char name[64];
        snprintf(name, sizeof name, "blk.%d.%s", matrix / BITSTACK_KINDS,
                 bitstack_kind_name((enum bitstack_kind)(matrix % BITSTACK_KINDS)));
        b[i] = (struct catalog_block){.ord = (int64_t)i, .layer = matrix / BITSTACK_KINDS, .level = level,
                                      .tensor = strdup(name), .offset = (int64_t)(blk->signs - m.file.map),
                                      .bytes = (int64_t)(s->cum_bytes[i + 1] - s->cum_bytes[i]),
                                      .cumulative_bytes = (int64_t)s->cum_bytes[i + 1]};
        for (int c = 0; c < s->n_checkpoints; c++)
            if (s->checkpoint_bytes[c] == s->cum_bytes[i + 1]) {
                b[i].has_perplexity = 1;
                b[i].perplexity = s->checkpoint_ppl[c];
            }
        if (!b[i].tensor) rc = -1;
    }
    model_free(&m);
    if (rc) {
        fprintf(stderr, "ebb pack: out of memory for the block directory\n");
        catalog_blocks_free(b, n);
        return -1;
    }
    *out = b;
    *n_out = n;
    return 0;
}

/* Adds the variant when the source model is registered. 0 done or skipped, -1 failed. */
static int register_variant(const struct pack_options *o, const struct pack_result *r, const char *catalog_flag,
                            const char *config_path, const double *ppl, const char *ppl_text) {
    char err[1024], path[4096], src[PATH_MAX], out[PATH_MAX], hex[65];
    if (config_resolve_catalog(config_path, catalog_flag, path, sizeof path, err, sizeof err)) {
        fprintf(stderr, "ebb pack: catalog: %s (the packed file is written)\n", err);
        return -1;
    }
    if (!realpath(o->model_path, src) || !realpath(o->out_path, out)) {
        fprintf(stderr, "ebb pack: cannot resolve paths: %s\n", strerror(errno));
        return -1;
    }
    struct catalog *cat;
    if (catalog_open(path, &cat, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb pack: %s (the packed file is written)\n", err);
        return -1;
    }
    struct catalog_model *ms;
    size_t n, n_dir = 0;
    struct catalog_block *dir = NULL;
    char checkpoint_text[BITSTACK_CHECKPOINT_TEXT_MAX + 1] = "";
    int rc = -1;
    if (catalog_model_list(cat, &ms, &n, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb pack: %s\n", err);
        catalog_close(cat);
        return -1;
    }
    const struct catalog_model *found = NULL;
    for (size_t i = 0; i < n && !found; i++)
        if (!strcmp(ms[i].source_path, src)) found = &ms[i];
    if (!found) {
        printf("not registered: %s is not in the catalog %s (ebb models add %s)\n", src, path, o->model_path);
        rc = 0;
    } else if (sha256_file(out, hex)) {
        fprintf(stderr, "ebb pack: cannot read back %s for its checksum\n", out);
    } else if (o->format == PACK_BITSTACK &&
               stack_directory(out, &dir, &n_dir, checkpoint_text, sizeof checkpoint_text)) {
        /* printed */
    } else {
        struct catalog_variant v = {.model_id = found->id, .kind = (char *)variant_kind(o), .path = out,
                                    .bytes = (int64_t)r->file_bytes, .bits_per_weight = r->bits_per_weight,
                                    .checksum = hex, .has_perplexity = ppl != NULL,
                                    .perplexity = ppl ? *ppl : 0, .ppl_text = ppl ? (char *)ppl_text : NULL,
                                    .checkpoint_text = *checkpoint_text ? checkpoint_text : NULL};
        enum catalog_status st = catalog_variant_add_stack(cat, &v, dir, n_dir, NULL, err, sizeof err);
        if (st == CATALOG_OK) {
            printf("registered as a '%s' variant of %s in %s", v.kind, found->name, path);
            if (n_dir) printf(" with its directory of %zu blocks", n_dir);
            printf("\n");
            rc = 0;
        } else if (st == CATALOG_EXISTS) {
            fprintf(stderr, "ebb pack: %s; its catalog row still holds the previous file's size and checksum\n",
                    err);
        } else {
            fprintf(stderr, "ebb pack: %s\n", err);
        }
    }
    catalog_blocks_free(dir, n_dir);
    catalog_model_list_free(ms, n);
    catalog_close(cat);
    return rc;
}

int cmd_pack(int argc, char **argv) {
    struct pack_options o;
    pack_options_default(&o);
    char calib[4096], heldout[4096];
    const char *catalog_flag = NULL, *config_path = NULL;
    int no_register = 0, no_eval = 0, act8_choice_given = 0, bitstack_flag = 0, weight_quant_given = 0;
    struct eval_options e = {NULL, 16, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { pack_usage(stdout); return 0; }
        if (!strcmp(a, "--no-register")) { no_register = 1; continue; }
        if (!strcmp(a, "--no-eval")) { no_eval = 1; continue; }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) { o.progress = 0; continue; }
        if (!(v = cli_value("pack", argc, argv, &i))) return 2;
        int bad = 0;
        if (!strcmp(a, "-m")) o.model_path = v;
        else if (!strcmp(a, "-o")) o.out_path = v;
        else if (!strcmp(a, "--calib")) o.calib_path = v;
        else if (!strcmp(a, "--eval")) e.path = v;
        else if (!strcmp(a, "--eval-chunks")) bad = cli_int("pack", a, v, 1, 1 << 20, &e.windows);
        else if (!strcmp(a, "--eval-kv-bits")) bad = cli_int("pack", a, v, 4, 32, &e.kv_bits);
        else if (!strcmp(a, "--catalog")) catalog_flag = v;
        else if (!strcmp(a, "--config")) config_path = v;
        else if (!strcmp(a, "--format")) {
            if (!strcmp(v, "w4a4")) o.format = PACK_W4A4;
            else if (!strcmp(v, "w4a16")) o.format = PACK_W4A16;
            else if (!strcmp(v, "source")) o.format = PACK_SOURCE;
            else if (!strcmp(v, "bitstack")) o.format = PACK_BITSTACK;
            else {
                fprintf(stderr, "ebb pack: --format must be w4a4, w4a16, source or bitstack, not '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--base-bits")) {
            bad = cli_int("pack", a, v, 0, 2, &o.bitstack_base_bits);
            if (!bad && o.bitstack_base_bits == 1) {
                fprintf(stderr, "ebb pack: --base-bits must be 0 or 2\n");
                return 2;
            }
            bitstack_flag = 1;
        } else if (!strcmp(a, "--levels")) {
            bad = cli_int("pack", a, v, 1, BITSTACK_MAX_LEVELS, &o.bitstack_levels);
        } else if (!strcmp(a, "--rank-bits")) {
            float b;
            bad = cli_float("pack", a, v, 1e-3, 4, &b);
            o.bitstack_rank_bits = b;
        } else if (!strcmp(a, "--bitstack-order")) {
            if (!strcmp(v, "importance")) o.bitstack_order = PACK_ORDER_IMPORTANCE;
            else if (!strcmp(v, "random")) o.bitstack_order = PACK_ORDER_RANDOM;
            else if (!strcmp(v, "uniform")) o.bitstack_order = PACK_ORDER_UNIFORM;
            else {
                fprintf(stderr, "ebb pack: --bitstack-order must be importance, random or uniform, not '%s'\n", v);
                return 2;
            }
            bitstack_flag = 1;
        } else if (!strcmp(a, "--checkpoints")) {
            bad = cli_int("pack", a, v, 0, 4096, &o.bitstack_checkpoints);
            bitstack_flag = 1;
        } else if (!strcmp(a, "--checkpoint-windows")) {
            bad = cli_int("pack", a, v, 1, 1 << 20, &o.bitstack_checkpoint_windows);
            bitstack_flag = 1;
        } else if (!strcmp(a, "--act8-choice")) {
            if (!strcmp(v, "token")) o.act8_per_token = 1;
            else if (!strcmp(v, "static")) o.act8_per_token = 0;
            else { fprintf(stderr, "ebb pack: --act8-choice must be token or static, not '%s'\n", v); return 2; }
            act8_choice_given = 1;
        } else if (!strcmp(a, "--weight-quant")) {
            if (!strcmp(v, "gptq")) o.weight_quant = PACK_GPTQ;
            else if (!strcmp(v, "rtn")) o.weight_quant = PACK_RTN;
            else { fprintf(stderr, "ebb pack: --weight-quant must be gptq or rtn, not '%s'\n", v); return 2; }
            weight_quant_given = 1;
        } else if (!strcmp(a, "--act-bits")) {
            bad = cli_int("pack", a, v, 4, 8, &o.act_bits);
            if (!bad && o.act_bits != 4 && o.act_bits != 8) {
                fprintf(stderr, "ebb pack: --act-bits must be 4 or 8\n");
                return 2;
            }
        } else if (!strcmp(a, "--head-bits")) {
            bad = cli_int("pack", a, v, 4, 8, &o.head_bits);
            if (!bad && o.head_bits != 4 && o.head_bits != 8) {
                fprintf(stderr, "ebb pack: --head-bits must be 4 or 8\n");
                return 2;
            }
        } else if (!strcmp(a, "--calib-seqs")) bad = cli_int("pack", a, v, 1, 100000, &o.calib_seqs);
        else if (!strcmp(a, "--calib-len")) bad = cli_int("pack", a, v, 2, 1 << 20, &o.calib_len);
        else if (!strcmp(a, "--seed")) bad = cli_u64("pack", a, v, &o.seed);
        else if (!strcmp(a, "--act8-share")) bad = cli_float("pack", a, v, 0, 1, &o.act8_share);
        else if (!strcmp(a, "--damp")) {
            float d;
            bad = cli_float("pack", a, v, 1e-6, 10, &d);
            o.damp = d;
        } else if (!strcmp(a, "-t")) bad = cli_int("pack", a, v, 1, 1024, &o.n_threads);
        else { fprintf(stderr, "ebb pack: unknown option '%s'\n", a); pack_usage(stderr); return 2; }
        if (bad) return 2;
    }
    if (!o.model_path) { fprintf(stderr, "ebb pack: -m MODEL is required\n"); return 2; }
    if (!o.out_path) { fprintf(stderr, "ebb pack: -o FILE is required\n"); return 2; }
    if ((o.format == PACK_W4A16 || o.format == PACK_BITSTACK) && o.act_bits != 4) {
        fprintf(stderr, "ebb pack: --act-bits applies to --format w4a4 and source only\n");
        return 2;
    }
    if (bitstack_flag && o.format != PACK_BITSTACK) {
        fprintf(stderr, "ebb pack: --base-bits, --bitstack-order, --checkpoints and --checkpoint-windows apply to "
                        "--format bitstack only\n");
        return 2;
    }
    if (o.format == PACK_BITSTACK && !weight_quant_given) o.weight_quant = PACK_RTN;   /* the base's default */
    if (o.format == PACK_BITSTACK && weight_quant_given && !o.bitstack_base_bits) {
        fprintf(stderr, "ebb pack: --weight-quant applies to a bitstack's base; --base-bits 0 has none\n");
        return 2;
    }
    if (act8_choice_given && (o.format != PACK_SOURCE || o.act_bits != 4)) {
        fprintf(stderr, "ebb pack: --act8-choice applies to --format source --act-bits 4 only\n");
        return 2;
    }
    if (o.format == PACK_SOURCE && (o.head_bits != 8 || o.weight_quant != PACK_GPTQ)) {
        fprintf(stderr, "ebb pack: --head-bits and --weight-quant do not apply to --format source, which keeps "
                        "the source's weights as they are\n");
        return 2;
    }
    if (!o.calib_path) {
        cache_path("calibration.txt", calib, sizeof calib);
        o.calib_path = calib;
    }
    if (no_eval) {
        e.path = NULL;
    } else if (!e.path) {
        cache_path("heldout.txt", heldout, sizeof heldout);
        if (access(heldout, R_OK) == 0) e.path = heldout;
        else printf("no evaluation text (%s; python3 tools/heldout.py makes it): perplexity not measured\n",
                    heldout);
    }
    if (!e.kv_bits) e.kv_bits = o.format == PACK_W4A16 || o.format == PACK_BITSTACK ? 32 : 4;
    /* Checked before the minutes of packing, not after. */
    if (e.kv_bits != 32 && e.kv_bits != 16 && e.kv_bits != 8 && e.kv_bits != 4) {
        fprintf(stderr, "ebb pack: --eval-kv-bits must be 32, 16, 8 or 4, not %d\n", e.kv_bits);
        return 2;
    }
    if (e.path && access(e.path, R_OK) != 0) {
        fprintf(stderr, "ebb pack: cannot read the evaluation text %s: %s\n", e.path, strerror(errno));
        return 2;
    }
    /* A stack's checkpoints score the evaluation text too: held out, and
     * the text the variants' perplexities are measured on. */
    char *checkpoint_text = NULL;
    if (o.format == PACK_BITSTACK && o.bitstack_checkpoints > 0 && e.path) {
        if (!(checkpoint_text = cli_read_file("pack", e.path, &o.checkpoint_text_len))) return 1;
        const char *base = strrchr(e.path, '/');
        o.checkpoint_text = checkpoint_text;
        o.checkpoint_text_name = base ? base + 1 : e.path;
    }
    struct pack_result r;
    char err[1024];
    const int packed = pack_run(&o, &r, err, sizeof err);
    free(checkpoint_text);
    if (packed) {
        fprintf(stderr, "ebb pack: %s\n", err);
        return 1;
    }
    print_summary(&o, &r);
    double ppl;
    char ppl_text[512];
    const int measured = e.path && measure_variant(&o, &e, o.n_threads, &ppl, ppl_text, sizeof ppl_text) == 0;
    if (e.path && !measured) {
        pack_result_free(&r);
        return 1;   /* the file is written; a text that cannot be scored is the user's to fix */
    }
    int rc = no_register ? 0
             : register_variant(&o, &r, catalog_flag, config_path, measured ? &ppl : NULL, ppl_text) ? 1 : 0;
    pack_result_free(&r);
    return rc;
}
