/* `ebb tokenize`: runs the model's tokenizer on text and prints token ids.
 *
 * It opens the GGUF, builds the tokenizer from its metadata and closes the
 * file again: no weights are read, so it is instant even for large models.
 * Besides plain ids it can show each token's text (--pieces) or print the
 * text decoded back through the streaming detokenizer (--roundtrip); the
 * reference tests use both to compare ebb with Hugging Face `tokenizers`.
 * With --file, every line is tokenized on its own (only the trailing "\n" is
 * stripped, so "\r", tabs and trailing spaces reach the tokenizer) and each
 * produces exactly one output line, which keeps the output aligned with the
 * input even for empty lines.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/tokenizer.h"
#include "engine/utf8.h"
#include "server/cli.h"
#include "storage/gguf.h"

enum output_mode { OUT_IDS, OUT_PIECES, OUT_ROUNDTRIP };

struct tokenize_opts {
    const char *model;
    const char *file;
    const char *text;
    int parse_special;
    enum output_mode mode;
    int stats;
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: ebb tokenize -m MODEL [options] TEXT\n"
            "       ebb tokenize -m MODEL [options] --file FILE\n"
            "\n"
            "Prints the token ids of TEXT, space-separated on one line. With --file, each\n"
            "line of FILE (\"-\" for stdin) is tokenized separately, one output line per\n"
            "input line; only the trailing newline is removed.\n"
            "\n"
            "options:\n"
            "  -m, --model PATH   GGUF model whose tokenizer to use (weights are not read)\n"
            "  -f, --file FILE    tokenize every line of FILE\n"
            "      --no-special   treat special-token texts such as <|im_start|> as plain text\n"
            "      --pieces       print each token as ID:\"TEXT\" (C-style escapes)\n"
            "      --roundtrip    print the text decoded back from the ids instead\n"
            "      --stats        report load time and encode speed on stderr\n"
            "  -h, --help         show this help\n"
            "Use -- before a TEXT that starts with '-'.\n");
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* 0 ok, 1 error (message printed), 2 help printed. */
static int set_text(struct tokenize_opts *o, const char *a) {
    if (o->text) {
        fprintf(stderr, "ebb tokenize: expected one TEXT argument (quote the text)\n");
        return 1;
    }
    o->text = a;
    return 0;
}

/* 0 ok, 1 error (message printed), 2 help printed. */
static int parse_args(int argc, char **argv, struct tokenize_opts *o) {
    memset(o, 0, sizeof *o);
    o->parse_special = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int is_model = !strcmp(a, "-m") || !strcmp(a, "--model");
        int is_file = !strcmp(a, "-f") || !strcmp(a, "--file");
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 2;
        } else if (is_model || is_file) {
            if (i + 1 >= argc) {
                fprintf(stderr, "ebb tokenize: %s needs a value\n", a);
                return 1;
            }
            *(is_model ? &o->model : &o->file) = argv[++i];
        } else if (!strcmp(a, "--no-special")) {
            o->parse_special = 0;
        } else if (!strcmp(a, "--pieces")) {
            o->mode = OUT_PIECES;
        } else if (!strcmp(a, "--roundtrip")) {
            o->mode = OUT_ROUNDTRIP;
        } else if (!strcmp(a, "--stats")) {
            o->stats = 1;
        } else if (!strcmp(a, "--")) {
            for (i++; i < argc; i++)
                if (set_text(o, argv[i])) return 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "ebb tokenize: unknown option %s (see ebb tokenize --help)\n", a);
            return 1;
        } else if (set_text(o, a)) {
            return 1;
        }
    }
    if (!o->model) {
        fprintf(stderr, "ebb tokenize: no model given (-m MODEL)\n");
        return 1;
    }
    if (!o->text == !o->file) {
        fprintf(stderr, "ebb tokenize: give either TEXT or --file FILE\n");
        return 1;
    }
    return 0;
}

/* Writes a piece as C-style escaped text: printable ASCII and well-formed
 * multi-byte UTF-8 as is, everything else as \n, \t, \r or \xHH. */
static void print_escaped(FILE *out, const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t l = c >= 0x80 ? utf8_seq_len(s + i, n - i) : 0;
        if (l) {
            fwrite(s + i, 1, l, out);
            i += l;
            continue;
        }
        if (c == '\n') fputs("\\n", out);
        else if (c == '\t') fputs("\\t", out);
        else if (c == '\r') fputs("\\r", out);
        else if (c == '\\' || c == '"') fprintf(out, "\\%c", c);
        else if (c < 0x20 || c >= 0x7F) fprintf(out, "\\x%02X", c);
        else fputc(c, out);
        i++;
    }
}

static int print_roundtrip(const struct ebb_tokenizer *t, const int32_t *ids, int n, FILE *out) {
    struct detok d;
    detok_init(&d, t);
    /* A piece can expand at most 3x (each byte to U+FFFD) plus what was held. */
    size_t cap = 4096;
    char *buf = malloc(cap);
    if (!buf) return -1;
    for (int i = 0; i < n; i++) {
        size_t len;
        tokenizer_piece(t, ids[i], &len);
        if (3 * len + 16 > cap) {
            cap = 3 * len + 16;
            char *nb = realloc(buf, cap);
            if (!nb) { free(buf); return -1; }
            buf = nb;
        }
        fwrite(buf, 1, detok_push(&d, ids[i], buf, cap), out);
    }
    fwrite(buf, 1, detok_flush(&d, buf, cap), out);
    free(buf);
    return 0;
}

static int print_tokens(const struct ebb_tokenizer *t, const int32_t *ids, int n,
                        enum output_mode mode, FILE *out) {
    if (mode == OUT_ROUNDTRIP) {
        if (print_roundtrip(t, ids, n, out)) return -1;
    } else {
        for (int i = 0; i < n; i++) {
            fprintf(out, i ? " %d" : "%d", ids[i]);
            if (mode == OUT_PIECES) {
                size_t len;
                const char *p = tokenizer_piece(t, ids[i], &len);
                fputs(":\"", out);
                print_escaped(out, p, len);
                fputc('"', out);
            }
        }
    }
    fputc('\n', out);
    return 0;
}

struct run_stats { double encode_s; size_t bytes, tokens; };

static int tokenize_one(const struct ebb_tokenizer *t, const struct tokenize_opts *o,
                        const char *text, size_t len, const char *where, struct run_stats *st) {
    int32_t *ids;
    double t0 = now_s();
    int n = tokenizer_encode(t, text, len, o->parse_special, &ids);
    st->encode_s += now_s() - t0;
    if (n < 0) {
        fprintf(stderr, "ebb tokenize: %s: the text is not valid UTF-8 (or out of memory)\n", where);
        return -1;
    }
    st->bytes += len;
    st->tokens += (size_t)n;
    int rc = print_tokens(t, ids, n, o->mode, stdout);
    free(ids);
    if (rc) fprintf(stderr, "ebb tokenize: out of memory\n");
    return rc;
}

static int tokenize_file(const struct ebb_tokenizer *t, const struct tokenize_opts *o,
                         struct run_stats *st) {
    FILE *in = strcmp(o->file, "-") ? fopen(o->file, "rb") : stdin;
    if (!in) {
        fprintf(stderr, "ebb tokenize: %s: %s\n", o->file, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    long lineno = 0;
    int rc = 0;
    while (!rc && (got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        size_t len = (size_t)got;
        if (len && line[len - 1] == '\n') len--;
        char where[64];
        snprintf(where, sizeof where, "line %ld", lineno);
        rc = tokenize_one(t, o, line, len, where, st);
    }
    if (!rc && ferror(in)) {
        fprintf(stderr, "ebb tokenize: %s: read error: %s\n", o->file, strerror(errno));
        rc = -1;
    }
    free(line);
    if (in != stdin) fclose(in);
    return rc;
}

int cmd_tokenize(int argc, char **argv) {
    struct tokenize_opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc) return prc == 2 ? 0 : 2;

    char err[512];
    struct gguf_file f;
    double t0 = now_s();
    if (gguf_open(&f, o.model, err, sizeof err)) {
        fprintf(stderr, "ebb tokenize: %s\n", err);
        return 1;
    }
    struct ebb_tokenizer *t = tokenizer_load(&f, err, sizeof err);
    gguf_close(&f);   /* the tokenizer keeps its own copy of everything */
    double load_s = now_s() - t0;
    if (!t) {
        fprintf(stderr, "ebb tokenize: %s\n", err);
        return 1;
    }
    struct run_stats st = {0};
    int rc = o.file ? tokenize_file(t, &o, &st)
                    : tokenize_one(t, &o, o.text, strlen(o.text), "TEXT", &st);
    if (fflush(stdout) && !rc) {
        fprintf(stderr, "ebb tokenize: writing output: %s\n", strerror(errno));
        rc = -1;
    }
    if (o.stats)
        fprintf(stderr, "load %.1f ms (open + tokenizer), %d tokens in vocabulary; encoded %zu bytes "
                "into %zu tokens in %.1f ms (%.1f MB/s)\n",
                load_s * 1e3, tokenizer_n_vocab(t), st.bytes, st.tokens, st.encode_s * 1e3,
                st.encode_s > 0 ? st.bytes / st.encode_s / 1e6 : 0.0);
    tokenizer_free(t);
    return rc ? 1 : 0;
}
