/* GGUF reader.
 *
 * Design: map the whole file read-only, then parse it with a cursor that
 * refuses to step past the end. Parsing is the validation: every count is
 * checked against the bytes that could possibly hold it before anything is
 * allocated (an "absurd count" in a 1 KiB file fails before malloc), every
 * string length against the bytes left, every tensor's type against the type
 * table and its byte range against the data section. Nothing after gguf_open
 * re-checks, so nothing after gguf_open may be reached with a bad file.
 *
 * Trade-off: we keep pointers into the mapping instead of copying strings and
 * tensors. That makes open cheap (a 100 MB model opens in microseconds) and
 * lets the OS share and page the data, at the price of strings that are not
 * NUL-terminated (struct gguf_str) and a mapping that must outlive every user.
 */
#include "storage/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/formats.h"
#include "storage/error.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
/* Sanity limits: far above any real model, low enough that arithmetic on
 * them cannot overflow 64 bits. */
#define GGUF_MAX_KEY_LEN (1u << 16)
#define GGUF_MAX_NAME_LEN (1u << 16)

struct cursor {
    const uint8_t *base;
    size_t size;
    size_t pos;
    char *err;
    size_t errlen;
    const char *name;
};

/* "NAME: message" (storage/error.h); returns -1. */
#define fail(c, fmt, ...) errf((c)->err, (c)->errlen, "%s: " fmt, (c)->name, ##__VA_ARGS__)

static int need(struct cursor *c, uint64_t n, const char *what) {
    if (n > c->size - c->pos)
        return fail(c, "truncated: %s at offset %zu needs %llu bytes, file has %zu", what, c->pos,
                    (unsigned long long)n, c->size - c->pos);
    return 0;
}

static int read_u32(struct cursor *c, uint32_t *out, const char *what) {
    if (need(c, 4, what)) return -1;
    memcpy(out, c->base + c->pos, 4);
    c->pos += 4;
    return 0;
}

static int read_u64(struct cursor *c, uint64_t *out, const char *what) {
    if (need(c, 8, what)) return -1;
    memcpy(out, c->base + c->pos, 8);
    c->pos += 8;
    return 0;
}

static int read_str(struct cursor *c, struct gguf_str *s, uint64_t max_len, const char *what) {
    uint64_t len;
    if (read_u64(c, &len, what)) return -1;
    if (len > max_len) return fail(c, "%s length %llu is absurd", what, (unsigned long long)len);
    if (need(c, len, what)) return -1;
    s->ptr = (const char *)c->base + c->pos;
    s->len = len;
    c->pos += len;
    return 0;
}

size_t gguf_scalar_size(uint32_t type) {
    switch (type) {
    case GGUF_UINT8: case GGUF_INT8: case GGUF_BOOL: return 1;
    case GGUF_UINT16: case GGUF_INT16: return 2;
    case GGUF_UINT32: case GGUF_INT32: case GGUF_FLOAT32: return 4;
    case GGUF_UINT64: case GGUF_INT64: case GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

/* Skips over one value of a given type, validating it. Strings inside arrays
 * are walked one by one because each carries its own length. */
static int skip_value(struct cursor *c, uint32_t type, const char *key) {
    if (type == GGUF_STRING) {
        struct gguf_str s;
        return read_str(c, &s, c->size, "string value");
    }
    size_t sz = gguf_scalar_size(type);
    if (!sz) return fail(c, "key '%s' has unknown value type %u", key, type);
    if (need(c, sz, "value")) return -1;
    if (type == GGUF_BOOL && c->base[c->pos] > 1)
        return fail(c, "key '%s' has bool value %u", key, c->base[c->pos]);
    c->pos += sz;
    return 0;
}

static int parse_kv(struct cursor *c, struct gguf_kv *kv) {
    char key[128];
    if (read_str(c, &kv->key, GGUF_MAX_KEY_LEN, "metadata key")) return -1;
    snprintf(key, sizeof key, "%.*s", (int)(kv->key.len < 100 ? kv->key.len : 100), kv->key.ptr);
    if (read_u32(c, &kv->type, "metadata value type")) return -1;
    if (kv->type != GGUF_ARRAY) {
        kv->value = c->base + c->pos;
        return skip_value(c, kv->type, key);
    }
    if (read_u32(c, &kv->arr_type, "array element type")) return -1;
    if (read_u64(c, &kv->arr_n, "array length")) return -1;
    if (kv->arr_type == GGUF_ARRAY) return fail(c, "key '%s': nested arrays are not supported", key);
    size_t esz = kv->arr_type == GGUF_STRING ? 8 : gguf_scalar_size(kv->arr_type);
    if (!esz) return fail(c, "key '%s' has unknown array element type %u", key, kv->arr_type);
    /* Every element occupies at least esz bytes: reject absurd counts up front. */
    if (kv->arr_n > (c->size - c->pos) / esz)
        return fail(c, "key '%s': array of %llu elements does not fit in the file", key,
                    (unsigned long long)kv->arr_n);
    kv->value = c->base + c->pos;
    if (kv->arr_type != GGUF_STRING) {
        if (kv->arr_type == GGUF_BOOL) {
            for (uint64_t i = 0; i < kv->arr_n; i++)
                if (c->base[c->pos + i] > 1) return fail(c, "key '%s': bad bool in array", key);
        }
        c->pos += kv->arr_n * esz;
        return 0;
    }
    for (uint64_t i = 0; i < kv->arr_n; i++)
        if (skip_value(c, GGUF_STRING, key)) return -1;
    return 0;
}

static int parse_tensor_info(struct cursor *c, struct gguf_tensor *t, uint64_t *offset) {
    char name[128];
    if (read_str(c, &t->name, GGUF_MAX_NAME_LEN, "tensor name")) return -1;
    snprintf(name, sizeof name, "%.*s", (int)(t->name.len < 100 ? t->name.len : 100), t->name.ptr);
    if (read_u32(c, &t->n_dims, "tensor dimension count")) return -1;
    if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
        return fail(c, "tensor '%s' has %u dimensions (1..%d allowed)", name, t->n_dims, GGUF_MAX_DIMS);
    t->n_elems = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (read_u64(c, &t->ne[d], "tensor shape")) return -1;
        /* 2^40 elements per dimension and in total is far beyond any model
         * and keeps every product below 2^64. */
        if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || t->n_elems > (1ull << 40) / t->ne[d])
            return fail(c, "tensor '%s' has an absurd shape (dimension %u = %llu)", name, d,
                        (unsigned long long)t->ne[d]);
        t->n_elems *= t->ne[d];
    }
    if (read_u32(c, &t->type, "tensor type")) return -1;
    const struct ebb_type_info *ti = ebb_type_info(t->type);
    if (!ti) {
        const char *foreign = ebb_foreign_type_name(t->type);
        if (foreign)
            return fail(c, "tensor '%s' has type %s (%u), which ebb cannot compute with; it reads F32, F16, "
                        "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and its own W4G64",
                        name, foreign, t->type);
        return fail(c, "tensor '%s' has unknown type %u", name, t->type);
    }
    if (t->ne[0] % ti->block_elems)
        return fail(c, "tensor '%s': row of %llu values is not a whole number of %s blocks", name,
                    (unsigned long long)t->ne[0], ti->name);
    t->nbytes = t->n_elems / ti->block_elems * ti->block_bytes;
    return read_u64(c, offset, "tensor offset");
}

static int check_duplicate_names(struct cursor *c, const struct gguf_file *f) {
    /* Quadratic but only over names that share a length: a few hundred
     * tensors in practice. A hash set would be faster and is not needed. */
    for (uint64_t i = 0; i < f->n_tensors; i++)
        for (uint64_t j = i + 1; j < f->n_tensors; j++)
            if (f->tensors[i].name.len == f->tensors[j].name.len &&
                !memcmp(f->tensors[i].name.ptr, f->tensors[j].name.ptr, f->tensors[i].name.len))
                return fail(c, "tensor name '%.*s' appears twice", (int)f->tensors[i].name.len,
                            f->tensors[i].name.ptr);
    return 0;
}

static int parse(struct gguf_file *f, struct cursor *c) {
    uint64_t n_tensors, n_kv;
    if (need(c, 4, "magic")) return -1;
    if (memcmp(c->base, GGUF_MAGIC, 4)) return fail(c, "not a GGUF file (bad magic)");
    c->pos = 4;
    if (read_u32(c, &f->version, "version")) return -1;
    if (f->version != 2 && f->version != 3)
        return fail(c, "unsupported GGUF version %u (2 and 3 are supported)", f->version);
    if (read_u64(c, &n_tensors, "tensor count")) return -1;
    if (read_u64(c, &n_kv, "metadata count")) return -1;
    /* A key/value needs at least 8+4+1 bytes, a tensor record 8+4+8+4+8. */
    if (n_kv > (c->size - c->pos) / 13)
        return fail(c, "metadata count %llu is absurd for a %zu-byte file", (unsigned long long)n_kv, c->size);
    if (n_tensors > (c->size - c->pos) / 32)
        return fail(c, "tensor count %llu is absurd for a %zu-byte file", (unsigned long long)n_tensors, c->size);

    f->kv = calloc(n_kv ? n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *f->tensors);
    uint64_t *offsets = calloc(n_tensors ? n_tensors : 1, sizeof *offsets);
    if (!f->kv || !f->tensors || !offsets) {
        free(offsets);
        return fail(c, "out of memory");
    }
    int rc = -1;
    for (f->n_kv = 0; f->n_kv < n_kv; f->n_kv++)
        if (parse_kv(c, &f->kv[f->n_kv])) goto out;

    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const struct gguf_kv *al = gguf_find(f, "general.alignment");
    if (al) {
        uint32_t a;
        if (gguf_get_u32(f, "general.alignment", &a) || a == 0 || (a & (a - 1)))
            { fail(c, "general.alignment must be a power of two"); goto out; }
        f->alignment = a;
    }
    for (f->n_tensors = 0; f->n_tensors < n_tensors; f->n_tensors++)
        if (parse_tensor_info(c, &f->tensors[f->n_tensors], &offsets[f->n_tensors])) goto out;

    size_t data_start = (c->pos + f->alignment - 1) / f->alignment * f->alignment;
    if (n_tensors && data_start > c->size) { fail(c, "truncated: no tensor data section"); goto out; }
    for (uint64_t i = 0; i < n_tensors; i++) {
        struct gguf_tensor *t = &f->tensors[i];
        uint64_t off = offsets[i];
        if (off % f->alignment) {
            fail(c, "tensor '%.*s' offset %llu is not aligned to %u", (int)t->name.len, t->name.ptr,
                 (unsigned long long)off, f->alignment);
            goto out;
        }
        if (off > c->size - data_start || t->nbytes > c->size - data_start - off) {
            fail(c, "truncated: tensor '%.*s' (%llu bytes at data offset %llu) extends past the end of the file",
                 (int)t->name.len, t->name.ptr, (unsigned long long)t->nbytes, (unsigned long long)off);
            goto out;
        }
        t->data = c->base + data_start + off;
    }
    if (check_duplicate_names(c, f)) goto out;
    rc = 0;
out:
    free(offsets);
    return rc;
}

int gguf_open_buffer(struct gguf_file *f, const void *buf, size_t size, const char *name,
                     char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    struct cursor c = {.base = buf, .size = size, .err = err, .errlen = errlen, .name = name};
    f->path = strdup(name);
    f->map = buf;
    f->size = size;
    if (!f->path || parse(f, &c)) {
        if (!f->path) snprintf(err, errlen, "%s: out of memory", name);
        free(f->kv);
        free(f->tensors);
        free(f->path);
        memset(f, 0, sizeof *f);
        return -1;
    }
    return 0;
}

int gguf_open(struct gguf_file *f, const char *path, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if (st.st_size == 0) {
        snprintf(err, errlen, "%s: file is empty", path);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        snprintf(err, errlen, "%s: cannot map: %s", path, strerror(errno));
        return -1;
    }
    if (gguf_open_buffer(f, map, (size_t)st.st_size, path, err, errlen)) {
        munmap(map, (size_t)st.st_size);
        return -1;
    }
    f->owns_map = 1;
    return 0;
}

void gguf_close(struct gguf_file *f) {
    if (!f) return;
    if (f->map && f->size && f->owns_map) munmap((void *)f->map, f->size);
    free(f->kv);
    free(f->tensors);
    free(f->path);
    memset(f, 0, sizeof *f);
}

int gguf_str_eq(struct gguf_str s, const char *cstr) {
    size_t n = strlen(cstr);
    return s.len == n && !memcmp(s.ptr, cstr, n);
}

const struct gguf_kv *gguf_find(const struct gguf_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (gguf_str_eq(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (gguf_str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

/* Reads a scalar of any numeric type as double (exact for every integer a
 * model config uses). */
static double scalar_as_double(uint32_t type, const uint8_t *p) {
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            float f32; uint64_t u64; int64_t i64; double f64; } v;
    memcpy(&v, p, gguf_scalar_size(type));
    switch (type) {
    case GGUF_UINT8: return v.u8;
    case GGUF_INT8: return v.i8;
    case GGUF_UINT16: return v.u16;
    case GGUF_INT16: return v.i16;
    case GGUF_UINT32: return v.u32;
    case GGUF_INT32: return v.i32;
    case GGUF_FLOAT32: return v.f32;
    case GGUF_UINT64: return (double)v.u64;
    case GGUF_INT64: return (double)v.i64;
    case GGUF_FLOAT64: return v.f64;
    case GGUF_BOOL: return v.u8;
    default: return 0;
    }
}

static int is_integer_type(uint32_t t) {
    return t == GGUF_UINT8 || t == GGUF_INT8 || t == GGUF_UINT16 || t == GGUF_INT16 ||
           t == GGUF_UINT32 || t == GGUF_INT32 || t == GGUF_UINT64 || t == GGUF_INT64;
}

int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *out) {
    const struct gguf_kv *kv = gguf_find(f, key);
    if (!kv || !is_integer_type(kv->type)) return -1;
    double v = scalar_as_double(kv->type, kv->value);
    if (v < 0 || v > 4294967295.0) return -1;
    *out = (uint32_t)v;
    return 0;
}

int gguf_get_f32(const struct gguf_file *f, const char *key, float *out) {
    const struct gguf_kv *kv = gguf_find(f, key);
    if (!kv || (kv->type != GGUF_FLOAT32 && kv->type != GGUF_FLOAT64 && !is_integer_type(kv->type)))
        return -1;
    *out = (float)scalar_as_double(kv->type, kv->value);
    return 0;
}

int gguf_get_bool(const struct gguf_file *f, const char *key, int *out) {
    const struct gguf_kv *kv = gguf_find(f, key);
    if (!kv || kv->type != GGUF_BOOL) return -1;
    *out = kv->value[0] != 0;
    return 0;
}

int gguf_get_str(const struct gguf_file *f, const char *key, struct gguf_str *out) {
    const struct gguf_kv *kv = gguf_find(f, key);
    if (!kv || kv->type != GGUF_STRING) return -1;
    uint64_t len;
    memcpy(&len, kv->value, 8);
    out->ptr = (const char *)kv->value + 8;
    out->len = len;
    return 0;
}

/* String arrays are variable-length, so element i is found by walking. Callers
 * that need every element (the tokenizer) walk once in order; this keeps the
 * reader free of per-array index tables. */
struct gguf_str gguf_arr_str(const struct gguf_kv *kv, uint64_t i) {
    const uint8_t *p = kv->value;
    uint64_t len;
    for (;;) {
        memcpy(&len, p, 8);
        if (i-- == 0) break;
        p += 8 + len;
    }
    return (struct gguf_str){(const char *)p + 8, len};
}

double gguf_arr_num(const struct gguf_kv *kv, uint64_t i) {
    return scalar_as_double(kv->arr_type, kv->value + i * gguf_scalar_size(kv->arr_type));
}

int gguf_tensor_to_f32(const struct gguf_tensor *t, float *dst) {
    const struct ebb_type_info *ti = ebb_type_info(t->type);
    if (!ti || !ti->to_f32) return -1;
    ti->to_f32(t->data, dst, t->n_elems);
    return 0;
}
