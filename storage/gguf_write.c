/* GGUF v3 writer (see gguf_write.h).
 *
 * Design: every key/value is kept already serialised (value type, then the
 * payload exactly as it goes in the file), so copying a key from another file
 * is a byte copy of its value and writing is one loop. Tensors keep their own
 * copy of the data plus the offset they will have in the data section,
 * computed when they are added; the file is then header, key/values, tensor
 * records, padding, data, with no second pass.
 *
 * Trade-off: the whole packed model sits in memory until it is written
 * (about 120 MB for the default model). Streaming tensors to disk as they are
 * made would save that, at the cost of a header written last or sizes known
 * up front; the packer has the f32 model in memory anyway, several times
 * larger, so the simple order wins.
 */
#include "storage/gguf_write.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/formats.h"
#include "storage/error.h"

struct wkv {
    char *key;
    uint8_t *val;     /* u32 type, then the payload */
    size_t val_len;
};

struct wtensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint32_t type;
    uint8_t *data;
    size_t nbytes;
    uint64_t offset;  /* inside the data section */
};

struct gguf_writer {
    struct wkv *kv;
    size_t n_kv, cap_kv;
    struct wtensor *t;
    size_t n_t, cap_t;
    uint64_t data_bytes;   /* data section size so far, padded */
    char failure[256];     /* first error, "" if none */
};

/* Keeps the first error (storage/error.h); returns -1. */
#define writer_fail(w, ...) ((w)->failure[0] ? -1 : errf((w)->failure, sizeof (w)->failure, __VA_ARGS__))

struct gguf_writer *gguf_writer_new(void) {
    return calloc(1, sizeof(struct gguf_writer));
}

void gguf_writer_free(struct gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val);
    }
    for (size_t i = 0; i < w->n_t; i++) {
        free(w->t[i].name);
        free(w->t[i].data);
    }
    free(w->kv);
    free(w->t);
    free(w);
}

/* Stores key -> (type, payload), replacing an existing key's value. Takes
 * ownership of val. */
static int put_kv(struct gguf_writer *w, const char *key, size_t key_len, uint8_t *val, size_t val_len) {
    for (size_t i = 0; i < w->n_kv; i++)
        if (strlen(w->kv[i].key) == key_len && !memcmp(w->kv[i].key, key, key_len)) {
            free(w->kv[i].val);
            w->kv[i].val = val;
            w->kv[i].val_len = val_len;
            return 0;
        }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? 2 * w->cap_kv : 64;
        struct wkv *grown = realloc(w->kv, cap * sizeof *grown);
        if (!grown) { free(val); return writer_fail(w, "out of memory"); }
        w->kv = grown;
        w->cap_kv = cap;
    }
    char *k = malloc(key_len + 1);
    if (!k) { free(val); return writer_fail(w, "out of memory"); }
    memcpy(k, key, key_len);
    k[key_len] = 0;
    w->kv[w->n_kv++] = (struct wkv){k, val, val_len};
    return 0;
}

/* A value buffer: the type word followed by payload_len bytes of payload. */
static uint8_t *value_buf(struct gguf_writer *w, uint32_t type, const void *payload, size_t payload_len) {
    uint8_t *v = malloc(4 + payload_len);
    if (!v) { writer_fail(w, "out of memory"); return NULL; }
    memcpy(v, &type, 4);
    if (payload_len) memcpy(v + 4, payload, payload_len);
    return v;
}

int gguf_writer_copy_kv(struct gguf_writer *w, const struct gguf_kv *kv) {
    size_t len;
    if (kv->type == GGUF_STRING) {
        uint64_t n;
        memcpy(&n, kv->value, 8);
        len = 8 + (size_t)n;
    } else if (kv->type == GGUF_ARRAY) {
        /* The reader points value at the first element; the element type and
         * count precede it in the file and are rewritten here. */
        size_t elems;
        if (kv->arr_type == GGUF_STRING) {
            const uint8_t *p = kv->value;
            for (uint64_t i = 0; i < kv->arr_n; i++) {
                uint64_t n;
                memcpy(&n, p, 8);
                p += 8 + n;
            }
            elems = (size_t)(p - kv->value);
        } else {
            size_t esz = gguf_scalar_size(kv->arr_type);
            if (!esz) return writer_fail(w, "key '%.*s': unsupported array type %u", (int)kv->key.len,
                                         kv->key.ptr, kv->arr_type);
            elems = (size_t)kv->arr_n * esz;
        }
        uint8_t *v = malloc(4 + 4 + 8 + elems);
        if (!v) return writer_fail(w, "out of memory");
        uint32_t t = GGUF_ARRAY;
        memcpy(v, &t, 4);
        memcpy(v + 4, &kv->arr_type, 4);
        memcpy(v + 8, &kv->arr_n, 8);
        memcpy(v + 16, kv->value, elems);
        return put_kv(w, kv->key.ptr, (size_t)kv->key.len, v, 16 + elems);
    } else {
        len = gguf_scalar_size(kv->type);
        if (!len) return writer_fail(w, "key '%.*s': unsupported type %u", (int)kv->key.len, kv->key.ptr,
                                     kv->type);
    }
    uint8_t *v = value_buf(w, kv->type, kv->value, len);
    return v ? put_kv(w, kv->key.ptr, (size_t)kv->key.len, v, 4 + len) : -1;
}

int gguf_writer_set_str(struct gguf_writer *w, const char *key, const char *value) {
    uint64_t n = strlen(value);
    uint8_t *v = malloc(4 + 8 + n);
    if (!v) return writer_fail(w, "out of memory");
    uint32_t t = GGUF_STRING;
    memcpy(v, &t, 4);
    memcpy(v + 4, &n, 8);
    memcpy(v + 12, value, n);
    return put_kv(w, key, strlen(key), v, 12 + n);
}

int gguf_writer_set_u32(struct gguf_writer *w, const char *key, uint32_t value) {
    uint8_t *v = value_buf(w, GGUF_UINT32, &value, 4);
    return v ? put_kv(w, key, strlen(key), v, 8) : -1;
}

int gguf_writer_set_f32(struct gguf_writer *w, const char *key, float value) {
    uint8_t *v = value_buf(w, GGUF_FLOAT32, &value, 4);
    return v ? put_kv(w, key, strlen(key), v, 8) : -1;
}

/* An array of n fixed-size elements of GGUF type et, stored as given
 * (little-endian, as the machine's). */
static int set_arr(struct gguf_writer *w, const char *key, uint32_t et, const void *values, size_t elem, size_t n) {
    uint8_t *v = malloc(16 + n * elem);
    if (!v) return writer_fail(w, "out of memory");
    uint32_t t = GGUF_ARRAY;
    uint64_t n64 = n;
    memcpy(v, &t, 4);
    memcpy(v + 4, &et, 4);
    memcpy(v + 8, &n64, 8);
    if (n) memcpy(v + 16, values, n * elem);
    return put_kv(w, key, strlen(key), v, 16 + n * elem);
}

int gguf_writer_set_arr_u32(struct gguf_writer *w, const char *key, const uint32_t *values, size_t n) {
    return set_arr(w, key, GGUF_UINT32, values, 4, n);
}

int gguf_writer_set_arr_u64(struct gguf_writer *w, const char *key, const uint64_t *values, size_t n) {
    return set_arr(w, key, GGUF_UINT64, values, 8, n);
}

int gguf_writer_set_arr_f32(struct gguf_writer *w, const char *key, const float *values, size_t n) {
    return set_arr(w, key, GGUF_FLOAT32, values, 4, n);
}

static uint64_t align_up(uint64_t x) {
    return (x + GGUF_WRITE_ALIGNMENT - 1) / GGUF_WRITE_ALIGNMENT * GGUF_WRITE_ALIGNMENT;
}

int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                           const uint64_t *ne, const void *data, size_t nbytes) {
    if (n_dims == 0 || n_dims > GGUF_MAX_DIMS)
        return writer_fail(w, "tensor '%s': %u dimensions", name, n_dims);
    uint64_t rows = 1;
    for (uint32_t d = 1; d < n_dims; d++) rows *= ne[d];
    size_t row = ebb_row_bytes(type, ne[0]);
    if (!row || row * rows != nbytes)
        return writer_fail(w, "tensor '%s': %zu bytes do not match type %u and shape", name, nbytes, type);
    for (size_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name)) return writer_fail(w, "tensor '%s' added twice", name);
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? 2 * w->cap_t : 64;
        struct wtensor *grown = realloc(w->t, cap * sizeof *grown);
        if (!grown) return writer_fail(w, "out of memory");
        w->t = grown;
        w->cap_t = cap;
    }
    struct wtensor t = {.n_dims = n_dims, .type = type, .nbytes = nbytes, .offset = w->data_bytes};
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t.ne[d] = d < n_dims ? ne[d] : 1;
    t.name = strdup(name);
    t.data = malloc(nbytes ? nbytes : 1);
    if (!t.name || !t.data) {
        free(t.name);
        free(t.data);
        return writer_fail(w, "out of memory");
    }
    memcpy(t.data, data, nbytes);
    w->t[w->n_t++] = t;
    w->data_bytes = align_up(w->data_bytes + nbytes);
    return 0;
}

/* Header, key/values and tensor records, unpadded. */
static uint64_t header_bytes(const struct gguf_writer *w) {
    uint64_t n = 4 + 4 + 8 + 8;
    for (size_t i = 0; i < w->n_kv; i++) n += 8 + strlen(w->kv[i].key) + w->kv[i].val_len;
    for (size_t i = 0; i < w->n_t; i++) n += 8 + strlen(w->t[i].name) + 4 + 8ull * w->t[i].n_dims + 4 + 8;
    return n;
}

uint64_t gguf_writer_size(const struct gguf_writer *w) {
    if (!w->n_t) return header_bytes(w);
    /* The last tensor is not padded at the end of the file. */
    const struct wtensor *last = &w->t[w->n_t - 1];
    return align_up(header_bytes(w)) + last->offset + last->nbytes;
}

/* Buffered output with error tracking: the first failed write sticks. */
struct out {
    FILE *f;
    int bad;
};

static void put(struct out *o, const void *p, size_t n) {
    if (!o->bad && n && fwrite(p, 1, n, o->f) != n) o->bad = errno ? errno : EIO;
}
static void put_u32(struct out *o, uint32_t v) { put(o, &v, 4); }
static void put_u64(struct out *o, uint64_t v) { put(o, &v, 8); }
static void put_zeros(struct out *o, uint64_t n) {
    static const uint8_t zeros[GGUF_WRITE_ALIGNMENT];
    while (n) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        put(o, zeros, k);
        n -= k;
    }
}

static void write_body(const struct gguf_writer *w, struct out *o) {
    put(o, "GGUF", 4);
    put_u32(o, 3);
    put_u64(o, w->n_t);
    put_u64(o, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        put_u64(o, strlen(w->kv[i].key));
        put(o, w->kv[i].key, strlen(w->kv[i].key));
        put(o, w->kv[i].val, w->kv[i].val_len);
    }
    for (size_t i = 0; i < w->n_t; i++) {
        const struct wtensor *t = &w->t[i];
        put_u64(o, strlen(t->name));
        put(o, t->name, strlen(t->name));
        put_u32(o, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) put_u64(o, t->ne[d]);
        put_u32(o, t->type);
        put_u64(o, t->offset);
    }
    uint64_t pos = header_bytes(w);
    if (w->n_t) put_zeros(o, align_up(pos) - pos);
    uint64_t data_pos = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        const struct wtensor *t = &w->t[i];
        put_zeros(o, t->offset - data_pos);
        put(o, t->data, t->nbytes);
        data_pos = t->offset + t->nbytes;
    }
}

/* fsync of the directory holding path, so the rename itself is durable. */
static void sync_parent_dir(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(copy);
}

int gguf_writer_write(struct gguf_writer *w, const char *path, char *err, size_t errlen) {
    if (w->failure[0]) {
        snprintf(err, errlen, "%s: %s", path, w->failure);
        return -1;
    }
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) {
        snprintf(err, errlen, "%s: out of memory", path);
        return -1;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot create %s: %s", path, tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    struct out o = {fdopen(fd, "wb"), 0};
    if (!o.f) {
        snprintf(err, errlen, "%s: cannot write: %s", path, strerror(errno));
        close(fd);
        unlink(tmp);
        free(tmp);
        return -1;
    }
    errno = 0;
    write_body(w, &o);
    if (!o.bad && fflush(o.f)) o.bad = errno ? errno : EIO;
    if (!o.bad && fsync(fileno(o.f))) o.bad = errno ? errno : EIO;
    if (fclose(o.f) && !o.bad) o.bad = errno ? errno : EIO;
    if (!o.bad && rename(tmp, path)) o.bad = errno ? errno : EIO;
    if (o.bad) {
        /* The temporary file goes: a failed write leaves PATH as it was. */
        snprintf(err, errlen, "%s: write failed: %s (the file needs %llu bytes; %s was left as it was)", path,
                 strerror(o.bad), (unsigned long long)gguf_writer_size(w), path);
        unlink(tmp);
        free(tmp);
        return -1;
    }
    sync_parent_dir(path);
    free(tmp);
    return 0;
}
