/* `ebb ppl`: perplexity over a text file, scored the way llama.cpp's
 * llama-perplexity scores it so the two numbers are comparable:
 *
 *   - the whole file is tokenized once (BOS first only if the model asks for it);
 *   - it is cut into consecutive, non-overlapping windows of --ctx tokens
 *     (a trailing partial window is dropped); with a BOS model the first
 *     token of every window is replaced by BOS;
 *   - each window is evaluated from an empty cache, and only the second half
 *     is scored: the predictions at positions ctx/2 .. ctx-2 of the tokens
 *     that follow them, so every scored token has at least ctx/2 of context;
 *   - PPL = exp(mean negative log-likelihood over all scored tokens).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/generate.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

static void ppl_usage(FILE *out) {
    fprintf(out,
        "usage: ebb ppl -m MODEL -f FILE [--ctx N] [--chunks K] [--kv-bits N] [-t THREADS]\n"
        "  --ctx N      window size in tokens (default 512); the second half of each is scored\n"
        "  --chunks K   evaluate at most K windows (default: all)\n"
        "  --kv-bits N  KV cache precision: 32 (default), 16, 8 or 4\n");
}

/* -log p(target) from a row of logits, in double for a stable sum. */
static double token_nll(const float *logits, int n_vocab, int32_t target) {
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++) if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - max);
    return log(sum) - ((double)logits[target] - max);
}

int cmd_ppl(int argc, char **argv) {
    const char *model_path = NULL, *file = NULL;
    int n_ctx = 512, max_chunks = 0, n_threads = 0, kv_bits = 32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { ppl_usage(stdout); return 0; }
        if (!(v = cli_value("ppl", argc, argv, &i))) return 2;
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-f")) file = v;
        else if (!strcmp(a, "--ctx")) { if (cli_int("ppl", a, v, 8, 1 << 20, &n_ctx)) return 2; }
        else if (!strcmp(a, "--chunks")) { if (cli_int("ppl", a, v, 1, 1 << 30, &max_chunks)) return 2; }
        else if (!strcmp(a, "-t")) { if (cli_int("ppl", a, v, 1, 1024, &n_threads)) return 2; }
        else if (!strcmp(a, "--kv-bits")) { if (cli_int("ppl", a, v, 4, 32, &kv_bits)) return 2; }
        else { fprintf(stderr, "ebb ppl: unknown option '%s'\n", a); ppl_usage(stderr); return 2; }
    }
    if (!file) { fprintf(stderr, "ebb ppl: -f FILE is required\n"); return 2; }
    size_t len;
    char *text = cli_read_file("ppl", file, &len);
    if (!text) return 1;
    struct model m;
    if (cli_load_model("ppl", &m, model_path, n_threads)) { free(text); return 1; }
    if (n_ctx > m.cfg.n_ctx_train) {
        fprintf(stderr, "ebb ppl: --ctx %d exceeds the model's context of %d\n", n_ctx, m.cfg.n_ctx_train);
        free(text);
        model_free(&m);
        return 2;
    }
    struct kv_account kv_policy;    /* the cache's precision; no budget */
    if (kv_account_init(&kv_policy, &m.cfg, kv_bits, 0)) {
        fprintf(stderr, "ebb ppl: %s\n", kv_bits_problem(&m.cfg, kv_bits));
        free(text);
        model_free(&m);
        return 2;
    }
    int rc = 1;
    int32_t *body = NULL;
    float *logits = NULL;
    struct kv_cache kv = {0};
    int n_body = tokenizer_encode(m.tok, text, len, 0, &body);
    free(text);
    if (n_body < 0) {
        fprintf(stderr, "ebb ppl: %s is not valid UTF-8\n", file);
        goto out;
    }
    const int bos = tokenizer_add_bos(m.tok) && tokenizer_bos(m.tok) >= 0 ? tokenizer_bos(m.tok) : -1;
    /* With BOS the stream is [BOS, body...], like llama.cpp's tokenization. */
    int32_t *tokens = malloc(((size_t)n_body + 1) * sizeof(int32_t));
    if (!tokens) goto out;
    int n_tokens = 0;
    if (bos >= 0) tokens[n_tokens++] = bos;
    memcpy(tokens + n_tokens, body, (size_t)n_body * sizeof(int32_t));
    n_tokens += n_body;
    free(body);
    body = tokens;

    int n_chunks = n_tokens / n_ctx;
    if (max_chunks && n_chunks > max_chunks) n_chunks = max_chunks;
    if (n_chunks == 0) {
        fprintf(stderr, "ebb ppl: %s has %d tokens, fewer than one window of %d\n", file, n_tokens, n_ctx);
        goto out;
    }
    logits = malloc((size_t)n_ctx * m.cfg.n_vocab * sizeof(float));
    if (!logits || kv_cache_init(&kv, &m.cfg, n_ctx, &kv_policy)) {
        fprintf(stderr, "ebb ppl: out of memory\n");
        goto out;
    }
    fprintf(stderr, "ebb ppl: %d tokens, %d windows of %d, scoring %d tokens each\n", n_tokens,
            n_chunks, n_ctx, n_ctx - n_ctx / 2 - 1);
    const int first = n_ctx / 2;
    double nll = 0, nll2 = 0;
    long count = 0;
    double t0 = ebb_now_seconds();
    for (int c = 0; c < n_chunks; c++) {
        int32_t *win = body + (size_t)c * n_ctx;
        int32_t saved = win[0];
        if (bos >= 0) win[0] = bos;
        kv_cache_clear(&kv);
        int frc = model_forward(&m, &kv, win, n_ctx, logits, 1);
        win[0] = saved;
        if (frc) { fprintf(stderr, "ebb ppl: forward pass failed\n"); goto out; }
        for (int j = first; j < n_ctx - 1; j++) {
            double v = token_nll(logits + (size_t)j * m.cfg.n_vocab, m.cfg.n_vocab, win[j + 1]);
            nll += v;
            nll2 += v * v;
            count++;
        }
        double elapsed = ebb_now_seconds() - t0;
        fprintf(stderr, "\r[%d/%d] ppl %.4f  (%.1f s, %.0f tok/s)", c + 1, n_chunks, exp(nll / count),
                elapsed, (c + 1) * (double)n_ctx / elapsed);
    }
    fprintf(stderr, "\n");
    double mean = nll / count, var = nll2 / count - mean * mean;
    double err = var > 0 && count > 1 ? sqrt(var / (count - 1)) : 0;
    printf("PPL = %.4f +/- %.4f  (%ld tokens scored, ctx %d)\n", exp(mean), exp(mean) * err, count, n_ctx);
    rc = 0;
out:
    kv_cache_free(&kv);
    kv_account_destroy(&kv_policy);
    free(logits);
    free(body);
    model_free(&m);
    return rc;
}
