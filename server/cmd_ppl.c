/* `ebb ppl`: perplexity over a text file, scored the way llama.cpp's
 * llama-perplexity scores it (engine/perplexity.h has the rules), with a
 * progress line on stderr and the result on stdout. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bitstack.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "server/cli.h"

static void ppl_usage(FILE *out) {
    fprintf(out,
        "usage: ebb ppl -m MODEL -f FILE [--ctx N] [--chunks K] [--kv-bits N] [-t THREADS]\n"
        "  --ctx N      window size in tokens (default 512); the second half of each is scored\n"
        "  --score N    score the last N predictions of each window instead (the rest is its\n"
        "               context, and what compression compresses)\n"
        "  --chunks K   evaluate at most K windows (default: all)\n"
        "  --kv-bits N  KV cache precision: 32 (default), 16, 8 or 4\n"
        "  --weights W  native (default: the file's quantized types, used in place) or f32\n"
        "  --device D   cpu (default) or cuda[:N]: weights and KV cache on that GPU\n"
        "  --stack-bytes N  a bitstack file: keep the prefix of its stack that fits in N bytes\n"
        "               (default: all of it)\n"
        "  --top1-out F write the most likely token at each scored position to F (int32,\n"
        "               little-endian): top-1 agreement between two runs\n"
        "context compression of each window's context before the rest is scored:\n"
        "  --compress-every N  also compress every N tokens of the context as it is read, as\n"
        "               a conversation is at each turn's end (at most 32 times)\n"
        COMPRESS_FLAGS_USAGE);
}

struct ppl_progress_state {
    int n_ctx, n_score;
};

static void print_progress(void *ud, int done, int total, const struct ppl_result *r, double seconds) {
    const struct ppl_progress_state *st = ud;
    if (done == 0) {
        fprintf(stderr, "ebb ppl: %d tokens, %d windows of %d, scoring %d tokens each\n", r->n_tokens, total,
                st->n_ctx, st->n_ctx - perplexity_context(st->n_ctx, st->n_score));
        return;
    }
    fprintf(stderr, "\r[%d/%d] ppl %.4f  (%.1f s, %.0f tok/s)", done, total, r->ppl, seconds,
            seconds > 0 ? done * (double)st->n_ctx / seconds : 0.0);
    if (done == total) fputc('\n', stderr);
}

static int write_top1(const char *path, const int32_t *ids, long n, char *err, size_t errlen) {
    FILE *f = fopen(path, "wb");
    const int ok = f && fwrite(ids, sizeof *ids, (size_t)n, f) == (size_t)n;
    if ((f && fclose(f)) || !ok) {
        snprintf(err, errlen, "cannot write %s", path);
        return -1;
    }
    return 0;
}

int cmd_ppl(int argc, char **argv) {
    const char *model_path = NULL, *file = NULL, *top1_path = NULL;
    int n_ctx = 512, n_score = 0, max_chunks = 0, n_threads = 0, kv_bits = 32;
    enum model_weights weights = MODEL_WEIGHTS_NATIVE;
    const char *device = "cpu";
    uint64_t stack_bytes = UINT64_MAX;
    struct compress_params compress = compress_defaults();
    compress.min_prompt = 0;   /* the windows are what the flags are given for */
    int every = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { ppl_usage(stdout); return 0; }
        if (!(v = cli_value("ppl", argc, argv, &i))) return 2;
        const int known = cli_compress_flag("ppl", a, v, &compress);
        if (known == 2) return 2;
        if (known) continue;
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-f")) file = v;
        else if (!strcmp(a, "--ctx")) { if (cli_int("ppl", a, v, 8, 1 << 20, &n_ctx)) return 2; }
        else if (!strcmp(a, "--score")) { if (cli_int("ppl", a, v, 1, 1 << 20, &n_score)) return 2; }
        else if (!strcmp(a, "--chunks")) { if (cli_int("ppl", a, v, 1, 1 << 30, &max_chunks)) return 2; }
        else if (!strcmp(a, "-t")) { if (cli_int("ppl", a, v, 1, 1024, &n_threads)) return 2; }
        else if (!strcmp(a, "--weights")) { if (cli_weights("ppl", v, &weights)) return 2; }
        else if (!strcmp(a, "--device")) { if (cli_device("ppl", v, &device)) return 2; }
        else if (!strcmp(a, "--kv-bits")) { if (cli_int("ppl", a, v, 4, 32, &kv_bits)) return 2; }
        else if (!strcmp(a, "--top1-out")) top1_path = v;
        else if (!strcmp(a, "--stack-bytes")) { if (cli_u64("ppl", a, v, &stack_bytes)) return 2; }
        else if (!strcmp(a, "--compress-every")) { if (cli_int("ppl", a, v, 2 * KV_PAGE_TOKENS, 1 << 20, &every)) return 2; }
        else { fprintf(stderr, "ebb ppl: unknown option '%s'\n", a); ppl_usage(stderr); return 2; }
    }
    if (!file) { fprintf(stderr, "ebb ppl: -f FILE is required\n"); return 2; }
    if (n_score > n_ctx - 2) {
        fprintf(stderr, "ebb ppl: --score %d leaves no context in windows of %d tokens (at most %d)\n", n_score, n_ctx,
                n_ctx - 2);
        return 2;
    }
    /* The earlier compression points, window-relative: before the context's
     * end (the first scored position, where it is compressed last). */
    const int context = perplexity_context(n_ctx, n_score);
    for (int at = every; every && at + COMPRESS_WINDOW < context && compress.n_earlier < COMPRESS_MAX_POINTS; at += every)
        compress.earlier[compress.n_earlier++] = (struct compress_mark){at, 0};
    size_t len;
    char *text = cli_read_file("ppl", file, &len);
    if (!text) return 1;
    struct model m;
    struct model_run *run = cli_load_model("ppl", &m, model_path, weights, device, n_threads);
    if (!run) { free(text); return 1; }
    struct ppl_progress_state st = {n_ctx, n_score};
    struct ppl_result r;
    char err[512];
    const int stack_rc = cli_fit_stack("ppl", &m, stack_bytes);
    if (stack_rc) {
        free(text); model_run_free(run); model_free(&m);
        return stack_rc;
    }
    if (m.stack) {
        const float expect = bitstack_ppl_at(m.stack, m.stack->resident_bytes);
        if (expect == expect)   /* the file's checkpoints cover this prefix */
            printf("stack: the packer's checkpoints give perplexity %.4f here (on %s)\n", (double)expect,
                   m.stack->checkpoint_text);
    }
    int32_t *top1 = NULL;
    if (top1_path && !(top1 = malloc((size_t)(max_chunks ? max_chunks : (int)(len / (size_t)n_ctx + 1)) *
                                     (size_t)n_ctx * sizeof *top1))) {
        fprintf(stderr, "ebb ppl: out of memory\n");
        free(text); model_run_free(run); model_free(&m);
        return 1;
    }
    int rc = perplexity_measure(run, text, len, n_ctx, n_score, max_chunks, kv_bits, &compress, top1, print_progress, &st, &r,
                                err, sizeof err);
    if (rc == 0 && top1) rc = write_top1(top1_path, top1, r.scored, err, sizeof err);
    free(top1);
    free(text);
    model_run_free(run);
    model_free(&m);
    if (rc) {
        fprintf(stderr, "ebb ppl: %s: %s\n", file, err);
        return 1;
    }
    printf("PPL = %.4f +/- %.4f  (%ld tokens scored, ctx %d)\n", r.ppl, r.err, r.scored, n_ctx);
    if (compress.mode != COMPRESS_OFF)
        printf("compressed %d of %d windows (%s): KV %zu -> %zu bytes (%.1f%%)\n", r.compressed, r.windows,
               compress_mode_name(compress.mode), r.kv_full_bytes, r.kv_compressed_bytes,
               r.kv_full_bytes ? 100.0 * (double)r.kv_compressed_bytes / (double)r.kv_full_bytes : 0.0);
    return 0;
}
