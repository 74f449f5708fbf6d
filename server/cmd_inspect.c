/* `ebb inspect`: what a GGUF file holds, and any tensor as raw floats.
 *
 *   ebb inspect FILE                              version, metadata, tensor table
 *   ebb inspect FILE --tensor NAME --out OUT.f32  NAME dequantized to little-endian f32
 *
 * The listing is for people (and for tests that compare it with the gguf
 * Python package): metadata as `key = value`, strings quoted and escaped,
 * arrays summarised as `type[n]`; one line per tensor with its type, shape
 * (ne[0] first, the contiguous dimension, as GGUF stores it) and bytes.
 * The dump goes through storage/gguf.c's validation and formats.c's
 * dequantizers, so it is also how the reference tests see exactly what the
 * engine would load.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/formats.h"
#include "server/cli.h"
#include "storage/gguf.h"

static void inspect_usage(FILE *out) {
    fprintf(out,
        "usage: ebb inspect FILE [--tensor NAME --out OUT.f32]\n"
        "  without options: print the GGUF version, metadata and tensor table\n"
        "  --tensor NAME    the tensor to dump (with --out)\n"
        "  --out OUT.f32    write it dequantized, as raw little-endian float32\n");
}

static const char *value_type_name(uint32_t t) {
    static const char *const names[GGUF_VALUE_TYPE_COUNT_] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
    };
    return t < GGUF_VALUE_TYPE_COUNT_ ? names[t] : "?";
}

/* A string value, quoted, with control characters and quotes escaped and
 * very long values cut (a chat template can be kilobytes). */
static void print_str(struct gguf_str s) {
    const uint64_t max = 200;
    putchar('"');
    for (uint64_t i = 0; i < s.len && i < max; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('"');
    if (s.len > max) printf("... (%" PRIu64 " bytes)", s.len);
}

static void print_scalar(uint32_t type, const uint8_t *p) {
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            float f32; uint64_t u64; int64_t i64; double f64; } v;
    size_t sizes[GGUF_VALUE_TYPE_COUNT_] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };
    memcpy(&v, p, sizes[type]);                 /* values in the file are unaligned */
    switch (type) {
    case GGUF_UINT8: printf("%u", v.u8); break;
    case GGUF_INT8: printf("%d", v.i8); break;
    case GGUF_UINT16: printf("%u", v.u16); break;
    case GGUF_INT16: printf("%d", v.i16); break;
    case GGUF_UINT32: printf("%" PRIu32, v.u32); break;
    case GGUF_INT32: printf("%" PRId32, v.i32); break;
    case GGUF_FLOAT32: printf("%.9g", v.f32); break;
    case GGUF_BOOL: fputs(v.u8 ? "true" : "false", stdout); break;
    case GGUF_UINT64: printf("%" PRIu64, v.u64); break;
    case GGUF_INT64: printf("%" PRId64, v.i64); break;
    case GGUF_FLOAT64: printf("%.17g", v.f64); break;
    default: fputs("?", stdout);
    }
}

static void print_listing(const struct gguf_file *f) {
    printf("GGUF version %" PRIu32 ", alignment %" PRIu32 ", %" PRIu64 " metadata keys, %" PRIu64
           " tensors\n\n", f->version, f->alignment, f->n_kv, f->n_tensors);
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const struct gguf_kv *kv = &f->kv[i];
        printf("%.*s = ", (int)kv->key.len, kv->key.ptr);
        if (kv->type == GGUF_ARRAY) printf("%s[%" PRIu64 "]", value_type_name(kv->arr_type), kv->arr_n);
        else if (kv->type == GGUF_STRING) {
            struct gguf_str s;
            memcpy(&s.len, kv->value, sizeof s.len);
            s.ptr = (const char *)kv->value + sizeof s.len;
            print_str(s);
        } else print_scalar(kv->type, kv->value);
        putchar('\n');
    }
    printf("\n%-40s %-6s %-24s %14s\n", "tensor", "type", "shape", "bytes");
    uint64_t total = 0;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const struct gguf_tensor *t = &f->tensors[i];
        const struct ebb_type_info *ti = ebb_type_info(t->type);
        char shape[96];
        int len = 0;
        for (uint32_t d = 0; d < t->n_dims && len < (int)sizeof shape; d++)
            len += snprintf(shape + len, sizeof shape - (size_t)len, d ? "x%" PRIu64 : "%" PRIu64, t->ne[d]);
        printf("%-40.*s %-6s %-24s %14" PRIu64 "\n", (int)t->name.len, t->name.ptr,
               ti ? ti->name : "?", shape, t->nbytes);
        total += t->nbytes;
    }
    printf("\n%" PRIu64 " tensors, %" PRIu64 " bytes of tensor data\n", f->n_tensors, total);
}

/* Writes n floats as little-endian bytes whatever the host order. */
static int write_f32_le(FILE *out, const float *v, uint64_t n) {
    uint8_t buf[4096];
    size_t fill = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &v[i], 4);
        buf[fill++] = (uint8_t)u;
        buf[fill++] = (uint8_t)(u >> 8);
        buf[fill++] = (uint8_t)(u >> 16);
        buf[fill++] = (uint8_t)(u >> 24);
        if (fill == sizeof buf || i + 1 == n) {
            if (fwrite(buf, 1, fill, out) != fill) return -1;
            fill = 0;
        }
    }
    return 0;
}

static int dump_tensor(const struct gguf_file *f, const char *name, const char *out_path) {
    const struct gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        fprintf(stderr, "ebb inspect: %s has no tensor named '%s'\n", f->path, name);
        return 1;
    }
    const struct ebb_type_info *ti = ebb_type_info(t->type);
    if (!ti || !ti->to_f32) {
        fprintf(stderr, "ebb inspect: tensor '%s' has type %s, which ebb cannot convert to f32\n",
                name, ti ? ti->name : "?");
        return 1;
    }
    if (t->n_elems > SIZE_MAX / sizeof(float)) {
        fprintf(stderr, "ebb inspect: tensor '%s' is too large to dump\n", name);
        return 1;
    }
    float *v = malloc((size_t)(t->n_elems ? t->n_elems : 1) * sizeof *v);
    if (!v) {
        fprintf(stderr, "ebb inspect: out of memory for %" PRIu64 " floats\n", t->n_elems);
        return 1;
    }
    if (gguf_tensor_to_f32(t, v)) {
        fprintf(stderr, "ebb inspect: cannot dequantize tensor '%s'\n", name);
        free(v);
        return 1;
    }
    FILE *out = fopen(out_path, "wb");
    if (!out) {
        fprintf(stderr, "ebb inspect: cannot create %s: %s\n", out_path, strerror(errno));
        free(v);
        return 1;
    }
    int bad = write_f32_le(out, v, t->n_elems);
    if (fclose(out) != 0) bad = -1;
    free(v);
    if (bad) {
        fprintf(stderr, "ebb inspect: cannot write %s: %s\n", out_path, strerror(errno));
        return 1;
    }
    return 0;
}

int cmd_inspect(int argc, char **argv) {
    const char *file = NULL, *tensor = NULL, *out_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { inspect_usage(stdout); return 0; }
        if (a[0] == '-' && a[1] != '\0') {
            if (!(v = cli_value("inspect", argc, argv, &i))) return 2;
            if (!strcmp(a, "--tensor")) tensor = v;
            else if (!strcmp(a, "--out")) out_path = v;
            else { fprintf(stderr, "ebb inspect: unknown option '%s'\n", a); inspect_usage(stderr); return 2; }
        } else if (!file) {
            file = a;
        } else {
            fprintf(stderr, "ebb inspect: more than one FILE ('%s' and '%s')\n", file, a);
            return 2;
        }
    }
    if (!file) { fprintf(stderr, "ebb inspect: FILE is required\n"); inspect_usage(stderr); return 2; }
    if (!tensor != !out_path) {
        fprintf(stderr, "ebb inspect: --tensor and --out go together\n");
        return 2;
    }
    struct gguf_file f;
    char err[512];
    if (gguf_open(&f, file, err, sizeof err)) {
        fprintf(stderr, "ebb inspect: %s\n", err);
        return 1;
    }
    int rc = 0;
    if (tensor) rc = dump_tensor(&f, tensor, out_path);
    else print_listing(&f);
    gguf_close(&f);
    return rc;
}
