/* Shared helpers of the command-line subcommands; see cli.h. */
#include "server/cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bitstack.h"
#include "engine/model.h"
#include "kernels/backend.h"

int cli_int(const char *cmd, const char *flag, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "ebb %s: %s expects an integer in [%ld, %ld], got '%s'\n", cmd, flag, lo, hi, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int cli_float(const char *cmd, const char *flag, const char *s, double lo, double hi, float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "ebb %s: %s expects a number in [%g, %g], got '%s'\n", cmd, flag, lo, hi, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int cli_u64(const char *cmd, const char *flag, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        fprintf(stderr, "ebb %s: %s expects a non-negative integer, got '%s'\n", cmd, flag, s);
        return -1;
    }
    *out = v;
    return 0;
}

const char *cli_value(const char *cmd, int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "ebb %s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

char *cli_read_file(const char *cmd, const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "ebb %s: cannot open %s: %s\n", cmd, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        n += fread(buf + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        char *grown = realloc(buf, cap * 2);
        if (!grown) { free(buf); buf = NULL; break; }
        buf = grown;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        fprintf(stderr, "ebb %s: cannot read %s\n", cmd, path);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int cli_parse_ids(const char *cmd, const char *text, int32_t **ids) {
    size_t cap = 256, n = 0;
    int32_t *out = malloc(cap * sizeof *out);
    const char *p = text;
    while (out) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "ebb %s: bad token id near '%.20s'\n", cmd, p);
            free(out);
            return -1;
        }
        if (n == cap) {
            int32_t *grown = realloc(out, cap * 2 * sizeof *out);
            if (!grown) { free(out); out = NULL; break; }
            out = grown;
            cap *= 2;
        }
        out[n++] = (int32_t)v;
        p = end;
    }
    if (!out) {
        fprintf(stderr, "ebb %s: out of memory\n", cmd);
        return -1;
    }
    *ids = out;
    return (int)n;
}

int cli_compress_flag(const char *cmd, const char *a, const char *v, struct compress_params *p) {
    int n;
    if (!strcmp(a, "--compress")) {
        if ((n = compress_mode_parse(v)) < 0) {
            fprintf(stderr, "ebb %s: --compress must be off, demote or drop, not '%s'\n", cmd, v);
            return 2;
        }
        p->mode = (enum compress_mode)n;
    } else if (!strcmp(a, "--compress-select")) {
        if ((n = compress_select_parse(v)) < 0) {
            fprintf(stderr, "ebb %s: --compress-select must be snapkv, snapkv_head, reconstruct, random or recent, not '%s'\n", cmd, v);
            return 2;
        }
        p->select = (enum compress_select)n;
    } else if (!strcmp(a, "--compress-budget")) {
        if (cli_float(cmd, a, v, 0, 1, &p->budget)) return 2;
        p->budget_tokens = 0;
    } else if (!strcmp(a, "--compress-low")) {
        if (cli_float(cmd, a, v, 0, 1, &p->low_budget)) return 2;
    } else if (!strcmp(a, "--compress-tokens")) {
        if (cli_int(cmd, a, v, 1, 1 << 30, &p->budget_tokens)) return 2;
    } else if (!strcmp(a, "--compress-keys")) {
        if (cli_int(cmd, a, v, 2, 4, &p->low_key_bits) || p->low_key_bits == 3) {
            fprintf(stderr, "ebb %s: --compress-keys must be 2 or 4\n", cmd);
            return 2;
        }
    } else if (!strcmp(a, "--compress-lookahead")) {
        if (cli_int(cmd, a, v, 0, COMPRESS_MAX_LOOKAHEAD, &p->lookahead)) return 2;
    } else if (!strcmp(a, "--compress-min")) {
        if (cli_int(cmd, a, v, 0, 1 << 30, &p->min_prompt)) return 2;
    } else {
        return 0;
    }
    return 1;
}

int cli_device(const char *cmd, const char *value, const char **out) {
    const char *problem = ebb_device_name_problem(value);
    if (problem) {
        fprintf(stderr, "ebb %s: --device '%s': %s\n", cmd, value, problem);
        return 2;
    }
    *out = value;
    return 0;
}

int cli_weights(const char *cmd, const char *value, enum model_weights *out) {
    if (!strcmp(value, "native")) *out = MODEL_WEIGHTS_NATIVE;
    else if (!strcmp(value, "f32")) *out = MODEL_WEIGHTS_F32;
    else {
        fprintf(stderr, "ebb %s: --weights must be native or f32, not '%s'\n", cmd, value);
        return 2;
    }
    return 0;
}

struct model_run *cli_load_model(const char *cmd, struct model *m, const char *path, enum model_weights weights,
                                 const char *device, int n_threads) {
    char err[512];
    if (!path) {
        fprintf(stderr, "ebb %s: -m MODEL is required\n", cmd);
        return NULL;
    }
    if (model_load(m, path, weights, err, sizeof err)) {
        fprintf(stderr, "ebb %s: %s\n", cmd, err);
        return NULL;
    }
    if (model_use_device(m, device, err, sizeof err)) {
        fprintf(stderr, "ebb %s: --device %s: %s\n", cmd, device, err);
        model_free(m);
        return NULL;
    }
    struct model_run *r = model_run_new(m, n_threads);
    if (!r) {
        fprintf(stderr, "ebb %s: out of memory or threads\n", cmd);
        model_free(m);
    }
    return r;
}

int cli_fit_stack(const char *cmd, struct model *m, uint64_t stack_bytes) {
    if (!m->stack) {
        if (stack_bytes == UINT64_MAX) return 0;
        fprintf(stderr, "ebb %s: --stack-bytes applies to bitstack files only\n", cmd);
        return 2;
    }
    char err[512];
    if (bitstack_fit(m, stack_bytes > SIZE_MAX ? SIZE_MAX : (size_t)stack_bytes, err, sizeof err)) {
        fprintf(stderr, "ebb %s: %s\n", cmd, err);
        return 1;
    }
    const struct bitstack *s = m->stack;
    int lo = s->levels, hi = 0;
    for (int i = 0; i < s->n_matrices; i++) {
        lo = s->depth[i] < lo ? s->depth[i] : lo;
        hi = s->depth[i] > hi ? s->depth[i] : hi;
    }
    printf("stack: %zu of %zu bytes resident, %d to %d of %d levels per matrix", s->resident_bytes,
           s->cum_bytes[(size_t)s->n_matrices * s->levels], lo, hi, s->levels);
    if (s->base_bytes) printf(", on a W2G64 base of %zu bytes", s->base_bytes);
    printf("\n");
    return 0;
}
