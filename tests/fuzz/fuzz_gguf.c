/* Fuzz target: the GGUF reader (storage/gguf.c) and everything model
 * loading reads from a file, for plain and packed (ebb.format) files.
 *
 * Each input is a whole file:
 *   1. gguf_open_buffer over an exact-size copy, then a walk of what the
 *      reader promises after validation: every key found again by name,
 *      every array element readable, every tensor's bytes inside the buffer
 *      and its element count the product of its dimensions, every tensor of
 *      a convertible type dequantized;
 *   2. model_load from the same bytes in a memfd (the mmap path the daemon
 *      takes: configuration, packing metadata, tokenizer, weights), native
 *      weights and, when that loads, f32 copies; a loaded model's tokenizer
 *      encodes and decodes a short prompt. No inference runs. */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/model.h"
#include "engine/tokenizer.h"
#include "storage/gguf.h"
#include "tests/fuzz/fuzz.h"

static int memfd = -1;
static char memfd_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    memfd = memfd_create("fuzz-gguf", MFD_CLOEXEC);
    if (memfd < 0) { perror("fuzz_gguf: memfd_create"); exit(1); }
    snprintf(memfd_path, sizeof memfd_path, "/proc/self/fd/%d", memfd);
    return 0;
}

static void walk(const struct gguf_file *f, const uint8_t *buf, size_t size) {
    FUZZ_ASSERT(f->version == 2 || f->version == 3);
    FUZZ_ASSERT(f->alignment > 0);
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const struct gguf_kv *kv = &f->kv[i];
        FUZZ_ASSERT((const uint8_t *)kv->key.ptr >= buf && kv->key.len <= size &&
                    (const uint8_t *)kv->key.ptr + kv->key.len <= buf + size);
        FUZZ_ASSERT(kv->type < GGUF_VALUE_TYPE_COUNT_);
        char key[256];
        if (kv->key.len < sizeof key && !memchr(kv->key.ptr, 0, kv->key.len)) {
            memcpy(key, kv->key.ptr, kv->key.len);
            key[kv->key.len] = 0;
            const struct gguf_kv *again = gguf_find(f, key);
            FUZZ_ASSERT(again && gguf_str_eq(again->key, key));
            uint32_t u;
            float x;
            int b;
            struct gguf_str s;
            gguf_get_u32(f, key, &u);
            gguf_get_f32(f, key, &x);
            gguf_get_bool(f, key, &b);
            if (!gguf_get_str(f, key, &s))
                FUZZ_ASSERT((const uint8_t *)s.ptr >= buf && (const uint8_t *)s.ptr + s.len <= buf + size);
        }
        if (kv->type != GGUF_ARRAY) continue;
        for (uint64_t k = 0; k < kv->arr_n && k < 4096; k++) {
            if (kv->arr_type == GGUF_STRING) {
                struct gguf_str s = gguf_arr_str(kv, k);
                FUZZ_ASSERT((const uint8_t *)s.ptr >= buf && (const uint8_t *)s.ptr + s.len <= buf + size);
            } else if (gguf_scalar_size(kv->arr_type)) {
                (void)gguf_arr_num(kv, k);
            }
        }
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const struct gguf_tensor *t = &f->tensors[i];
        FUZZ_ASSERT(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        uint64_t n = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) n *= t->ne[d];
        FUZZ_ASSERT(n == t->n_elems);
        FUZZ_ASSERT((const uint8_t *)t->data >= buf && t->nbytes <= size &&
                    (const uint8_t *)t->data + t->nbytes <= buf + size);
        char name[256];
        if (t->name.len < sizeof name && !memchr(t->name.ptr, 0, t->name.len)) {
            memcpy(name, t->name.ptr, t->name.len);
            name[t->name.len] = 0;
            const struct gguf_tensor *again = gguf_find_tensor(f, name);
            FUZZ_ASSERT(again && gguf_str_eq(again->name, name));
        }
        if (t->n_elems <= (1u << 20)) {
            float *dst = malloc(t->n_elems ? t->n_elems * sizeof(float) : 1);
            if (dst) gguf_tensor_to_f32(t, dst);
            free(dst);
        }
    }
}

static void use_tokenizer(const struct ebb_tokenizer *t) {
    static const char prompt[] = "<|im_start|>user\nHello, wörld! 12345 \xf0\x9f\x99\x82<|im_end|>\n";
    int32_t *ids = NULL;
    int n = tokenizer_encode_with_bos(t, prompt, sizeof prompt - 1, 1, 1, &ids);
    const int vocab = tokenizer_n_vocab(t);
    struct detok d;
    detok_init(&d, t);
    size_t cap = tokenizer_detok_buffer(t);
    char *out = malloc(cap);
    for (int i = 0; i < n; i++) {
        FUZZ_ASSERT(ids[i] >= 0 && ids[i] < vocab);
        size_t len;
        FUZZ_ASSERT(tokenizer_piece(t, ids[i], &len) != NULL);
        if (out) FUZZ_ASSERT(detok_push(&d, ids[i], out, cap) <= cap);
    }
    if (out) FUZZ_ASSERT(detok_flush(&d, out, cap) <= cap);
    free(out);
    free(ids);
}

static void load(size_t size) {
    char err[512];
    struct model m;
    if (model_load(&m, memfd_path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        FUZZ_ASSERT(err[0]);
        return;
    }
    FUZZ_ASSERT(m.file.size == size);
    FUZZ_ASSERT(m.cfg.n_layer > 0 && m.cfg.n_embd > 0 && m.cfg.n_vocab > 0);
    FUZZ_ASSERT(tokenizer_n_vocab(m.tok) <= m.cfg.n_vocab);
    use_tokenizer(m.tok);
    struct model f32;
    if (model_load(&f32, memfd_path, MODEL_WEIGHTS_F32, err, sizeof err) == 0) {
        FUZZ_ASSERT(f32.cfg.n_layer == m.cfg.n_layer && f32.cfg.n_vocab == m.cfg.n_vocab);
        model_free(&f32);
    }
    model_free(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    struct gguf_file f;
    char err[512];
    if (gguf_open_buffer(&f, copy, size, "fuzz.gguf", err, sizeof err) == 0) {
        walk(&f, copy, size);
        gguf_close(&f);
    } else {
        FUZZ_ASSERT(!strncmp(err, "fuzz.gguf: ", 11));   /* "PATH: what is wrong" */
    }
    free(copy);

    if (ftruncate(memfd, 0) || pwrite(memfd, data, size, 0) != (ssize_t)size) {
        perror("fuzz_gguf: memfd");
        abort();
    }
    load(size);
    return 0;
}
