/* `ebb generate` and `ebb logits`: the model from the command line.
 *
 * generate streams text to stdout as it is produced and reports timing on
 * stderr, so `ebb generate ... > out.txt` captures exactly the text. logits
 * writes raw float32 rows for the reference checks in tests/reference. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/generate.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

#define MAX_STOPS 16

static void generate_usage(FILE *out) {
    fprintf(out,
        "usage: ebb generate -m MODEL (-p PROMPT | --chat MESSAGE | --ids-file FILE) [options]\n"
        "  -m MODEL            GGUF model file\n"
        "  -p PROMPT           raw prompt text (special tokens like <|im_start|> are parsed)\n"
        "  --chat MESSAGE      a user message, rendered with the model's chat template\n"
        "  --system TEXT       system message for --chat (default: the template's own)\n"
        "  --ids-file FILE     prompt as token ids (whitespace separated)\n"
        "  -n N                tokens to generate at most (default 128)\n"
        "  --temp T            temperature, 0 = greedy (default 0.8)\n"
        "  --top-k K           (default 40)      --top-p P      (default 0.95)\n"
        "  --min-p P           (default 0.05)    --repeat-penalty R (default 1.0)\n"
        "  --seed S            sampling seed (default 0)\n"
        "  --stop TEXT         stop string (repeatable, up to %d)\n"
        "  -t THREADS          worker threads (default: one per core)\n"
        "  --kv-bits N         KV cache precision: 32 (default), 16, 8 or 4\n"
        COMPRESS_FLAGS_USAGE
        "  --weights W         native (default: the file's types, used in place) or f32\n"
        "  --device D          cpu (default) or cuda[:N]: weights and KV cache on that GPU\n"
        "  --then TEXT         more prompt after the first: with --compress, the first part is\n"
        "                      compressed before TEXT is read (question-agnostic)\n"
        "  --print-ids         print generated token ids instead of text\n", MAX_STOPS);
}

struct print_state { int print_ids; int n; };

static int print_text(void *ud, int32_t id, const char *text, size_t len) {
    struct print_state *ps = ud;
    if (ps->print_ids) {
        if (id >= 0) printf(ps->n++ ? " %d" : "%d", id);
    } else {
        fwrite(text, 1, len, stdout);
    }
    fflush(stdout);
    return 0;
}

/* --then: TEXT's tokens after the prompt's, compression (if any) coming
 * between them, so the prompt is compressed without seeing TEXT (the
 * question-agnostic evaluation of context compression). The new length,
 * or -1. */
static int append_then(struct model *m, const char *text, int32_t **ids, int n, struct compress_params *cp) {
    int32_t *more = NULL;
    const int k = tokenizer_encode_with_bos(m->tok, text, strlen(text), 1, 0, &more);
    int32_t *all = k >= 0 ? realloc(*ids, (size_t)(n + k + 1) * sizeof *all) : NULL;
    if (!all) {
        fprintf(stderr, k < 0 ? "ebb generate: --then is not valid UTF-8\n" : "ebb generate: out of memory\n");
        free(more);
        return -1;
    }
    memcpy(all + n, more, (size_t)k * sizeof *all);
    free(more);
    *ids = all;
    cp->at = n;
    return n + k;
}

/* Builds the prompt token ids from whichever prompt option was given. */
static int build_prompt(struct model *m, const char *prompt, const char *chat, const char *system,
                        const char *ids_file, int32_t **ids) {
    if (ids_file) {
        char *text = cli_read_file("generate", ids_file, NULL);
        if (!text) return -1;
        int n = cli_parse_ids("generate", text, ids);
        free(text);
        return n;
    }
    char *rendered = NULL;
    if (chat) {
        struct chat_msg msgs[2];
        int n_msgs = 0;
        if (system) msgs[n_msgs++] = (struct chat_msg){"system", system};
        msgs[n_msgs++] = (struct chat_msg){"user", chat};
        rendered = chat_render(m->tok, msgs, n_msgs, 1);
        if (!rendered) {
            fprintf(stderr, "ebb generate: out of memory\n");
            return -1;
        }
        prompt = rendered;
    }
    int n = tokenizer_encode_with_bos(m->tok, prompt, strlen(prompt), 1, 1, ids);
    free(rendered);
    if (n < 0) fprintf(stderr, "ebb generate: the prompt is not valid UTF-8\n");
    return n;
}

int cmd_generate(int argc, char **argv) {
    const char *model_path = NULL, *prompt = NULL, *chat = NULL, *system = NULL, *ids_file = NULL, *then = NULL;
    const char *stops[MAX_STOPS];
    struct gen_params gp = {.max_tokens = 128, .compress = compress_defaults()};
    sampler_params_default(&gp.sampling);
    int n_threads = 0;
    enum model_weights weights = MODEL_WEIGHTS_NATIVE;
    const char *device = "cpu";
    struct print_state ps = {0, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value("generate", argc, argv, &i))) return 2; } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { generate_usage(stdout); return 0; }
        else if (!strcmp(a, "-m")) { VALUE(); model_path = v; }
        else if (!strcmp(a, "-p")) { VALUE(); prompt = v; }
        else if (!strcmp(a, "--chat")) { VALUE(); chat = v; }
        else if (!strcmp(a, "--system")) { VALUE(); system = v; }
        else if (!strcmp(a, "--ids-file")) { VALUE(); ids_file = v; }
        else if (!strcmp(a, "-n")) { VALUE(); if (cli_int("generate", a, v, 0, 1 << 20, &gp.max_tokens)) return 2; }
        else if (!strcmp(a, "--temp")) { VALUE(); if (cli_float("generate", a, v, 0, 100, &gp.sampling.temperature)) return 2; }
        else if (!strcmp(a, "--top-k")) { VALUE(); if (cli_int("generate", a, v, 0, 1 << 24, &gp.sampling.top_k)) return 2; }
        else if (!strcmp(a, "--top-p")) { VALUE(); if (cli_float("generate", a, v, 0, 1, &gp.sampling.top_p)) return 2; }
        else if (!strcmp(a, "--min-p")) { VALUE(); if (cli_float("generate", a, v, 0, 1, &gp.sampling.min_p)) return 2; }
        else if (!strcmp(a, "--repeat-penalty")) { VALUE(); if (cli_float("generate", a, v, 0.01, 100, &gp.sampling.repeat_penalty)) return 2; }
        else if (!strcmp(a, "--seed")) { VALUE(); if (cli_u64("generate", a, v, &gp.sampling.seed)) return 2; }
        else if (!strcmp(a, "-t")) { VALUE(); if (cli_int("generate", a, v, 1, 1024, &n_threads)) return 2; }
        else if (!strcmp(a, "--weights")) { VALUE(); if (cli_weights("generate", v, &weights)) return 2; }
        else if (!strcmp(a, "--device")) { VALUE(); if (cli_device("generate", v, &device)) return 2; }
        else if (!strcmp(a, "--kv-bits")) { VALUE(); if (cli_int("generate", a, v, 4, 32, &gp.kv_bits)) return 2; }
        else if (!strcmp(a, "--stop")) {
            VALUE();
            if (gp.n_stops == MAX_STOPS) { fprintf(stderr, "ebb generate: at most %d --stop strings\n", MAX_STOPS); return 2; }
            stops[gp.n_stops++] = v;
        }
        else if (!strcmp(a, "--then")) { VALUE(); then = v; }
        else if (!strcmp(a, "--print-ids")) ps.print_ids = 1;
        else if (!strncmp(a, "--compress", 10)) {
            VALUE();
            const int known = cli_compress_flag("generate", a, v, &gp.compress);
            if (known != 1) {
                if (known == 0) fprintf(stderr, "ebb generate: unknown option '%s'\n", a);
                return 2;
            }
        }
        else { fprintf(stderr, "ebb generate: unknown option '%s'\n", a); generate_usage(stderr); return 2; }
#undef VALUE
    }
    if ((prompt != NULL) + (chat != NULL) + (ids_file != NULL) != 1) {
        fprintf(stderr, "ebb generate: give exactly one of -p, --chat, --ids-file\n");
        return 2;
    }
    gp.stops = stops;
    struct model m;
    struct model_run *run = cli_load_model("generate", &m, model_path, weights, device, n_threads);
    if (!run) return 1;
    int32_t *ids = NULL;
    int n = build_prompt(&m, prompt, chat, system, ids_file, &ids);
    if (n > 0 && then && (n = append_then(&m, then, &ids, n, &gp.compress)) < 0) n = -1;
    int rc = 1;
    if (n > 0) {
        struct gen_result res;
        if (generate(run, ids, n, &gp, print_text, &ps, &res) == 0) {
            printf("\n");
            fprintf(stderr, "[prompt %d tokens, %.1f tok/s | generated %d tokens, %.1f tok/s | finish: %s]\n",
                    res.n_prompt, res.prefill_s > 0 ? res.n_prompt / res.prefill_s : 0.0,
                    res.n_generated, res.decode_s > 0 ? res.n_generated / res.decode_s : 0.0,
                    finish_reason_name(res.finish));
            const struct compress_report *c = &res.compress;
            if (c->applied)
                fprintf(stderr, "[compressed: kept %d, demoted %d, dropped %d of %d positions; KV %zu -> %zu bytes; %.0f ms]\n",
                        c->kept, c->demoted, c->dropped, c->n_prompt, c->bytes_before, c->bytes_after, c->ms);
            else if (gp.compress.mode != COMPRESS_OFF)
                fprintf(stderr, "[not compressed: %d tokens to compress; --compress-min is %d, and the budget must "
                        "leave something out]\n", compress_point(&gp.compress, n), gp.compress.min_prompt);
            rc = 0;
        } else {
            fprintf(stderr, "ebb generate: %s\n", res.error);
        }
    } else if (n == 0) {
        fprintf(stderr, "ebb generate: the prompt is empty\n");
    }
    free(ids);
    model_run_free(run);
    model_free(&m);
    return rc;
}

int cmd_logits(int argc, char **argv) {
    const char *model_path = NULL, *ids_file = NULL, *out_path = NULL;
    int all = 0, n_threads = 0;
    enum model_weights weights = MODEL_WEIGHTS_NATIVE;
    const char *device = "cpu";
    uint64_t stack_bytes = UINT64_MAX;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: ebb logits -m MODEL --ids-file FILE -o OUT [--all] [-t THREADS] [--weights native|f32]\n"
                   "                  [--stack-bytes N] [--device cpu|cuda[:N]]\n"
                   "  writes float32 logits of the last position ([n_vocab]) or, with --all,\n"
                   "  of every position ([n_tokens][n_vocab]) to OUT; --stack-bytes: a bitstack\n"
                   "  file computes with the prefix of its stack that fits in N bytes\n");
            return 0;
        }
        if (!strcmp(a, "-m") || !strcmp(a, "--ids-file") || !strcmp(a, "-o") || !strcmp(a, "-t") ||
            !strcmp(a, "--weights") || !strcmp(a, "--stack-bytes") || !strcmp(a, "--device")) {
            if (!(v = cli_value("logits", argc, argv, &i))) return 2;
            if (!strcmp(a, "--device")) { if (cli_device("logits", v, &device)) return 2; continue; }
            if (!strcmp(a, "--weights")) { if (cli_weights("logits", v, &weights)) return 2; continue; }
            if (!strcmp(a, "--stack-bytes")) { if (cli_u64("logits", a, v, &stack_bytes)) return 2; continue; }
            if (a[1] == 'm') model_path = v;
            else if (a[1] == 'o') out_path = v;
            else if (a[1] == 't') { if (cli_int("logits", a, v, 1, 1024, &n_threads)) return 2; }
            else ids_file = v;
        } else if (!strcmp(a, "--all")) {
            all = 1;
        } else {
            fprintf(stderr, "ebb logits: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!ids_file || !out_path) {
        fprintf(stderr, "ebb logits: --ids-file and -o are required\n");
        return 2;
    }
    char *text = cli_read_file("logits", ids_file, NULL);
    if (!text) return 1;
    int32_t *ids = NULL;
    int n = cli_parse_ids("logits", text, &ids);
    free(text);
    if (n <= 0) {
        if (n == 0) fprintf(stderr, "ebb logits: no token ids in %s\n", ids_file);
        free(ids);
        return 1;
    }
    struct model m;
    struct model_run *run = cli_load_model("logits", &m, model_path, weights, device, n_threads);
    if (!run) { free(ids); return 1; }
    const int stack_rc = cli_fit_stack("logits", &m, stack_bytes);
    if (stack_rc) {
        free(ids); model_run_free(run); model_free(&m);
        return stack_rc;
    }
    int rc = 1;
    struct kv_cache kv;
    struct kv_account f32_cache;   /* an f32 cache where the model computes; no budget (32 bits: never refused) */
    kv_account_init(&f32_cache, &m.cfg, 32, 0);
    f32_cache.be = m.be;
    size_t rows = all ? (size_t)n : 1;
    float *logits = malloc(rows * (size_t)m.cfg.n_vocab * sizeof(float));
    int bad_id = -1;
    for (int i = 0; i < n && bad_id < 0; i++)
        if (ids[i] < 0 || ids[i] >= m.cfg.n_vocab) bad_id = i;
    if (bad_id >= 0) {
        fprintf(stderr, "ebb logits: token id %d (at %d) is out of range (vocabulary has %d)\n", ids[bad_id], bad_id,
                m.cfg.n_vocab);
    } else if (!logits || kv_cache_init(&kv, &m.cfg, n, &f32_cache)) {
        fprintf(stderr, "ebb logits: out of memory\n");
    } else {
        if (model_forward(run, &kv, ids, n, logits, all)) {
            fprintf(stderr, "ebb logits: the forward pass failed (%s)\n", model_run_failure(run));
        } else {
            FILE *f = fopen(out_path, "wb");
            int ok = f && fwrite(logits, sizeof(float) * (size_t)m.cfg.n_vocab, rows, f) == rows;
            if (f && fclose(f)) ok = 0;
            if (ok) rc = 0;
            else fprintf(stderr, "ebb logits: cannot write %s\n", out_path);
        }
        kv_cache_free(&kv);
    }
    kv_account_destroy(&f32_cache);
    free(logits);
    free(ids);
    model_run_free(run);
    model_free(&m);
    return rc;
}
