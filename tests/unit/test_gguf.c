/* GGUF validator tests.
 *
 * A small but complete GGUF file is built in memory (metadata of every value
 * type, string arrays, tensors of several types), then damaged in every way a
 * real file gets damaged: truncated at every byte, bytes flipped, counts and
 * lengths made absurd, types unknown, offsets misaligned or out of range.
 * Every damaged file must be refused with a message naming the file; none may
 * crash or read out of bounds (the suite also runs under ASan/UBSan, which
 * turns any stray read into a failure). Flipped bytes may still give a valid
 * file (a flipped byte in a float is still a float), so for those the test
 * asserts only "refused with a message, or accepted and consistent".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kernels/formats.h"
#include "storage/gguf.h"

struct buf { uint8_t *p; size_t n, cap; };

static void put(struct buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_u32(struct buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(struct buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(struct buf *b, const char *s) { put_u64(b, strlen(s)); put(b, s, strlen(s)); }

/* Offsets of interesting fields, recorded while building, so damage can be
 * aimed at them. */
struct layout {
    size_t n_tensors_at, n_kv_at, str_len_at, arr_len_at, tensor_type_at, tensor_off_at,
           n_dims_at, value_type_at;
};

#define N_TENSORS 3
static struct buf build_file(struct layout *lay) {
    struct buf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    lay->n_tensors_at = b.n;
    put_u64(&b, N_TENSORS);
    lay->n_kv_at = b.n;
    put_u64(&b, 6);
    /* kv 1: string */
    put_str(&b, "general.architecture");
    lay->value_type_at = b.n;
    put_u32(&b, GGUF_STRING);
    lay->str_len_at = b.n;
    put_str(&b, "llama");
    /* kv 2: u32 */
    put_str(&b, "llama.block_count");
    put_u32(&b, GGUF_UINT32);
    put_u32(&b, 2);
    /* kv 3: f32 */
    put_str(&b, "llama.rope.freq_base");
    put_u32(&b, GGUF_FLOAT32);
    float f = 10000.0f;
    put(&b, &f, 4);
    /* kv 4: bool */
    put_str(&b, "tokenizer.ggml.add_bos_token");
    put_u32(&b, GGUF_BOOL);
    uint8_t t = 1;
    put(&b, &t, 1);
    /* kv 5: string array */
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, GGUF_ARRAY);
    put_u32(&b, GGUF_STRING);
    lay->arr_len_at = b.n;
    put_u64(&b, 3);
    put_str(&b, "a");
    put_str(&b, "bc");
    put_str(&b, "");
    /* kv 6: i32 array */
    put_str(&b, "tokenizer.ggml.token_type");
    put_u32(&b, GGUF_ARRAY);
    put_u32(&b, GGUF_INT32);
    put_u64(&b, 3);
    int32_t types[3] = {1, 1, 3};
    put(&b, types, sizeof types);

    /* tensors: f32 [4,2], q8_0 [32,1], f16 [8] */
    struct { const char *name; uint32_t n_dims; uint64_t ne[2]; uint32_t type; uint64_t bytes; } ts[N_TENSORS] = {
        {"a.weight", 2, {4, 2}, EBB_TYPE_F32, 32},
        {"b.weight", 2, {32, 1}, EBB_TYPE_Q8_0, 34},
        {"c.weight", 1, {8, 1}, EBB_TYPE_F16, 16},
    };
    uint64_t off = 0;
    uint64_t offsets[N_TENSORS];
    for (int i = 0; i < N_TENSORS; i++) {
        put_str(&b, ts[i].name);
        if (i == 0) lay->n_dims_at = b.n;
        put_u32(&b, ts[i].n_dims);
        for (uint32_t d = 0; d < ts[i].n_dims; d++) put_u64(&b, ts[i].ne[d]);
        if (i == 1) lay->tensor_type_at = b.n;
        put_u32(&b, ts[i].type);
        if (i == 2) lay->tensor_off_at = b.n;
        offsets[i] = off;
        put_u64(&b, off);
        off += (ts[i].bytes + 31) / 32 * 32;
    }
    while (b.n % 32) put(&b, "", 1);
    size_t data = b.n;
    uint8_t zero[128] = {0};
    put(&b, zero, sizeof zero);
    /* tensor a: 0..7 */
    for (int i = 0; i < 8; i++) { float v = (float)i; memcpy(b.p + data + offsets[0] + 4 * i, &v, 4); }
    /* tensor b: scale 0.5 (f16 0x3800), values -16..15 */
    uint16_t half = 0x3800;
    memcpy(b.p + data + offsets[1], &half, 2);
    for (int i = 0; i < 32; i++) b.p[data + offsets[1] + 2 + i] = (uint8_t)(int8_t)(i - 16);
    /* tensor c: f16 1.0 (0x3C00) */
    for (int i = 0; i < 8; i++) { uint16_t one = 0x3C00; memcpy(b.p + data + offsets[2] + 2 * i, &one, 2); }
    b.n = data + offsets[N_TENSORS - 1] + ts[N_TENSORS - 1].bytes;   /* no trailing padding */
    return b;
}

/* Opens a copy of the bytes in a buffer of exactly that size (so ASan sees
 * any read past the end). Returns 0 if accepted. */
static int try_open(const uint8_t *bytes, size_t n, char *err, size_t errlen) {
    uint8_t *copy = malloc(n ? n : 1);
    if (n) memcpy(copy, bytes, n);
    struct gguf_file f;
    err[0] = 0;
    int rc = gguf_open_buffer(&f, copy, n, "test.gguf", err, errlen);
    if (rc == 0) {
        /* Exercise every accessor on whatever was accepted. */
        for (uint64_t i = 0; i < f.n_kv; i++) {
            const struct gguf_kv *kv = &f.kv[i];
            if (kv->type == GGUF_ARRAY)
                for (uint64_t j = 0; j < kv->arr_n; j++) {
                    if (kv->arr_type == GGUF_STRING) (void)gguf_arr_str(kv, j);
                    else (void)gguf_arr_num(kv, j);
                }
        }
        for (uint64_t i = 0; i < f.n_tensors; i++) {
            const struct gguf_tensor *t = &f.tensors[i];
            float *dst = malloc(t->n_elems * sizeof(float));
            if (dst) { gguf_tensor_to_f32(t, dst); free(dst); }
        }
        gguf_close(&f);
    }
    free(copy);
    return rc;
}

static void test_valid_file(void) {
    struct layout lay;
    struct buf b = build_file(&lay);
    struct gguf_file f;
    char err[256];
    CHECK_MSG(gguf_open_buffer(&f, b.p, b.n, "ok.gguf", err, sizeof err) == 0, "%s", err);
    CHECK(f.version == 3);
    CHECK(f.n_kv == 6 && f.n_tensors == 3);
    struct gguf_str s;
    CHECK(gguf_get_str(&f, "general.architecture", &s) == 0 && gguf_str_eq(s, "llama"));
    uint32_t u;
    CHECK(gguf_get_u32(&f, "llama.block_count", &u) == 0 && u == 2);
    CHECK(gguf_get_u32(&f, "general.architecture", &u) == -1);   /* wrong type */
    CHECK(gguf_get_u32(&f, "no.such.key", &u) == -1);
    float fv;
    CHECK(gguf_get_f32(&f, "llama.rope.freq_base", &fv) == 0 && fv == 10000.0f);
    int bv;
    CHECK(gguf_get_bool(&f, "tokenizer.ggml.add_bos_token", &bv) == 0 && bv == 1);
    const struct gguf_kv *toks = gguf_find(&f, "tokenizer.ggml.tokens");
    CHECK(toks && toks->arr_n == 3);
    if (toks) {
        CHECK(gguf_str_eq(gguf_arr_str(toks, 0), "a"));
        CHECK(gguf_str_eq(gguf_arr_str(toks, 1), "bc"));
        CHECK(gguf_arr_str(toks, 2).len == 0);
    }
    const struct gguf_kv *types = gguf_find(&f, "tokenizer.ggml.token_type");
    CHECK(types && gguf_arr_num(types, 2) == 3);
    const struct gguf_tensor *a = gguf_find_tensor(&f, "a.weight");
    CHECK(a && a->ne[0] == 4 && a->ne[1] == 2 && a->n_elems == 8);
    float out[32];
    if (a) {
        CHECK(gguf_tensor_to_f32(a, out) == 0);
        CHECK(out[0] == 0.0f && out[7] == 7.0f);
    }
    const struct gguf_tensor *q = gguf_find_tensor(&f, "b.weight");
    if (q) {
        CHECK(gguf_tensor_to_f32(q, out) == 0);
        CHECK(out[0] == -8.0f && out[31] == 7.5f);
    }
    const struct gguf_tensor *c = gguf_find_tensor(&f, "c.weight");
    if (c) {
        CHECK(gguf_tensor_to_f32(c, out) == 0);
        CHECK(out[0] == 1.0f && out[7] == 1.0f);
    }
    CHECK(gguf_find_tensor(&f, "missing") == NULL);
    gguf_close(&f);
    free(b.p);
}

static void test_truncation_everywhere(void) {
    struct layout lay;
    struct buf b = build_file(&lay);
    char err[256];
    int refused = 0;
    for (size_t n = 0; n < b.n; n++) {
        int rc = try_open(b.p, n, err, sizeof err);
        if (rc != 0) {
            refused++;
            CHECK_MSG(strncmp(err, "test.gguf: ", 11) == 0, "message must name the file: %s", err);
        }
    }
    /* Every proper prefix loses at least the last tensor's bytes. */
    CHECK_MSG(refused == (int)b.n, "refused %d of %zu truncations", refused, b.n);
    CHECK(try_open(b.p, b.n / 2, err, sizeof err) == -1 && strstr(err, "truncated"));
    free(b.p);
}

static void test_flipped_bytes(void) {
    struct layout lay;
    struct buf b = build_file(&lay);
    char err[256];
    /* Flip each byte of the header and metadata region in turn. */
    for (size_t i = 0; i < b.n; i++) {
        uint8_t saved = b.p[i];
        b.p[i] ^= 0xA5;
        int rc = try_open(b.p, b.n, err, sizeof err);
        CHECK_MSG(rc == 0 || strncmp(err, "test.gguf: ", 11) == 0, "byte %zu: %s", i, err);
        b.p[i] = saved;
    }
    free(b.p);
}

static void poke_u64(uint8_t *p, size_t at, uint64_t v) { memcpy(p + at, &v, 8); }
static void poke_u32(uint8_t *p, size_t at, uint32_t v) { memcpy(p + at, &v, 4); }

static void expect_refused(const char *what, struct buf *b, const char *needle) {
    char err[256];
    int rc = try_open(b->p, b->n, err, sizeof err);
    CHECK_MSG(rc == -1, "%s was accepted", what);
    CHECK_MSG(rc == -1 && strstr(err, needle), "%s: message '%s' lacks '%s'", what, err, needle);
}

static void test_targeted_damage(void) {
    struct layout lay;
    struct buf b = build_file(&lay);
    uint8_t *orig = malloc(b.n);
    memcpy(orig, b.p, b.n);
#define RESET() memcpy(b.p, orig, b.n)
    b.p[0] = 'X';
    expect_refused("bad magic", &b, "magic");
    RESET();
    poke_u32(b.p, 4, 1);
    expect_refused("version 1", &b, "version");
    RESET();
    poke_u32(b.p, 4, 99);
    expect_refused("version 99", &b, "version");
    RESET();
    poke_u64(b.p, lay.n_kv_at, UINT64_MAX);
    expect_refused("absurd kv count", &b, "absurd");
    RESET();
    poke_u64(b.p, lay.n_tensors_at, 1ull << 40);
    expect_refused("absurd tensor count", &b, "absurd");
    RESET();
    poke_u64(b.p, lay.str_len_at, UINT64_MAX - 3);
    expect_refused("absurd string length", &b, "length");
    RESET();
    poke_u64(b.p, lay.arr_len_at, 1ull << 60);
    expect_refused("absurd array length", &b, "array");
    RESET();
    poke_u32(b.p, lay.value_type_at, 77);
    expect_refused("unknown value type", &b, "unknown value type");
    RESET();
    poke_u32(b.p, lay.tensor_type_at, 31337);
    expect_refused("unknown tensor type", &b, "unknown type");
    RESET();
    poke_u32(b.p, lay.n_dims_at, 9);
    expect_refused("too many dims", &b, "dimensions");
    RESET();
    poke_u64(b.p, lay.tensor_off_at, 8);
    expect_refused("misaligned offset", &b, "aligned");
    RESET();
    poke_u64(b.p, lay.tensor_off_at, 1ull << 50);
    expect_refused("offset past end", &b, "past the end");
    RESET();
    expect_refused("empty", &(struct buf){b.p, 0, 0}, "truncated");
#undef RESET
    free(orig);
    free(b.p);
}

static void test_missing_file(void) {
    struct gguf_file f;
    char err[256];
    CHECK(gguf_open(&f, "/nonexistent/model.gguf", err, sizeof err) == -1);
    CHECK(strstr(err, "/nonexistent/model.gguf") && strstr(err, "cannot open"));
    CHECK(gguf_open(&f, "/", err, sizeof err) == -1);
}

/* The default model, if present (scripts/setup fetches it). */
static void test_real_model(void) {
    const char *dir = getenv("EBB_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", dir ? dir : ".");
    struct gguf_file f;
    char err[512];
    if (gguf_open(&f, path, err, sizeof err)) {
        fprintf(stderr, "default model not available (%s); run scripts/setup\n", err);
        CHECK(0);
        return;
    }
    CHECK(f.n_tensors == 272);
    uint32_t n_layer;
    CHECK(gguf_get_u32(&f, "llama.block_count", &n_layer) == 0 && n_layer == 30);
    const struct gguf_tensor *emb = gguf_find_tensor(&f, "token_embd.weight");
    CHECK(emb && emb->type == EBB_TYPE_Q8_0 && emb->ne[0] == 576 && emb->ne[1] == 49152);
    gguf_close(&f);
}

int main(void) {
    test_valid_file();
    test_truncation_everywhere();
    test_flipped_bytes();
    test_targeted_damage();
    test_missing_file();
    test_real_model();
    return check_report("test_gguf");
}
