/* Unit tests of engine/tokenizer.c.
 *
 * Most checks run on a small vocabulary built here as an in-memory GGUF (the
 * 256 byte tokens in GPT-2's byte alphabet, a handful of merges chosen so that
 * rank order matters, control tokens and a chat template), so they do not
 * need the model file and every expected value follows from the rules, not
 * from running the tokenizer. When the default model is present (under
 * $EBB_SOURCE_DIR/models/), the same API is also checked on it against ids
 * that Hugging Face `tokenizers` produced for the same text, and load and
 * encode speed are reported.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "engine/tokenizer.h"
#include "storage/gguf.h"

/* ---------------------------------------------------------------------------
 * A tiny GGUF writer (little-endian, version 3, no tensors).
 * ------------------------------------------------------------------------- */

struct buf { uint8_t *p; size_t n, cap; };

static void put_bytes(struct buf *b, const void *s, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) { perror("realloc"); exit(2); }
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void put_u32(struct buf *b, uint32_t v) { put_bytes(b, &v, 4); }
static void put_u64(struct buf *b, uint64_t v) { put_bytes(b, &v, 8); }
static void put_gstr(struct buf *b, const char *s) { put_u64(b, strlen(s)); put_bytes(b, s, strlen(s)); }

enum { T_U32 = 4, T_I32 = 5, T_BOOL = 7, T_STR = 8, T_ARR = 9 };

static void kv_str(struct buf *b, const char *key, const char *v) {
    put_gstr(b, key); put_u32(b, T_STR); put_gstr(b, v);
}
static void kv_u32(struct buf *b, const char *key, uint32_t v) {
    put_gstr(b, key); put_u32(b, T_U32); put_u32(b, v);
}
static void kv_bool(struct buf *b, const char *key, int v) {
    uint8_t x = (uint8_t)v;
    put_gstr(b, key); put_u32(b, T_BOOL); put_bytes(b, &x, 1);
}
static void kv_str_arr(struct buf *b, const char *key, char **v, int n) {
    put_gstr(b, key); put_u32(b, T_ARR); put_u32(b, T_STR); put_u64(b, (uint64_t)n);
    for (int i = 0; i < n; i++) put_gstr(b, v[i]);
}
static void kv_i32_arr(struct buf *b, const char *key, const int32_t *v, int n) {
    put_gstr(b, key); put_u32(b, T_ARR); put_u32(b, T_I32); put_u64(b, (uint64_t)n);
    put_bytes(b, v, (size_t)n * 4);
}

/* GPT-2's byte alphabet, written from its definition: printable bytes other
 * than space stand for themselves, the other 68 take U+0100.. in order. */
static unsigned byte_cp(int byte) {
    int next = 256;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        if (b == byte) return printable ? (unsigned)b : (unsigned)next;
        if (!printable) next++;
    }
    return 0;
}

static void cp_utf8(unsigned cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; out[1] = 0; }
    else { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); out[2] = 0; }
}

/* Test vocabulary: ids 0..255 are the bytes in byte order, then: */
enum {
    ID_HE = 256,     /* "he"    merge rank 0: h e      */
    ID_SP_T,         /* "Ġt"    merge rank 1: Ġ t      */
    ID_SP_THE,       /* "Ġthe"  merge rank 2: Ġt he    */
    ID_TH,           /* "th"    merge rank 3: t h      */
    ID_THE_BY_TH,    /* "the"   merge rank 4: th e     */
    ID_EURO2,        /* "\xE2\x82" (two bytes of the euro sign) merge rank 5 */
    ID_12,           /* "12"    merge rank 6: 1 2      */
    ID_APOS_S,       /* "'S"    merge rank 7: ' S      */
    ID_ENDOFTEXT,    /* control */
    ID_IM_START,     /* control */
    ID_IM_END,       /* control */
    ID_A_TAG,        /* control "<|a|>"  */
    ID_A_TAG_LONG,   /* user-defined "<|a|>b": longest match wins */
    N_TEST_VOCAB
};

struct test_model {
    const char *model;       /* tokenizer.ggml.model */
    const char *pre;         /* tokenizer.ggml.pre, NULL to omit */
    const char *tmpl;        /* chat template, NULL to omit */
    int with_merges;
};

static struct buf build_gguf(const struct test_model *m) {
    static char store[N_TEST_VOCAB][16];
    char *tokens[N_TEST_VOCAB];
    int32_t types[N_TEST_VOCAB];
    for (int b = 0; b < 256; b++) {
        cp_utf8(byte_cp(b), store[b]);
        tokens[b] = store[b];
        types[b] = 1;
    }
    char g[3], e2[3], x82[3];
    cp_utf8(byte_cp(' '), g);
    cp_utf8(byte_cp(0xE2), e2);
    cp_utf8(byte_cp(0x82), x82);
    snprintf(store[ID_HE], 16, "he");
    snprintf(store[ID_SP_T], 16, "%st", g);
    snprintf(store[ID_SP_THE], 16, "%sthe", g);
    snprintf(store[ID_TH], 16, "th");
    snprintf(store[ID_THE_BY_TH], 16, "the");
    snprintf(store[ID_EURO2], 16, "%s%s", e2, x82);
    snprintf(store[ID_12], 16, "12");
    snprintf(store[ID_APOS_S], 16, "'S");
    snprintf(store[ID_ENDOFTEXT], 16, "<|endoftext|>");
    snprintf(store[ID_IM_START], 16, "<|im_start|>");
    snprintf(store[ID_IM_END], 16, "<|im_end|>");
    snprintf(store[ID_A_TAG], 16, "<|a|>");
    snprintf(store[ID_A_TAG_LONG], 16, "<|a|>b");
    for (int i = 256; i < N_TEST_VOCAB; i++) {
        tokens[i] = store[i];
        types[i] = i >= ID_ENDOFTEXT ? 3 : 1;
    }
    types[ID_A_TAG_LONG] = 4;
    static char mstore[8][16];
    snprintf(mstore[0], 16, "h e");
    snprintf(mstore[1], 16, "%s t", g);
    snprintf(mstore[2], 16, "%st he", g);
    snprintf(mstore[3], 16, "t h");
    snprintf(mstore[4], 16, "th e");
    snprintf(mstore[5], 16, "%s %s", e2, x82);
    snprintf(mstore[6], 16, "1 2");
    snprintf(mstore[7], 16, "' S");
    char *merges[8];
    for (int i = 0; i < 8; i++) merges[i] = mstore[i];

    struct buf b = {0};
    int n_kv = 7 + (m->pre != NULL) + (m->tmpl != NULL) + (m->with_merges != 0);
    put_bytes(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, 0);
    put_u64(&b, (uint64_t)n_kv);
    kv_str(&b, "general.architecture", "llama");
    kv_str(&b, "tokenizer.ggml.model", m->model);
    if (m->pre) kv_str(&b, "tokenizer.ggml.pre", m->pre);
    kv_str_arr(&b, "tokenizer.ggml.tokens", tokens, N_TEST_VOCAB);
    kv_i32_arr(&b, "tokenizer.ggml.token_type", types, N_TEST_VOCAB);
    if (m->with_merges) kv_str_arr(&b, "tokenizer.ggml.merges", merges, 8);
    kv_u32(&b, "tokenizer.ggml.bos_token_id", ID_IM_START);
    kv_u32(&b, "tokenizer.ggml.eos_token_id", ID_IM_END);
    kv_bool(&b, "tokenizer.ggml.add_bos_token", 1);
    if (m->tmpl) kv_str(&b, "tokenizer.chat_template", m->tmpl);
    while (b.n % 32) put_bytes(&b, "", 1);
    return b;
}

static struct ebb_tokenizer *load_test(const struct test_model *m, char *err, size_t errlen) {
    struct buf b = build_gguf(m);
    struct gguf_file f;
    struct ebb_tokenizer *t = NULL;
    if (gguf_open_buffer(&f, b.p, b.n, "test.gguf", err, errlen) == 0) {
        t = tokenizer_load(&f, err, errlen);
        gguf_close(&f);
    }
    free(b.p);   /* the tokenizer must not keep pointers into the file */
    return t;
}

/* Encodes and compares with an expected id list (terminated by -1). */
static int encodes_to(const struct ebb_tokenizer *t, const char *s, int special, const int32_t *want) {
    int32_t *ids;
    int n = tokenizer_encode(t, s, strlen(s), special, &ids);
    int nw = 0;
    while (want[nw] >= 0) nw++;
    int ok = n == nw && (n == 0 || !memcmp(ids, want, (size_t)n * sizeof *ids));
    if (!ok) {
        fprintf(stderr, "encode(\"%s\") gave %d ids:", s, n);
        for (int i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n");
    }
    free(ids);
    return ok;
}

#define IDS(...) ((const int32_t[]){__VA_ARGS__, -1})
#define NO_IDS ((const int32_t[]){-1})

static const char SMOL_LIKE_TEMPLATE[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Testy, a \\'test\\' bot.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* Qwen2 style: the default sits in an else branch and uses an escaped \n. */
static const char QWEN_LIKE_TEMPLATE[] =
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content']"
    " + '<|im_end|>\\n' }}{%- else %}{{- \"<|im_start|>system\\nBe brief.\\tOk.<|im_end|>\\n\" }}"
    "{%- endif %}";

static const char NO_DEFAULT_TEMPLATE[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}";

static void test_metadata(void) {
    char err[256];
    struct test_model m = {"gpt2", "smollm", SMOL_LIKE_TEMPLATE, 1};
    struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    CHECK(tokenizer_n_vocab(t) == N_TEST_VOCAB);
    CHECK(tokenizer_bos(t) == ID_IM_START);
    CHECK(tokenizer_eos(t) == ID_IM_END);
    CHECK(tokenizer_add_bos(t) == 1);
    CHECK(tokenizer_bos_to_add(t) == ID_IM_START);
    /* BOS first only when asked for; an empty text is BOS alone. */
    int32_t *ids = NULL;
    CHECK(tokenizer_encode_with_bos(t, "he", 2, 0, 1, &ids) == 2 && ids[0] == ID_IM_START && ids[1] == ID_HE);
    free(ids);
    CHECK(tokenizer_encode_with_bos(t, "he", 2, 0, 0, &ids) == 1 && ids[0] == ID_HE);
    free(ids);
    CHECK(tokenizer_encode_with_bos(t, "", 0, 0, 1, &ids) == 1 && ids[0] == ID_IM_START);
    free(ids);
    CHECK(tokenizer_encode_with_bos(t, "\xC0\x80", 2, 0, 1, &ids) == -1 && ids == NULL);
    CHECK(tokenizer_is_control(t, ID_IM_END));
    CHECK(!tokenizer_is_control(t, ID_A_TAG_LONG));   /* user-defined, not control */
    CHECK(!tokenizer_is_control(t, 'a'));
    CHECK(!tokenizer_is_control(t, -1) && !tokenizer_is_control(t, N_TEST_VOCAB));
    CHECK(tokenizer_find(t, "<|im_end|>") == ID_IM_END);
    CHECK(tokenizer_find(t, "he") == ID_HE);
    CHECK(tokenizer_find(t, "nope") == -1);
    size_t len = 99;
    CHECK(tokenizer_piece(t, N_TEST_VOCAB, &len) == NULL && len == 0);
    CHECK(tokenizer_piece(t, -5, &len) == NULL);
    const char *p = tokenizer_piece(t, ID_SP_THE, &len);
    CHECK(p && len == 4 && !memcmp(p, " the", 4));
    p = tokenizer_piece(t, ' ' , &len);   /* byte token 0x20 is written "Ġ" */
    CHECK(p && len == 1 && p[0] == ' ');
    p = tokenizer_piece(t, ID_EURO2, &len);
    CHECK(p && len == 2 && !memcmp(p, "\xE2\x82", 2));
    p = tokenizer_piece(t, ID_IM_START, &len);
    CHECK(p && len == 12 && !memcmp(p, "<|im_start|>", 12));
    tokenizer_free(t);
}

static void test_encode_rules(void) {
    char err[256];
    struct test_model m = {"gpt2", "smollm", NULL, 1};
    struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    /* Rank order: "h e" (0) beats "t h" (3), so "the" is t + he, never th + e. */
    CHECK(encodes_to(t, "the", 1, IDS('t', ID_HE)));
    CHECK(encodes_to(t, " the", 1, IDS(ID_SP_THE)));
    CHECK(encodes_to(t, " them", 1, IDS(ID_SP_THE, 'm')));
    CHECK(encodes_to(t, "thx", 1, IDS(ID_TH, 'x')));
    /* Pre-tokenization: " the" stays one word; digits are split off one by one
     * (smollm) and a word never merges across the split. */
    CHECK(encodes_to(t, "the the", 1, IDS('t', ID_HE, ID_SP_THE)));
    CHECK(encodes_to(t, "a12 3", 1, IDS('a', '1', '2', ' ', '3')));
    CHECK(encodes_to(t, "it's", 1, IDS('i', 't', '\'', 's')));
    CHECK(encodes_to(t, "", 1, NO_IDS));
    /* Whitespace: "\s+(?!\S)" leaves the last space to the next word. */
    CHECK(encodes_to(t, "a  the", 1, IDS('a', ' ', ID_SP_THE)));
    /* Bytes of multi-byte characters, merged where a merge exists. */
    CHECK(encodes_to(t, "\xE2\x82\xAC", 1, IDS(ID_EURO2, 0xAC)));
    /* Special tokens: matched only with parse_special, longest first. */
    CHECK(encodes_to(t, "<|im_start|>he", 1, IDS(ID_IM_START, ID_HE)));
    CHECK(encodes_to(t, "x<|a|>b<|a|>", 1, IDS('x', ID_A_TAG_LONG, ID_A_TAG)));
    CHECK(encodes_to(t, "<|im_end|>", 0,
                     IDS('<', '|', 'i', 'm', '_', 'e', 'n', 'd', '|', '>')));
    CHECK(encodes_to(t, "<|im_end", 1, IDS('<', '|', 'i', 'm', '_', 'e', 'n', 'd')));
    /* Embedded NUL is text like any other byte. */
    int32_t *ids;
    CHECK(tokenizer_encode(t, "a\0b", 3, 1, &ids) == 3 && ids[1] == 0);
    free(ids);

    /* Invalid UTF-8 is refused; the edges of the valid range are accepted. */
    static const char *const bad[] = {
        "\xFF", "a\x80", "\xC3", "\xC0\xAF", "\xC1\xBF", "\xE0\x80\xAF", "\xED\xA0\x80",
        "\xED\xBF\xBF", "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xF0\x8F\xBF\xBF", "\xE2\x82",
        "ok\xE2\x82 ok",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ids = (int32_t *)&ids;   /* must be reset to NULL on failure */
        int n = tokenizer_encode(t, bad[i], strlen(bad[i]), 1, &ids);
        CHECK_MSG(n == -1 && ids == NULL, "invalid sequence %zu accepted", i);
    }
    static const char *const good[] = {"\xC2\x80", "\xDF\xBF", "\xE0\xA0\x80", "\xED\x9F\xBF",
                                       "\xEE\x80\x80", "\xEF\xBF\xBF", "\xF0\x90\x80\x80",
                                       "\xF4\x8F\xBF\xBF"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        int n = tokenizer_encode(t, good[i], strlen(good[i]), 1, &ids);
        CHECK_MSG(n == (int)strlen(good[i]), "valid sequence %zu gave %d", i, n);
        free(ids);
    }
    tokenizer_free(t);
}

/* A piece longer than TOKENIZER_MAX_PIECE runs BPE in chunks of that many
 * bytes, cut before a character: merges stop at the cut, and nowhere else. */
static void test_long_pieces(void) {
    char err[256];
    struct test_model m = {"gpt2", "smollm", NULL, 1};
    struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    _Static_assert(TOKENIZER_MAX_PIECE % 2 == 0 && TOKENIZER_MAX_PIECE % 3 == 1,
                   "the offsets below assume an even cap one past a multiple of 3");
    /* "x" + "he" x PAIRS: one word, cut once */
    enum { PAIRS = TOKENIZER_MAX_PIECE * 3 / 4, LEN = 1 + 2 * PAIRS };
    char *text = malloc(LEN + 1);
    CHECK(text != NULL);
    if (!text) { tokenizer_free(t); return; }
    text[0] = 'x';
    for (int i = 0; i < PAIRS; i++) memcpy(text + 1 + 2 * i, "he", 2);
    int32_t *ids = NULL;
    int n = tokenizer_encode(t, text, LEN, 0, &ids);
    /* First chunk: x, he ..., and its last byte 'h' alone; the second starts
     * with that pair's 'e' and merges again after it. */
    const int first_pairs = (TOKENIZER_MAX_PIECE - 2) / 2;
    CHECK_MSG(n == 1 + first_pairs + 2 + (PAIRS - first_pairs - 1), "%d ids", n);
    if (n > first_pairs + 3) {
        CHECK(ids[0] == 'x' && ids[1] == ID_HE && ids[first_pairs] == ID_HE);
        CHECK(ids[first_pairs + 1] == 'h' && ids[first_pairs + 2] == 'e' && ids[first_pairs + 3] == ID_HE);
        CHECK(ids[n - 1] == ID_HE);
    }
    free(ids);
    /* The same word just under the cap is one chunk: no split pair. */
    CHECK(tokenizer_encode(t, text, TOKENIZER_MAX_PIECE - 1, 0, &ids) == 1 + (TOKENIZER_MAX_PIECE - 2) / 2);
    free(ids);
    free(text);
    /* The cap falls inside a character (the euro sign is 3 bytes): the cut
     * moves back to the character's start, so "\xE2\x82" still merges in
     * every character. */
    enum { EUROS = TOKENIZER_MAX_PIECE };
    text = malloc(3 * EUROS + 1);
    CHECK(text != NULL);
    if (!text) { tokenizer_free(t); return; }
    for (int i = 0; i < EUROS; i++) memcpy(text + 3 * i, "\xE2\x82\xAC", 3);
    n = tokenizer_encode(t, text, 3 * EUROS, 0, &ids);
    int ok = n == 2 * EUROS;
    for (int i = 0; ok && i < EUROS; i++) ok = ids[2 * i] == ID_EURO2 && ids[2 * i + 1] == 0xAC;
    CHECK_MSG(ok, "a character was cut: %d ids", n);
    free(ids);
    free(text);
    tokenizer_free(t);
}

static void test_load_errors(void) {
    char err[256];
    struct test_model m = {"llama", "smollm", NULL, 1};
    CHECK(load_test(&m, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "llama") && strstr(err, "gpt2"), "%s", err);
    m = (struct test_model){"gpt2", "frobnicate-v2", NULL, 1};
    CHECK(load_test(&m, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "frobnicate-v2") && strstr(err, "test.gguf"), "%s", err);
    m = (struct test_model){"gpt2", "smollm", NULL, 0};
    CHECK(load_test(&m, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "tokenizer.ggml.merges"), "%s", err);
}

/* Each pre-tokenizer splits digits and contractions its own way; merges
 * "1 2" and "' S" make the split visible in the ids. */
static void test_pre_tokenizers(void) {
    static const struct {
        const char *pre;        /* NULL: key absent */
        int digits_grouped;     /* "12" reaches BPE as one word */
        int triples;            /* digits grouped by at most three (llama3) */
        int caseless_s;         /* "'S" is one contraction */
    } cases[] = {
        {"smollm", 0, 0, 0}, {"gpt2", 1, 0, 0}, {"default", 1, 0, 0}, {NULL, 1, 0, 0},
        {"llama3", 1, 1, 1}, {"llama-bpe", 1, 1, 1}, {"qwen2", 0, 0, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char err[256];
        struct test_model m = {"gpt2", cases[i].pre, NULL, 1};
        struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
        CHECK_MSG(t != NULL, "pre %s: %s", cases[i].pre ? cases[i].pre : "(none)", err);
        if (!t) continue;
        const char *name = cases[i].pre ? cases[i].pre : "(none)";
        CHECK_MSG(encodes_to(t, "a12", 1, cases[i].digits_grouped ? IDS('a', ID_12) : IDS('a', '1', '2')),
                  "%s", name);
        const int32_t *want_1212 = !cases[i].digits_grouped ? IDS('1', '2', '1', '2')
                                   : cases[i].triples      ? IDS(ID_12, '1', '2')
                                                           : IDS(ID_12, ID_12);
        CHECK_MSG(encodes_to(t, "1212", 1, want_1212), "%s", name);
        CHECK_MSG(encodes_to(t, "it'S", 1, cases[i].caseless_s ? IDS('i', 't', ID_APOS_S)
                                                                : IDS('i', 't', '\'', 'S')), "%s", name);
        tokenizer_free(t);
    }
}

/* Feeds ids through a detokenizer; returns the concatenated output. */
static size_t detok_all(const struct ebb_tokenizer *t, const int32_t *ids, int n, char *out,
                        size_t cap, int flush) {
    struct detok d;
    detok_init(&d, t);
    size_t w = 0;
    for (int i = 0; i < n; i++) w += detok_push(&d, ids[i], out + w, cap - w);
    if (flush) w += detok_flush(&d, out + w, cap - w);
    return w;
}

#define FFFD "\xEF\xBF\xBD"

static int detok_is(const struct ebb_tokenizer *t, const int32_t *ids, int n, int flush,
                    const char *want) {
    char out[256];
    size_t w = detok_all(t, ids, n, out, sizeof out, flush);
    int ok = w == strlen(want) && !memcmp(out, want, w);
    if (!ok) fprintf(stderr, "detok gave %zu bytes \"%.*s\", wanted \"%s\"\n", w, (int)w, out, want);
    return ok;
}

static void test_detok(void) {
    char err[256];
    struct test_model m = {"gpt2", "smollm", NULL, 1};
    struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    /* Ids 0..255 are the raw bytes. The euro sign arrives as a two-byte token
     * and a one-byte token: nothing is released until it is complete. */
    struct detok d;
    char out[64];
    detok_init(&d, t);
    CHECK(detok_push(&d, ID_EURO2, out, sizeof out) == 0);
    CHECK(detok_push(&d, 0xAC, out, sizeof out) == 3 && !memcmp(out, "\xE2\x82\xAC", 3));
    CHECK(detok_flush(&d, out, sizeof out) == 0);
    /* One byte at a time through a 4-byte character. */
    detok_init(&d, t);
    CHECK(detok_push(&d, 0xF0, out, sizeof out) == 0);
    CHECK(detok_push(&d, 0x9F, out, sizeof out) == 0);
    CHECK(detok_push(&d, 0x98, out, sizeof out) == 0);
    CHECK(detok_push(&d, 0x80, out, sizeof out) == 4 && !memcmp(out, "\xF0\x9F\x98\x80", 4));
    /* Text mixed with control tokens; control tokens yield their text. */
    CHECK(detok_is(t, IDS(ID_IM_START, ID_SP_THE, 'x'), 3, 1, "<|im_start|> thex"));
    /* Ill-formed input: one U+FFFD per maximal ill-formed subpart (what
     * Python's bytes.decode("utf-8", "replace") gives). */
    CHECK(detok_is(t, IDS(0xFF, 'a'), 2, 1, FFFD "a"));
    CHECK(detok_is(t, IDS(0x80, 0x80), 2, 1, FFFD FFFD));
    CHECK(detok_is(t, IDS(ID_EURO2, 'a'), 2, 1, FFFD "a"));          /* E2 82 then 'a' */
    CHECK(detok_is(t, IDS(0xED, 0xA0, 0x80), 3, 1, FFFD FFFD FFFD)); /* surrogate */
    CHECK(detok_is(t, IDS(0xF0, 0x9F, 0x98, 0xF0, 0x9F, 0x98, 0x80), 7, 1, FFFD "\xF0\x9F\x98\x80"));
    CHECK(detok_is(t, IDS(0xC0, 0xAF), 2, 1, FFFD FFFD));             /* overlong */
    /* Without flush, an incomplete tail stays held; flush replaces it once. */
    CHECK(detok_is(t, IDS('o', 'k', 0xF0, 0x9F, 0x98), 5, 0, "ok"));
    CHECK(detok_is(t, IDS('o', 'k', 0xF0, 0x9F, 0x98), 5, 1, "ok" FFFD));
    CHECK(detok_is(t, IDS(ID_EURO2), 1, 1, FFFD));
    /* A bad id emits nothing and does not disturb a held prefix. */
    CHECK(detok_is(t, IDS(0xE2, 99999, 0x82, 0xAC), 4, 1, "\xE2\x82\xAC"));
    /* Output never ends inside a character when cap is too small. */
    detok_init(&d, t);
    CHECK(detok_push(&d, ID_EURO2, out, sizeof out) == 0);
    CHECK(detok_push(&d, 0xAC, out, 2) == 0);
    tokenizer_free(t);
}

static int str_is(char *got, const char *want) {
    int ok = got && !strcmp(got, want);
    if (!ok) fprintf(stderr, "chat_render gave:\n%s\nwanted:\n%s\n", got ? got : "(null)", want);
    free(got);
    return ok;
}

static void test_chat_render(void) {
    char err[256];
    struct test_model m = {"gpt2", "smollm", SMOL_LIKE_TEMPLATE, 1};
    struct ebb_tokenizer *t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    struct chat_msg user_only[] = {{"user", "Hi!"}};
    CHECK(str_is(chat_render(t, user_only, 1, 1),
                 "<|im_start|>system\nYou are Testy, a 'test' bot.<|im_end|>\n"
                 "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"));
    struct chat_msg with_sys[] = {{"system", "Be terse."}, {"user", "Hi"}, {"assistant", "Yo"},
                                  {"user", "multi\nline"}};
    CHECK(str_is(chat_render(t, with_sys, 4, 0),
                 "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                 "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nmulti\nline<|im_end|>\n"));
    CHECK(str_is(chat_render(t, NULL, 0, 1), "<|im_start|>assistant\n"));
    tokenizer_free(t);

    m.tmpl = QWEN_LIKE_TEMPLATE;
    t = load_test(&m, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (t) {
        CHECK(str_is(chat_render(t, user_only, 1, 0),
                     "<|im_start|>system\nBe brief.\tOk.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"));
        tokenizer_free(t);
    }
    m.tmpl = NO_DEFAULT_TEMPLATE;
    t = load_test(&m, err, sizeof err);
    if (t) {
        CHECK(str_is(chat_render(t, user_only, 1, 1),
                     "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"));
        tokenizer_free(t);
    }
    m.tmpl = NULL;
    t = load_test(&m, err, sizeof err);
    if (t) {
        CHECK(str_is(chat_render(t, user_only, 1, 0), "<|im_start|>user\nHi!<|im_end|>\n"));
        tokenizer_free(t);
    }
}

/* ---------------------------------------------------------------------------
 * The real model, when present.
 * ------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct thread_job { const struct ebb_tokenizer *t; const char *text; size_t len; int n; int32_t *ids; };

static void *encode_job(void *arg) {
    struct thread_job *j = arg;
    j->n = tokenizer_encode(j->t, j->text, j->len, 1, &j->ids);
    return NULL;
}

/* A mixed text of about `size` bytes. */
static char *make_text(size_t size, size_t *len) {
    static const char *const parts[] = {
        "The quick brown fox jumps over the lazy dog. ", "def f(x):\n    return x ** 2  # square\n",
        "In 2024, 1,234,567 people said \"hello\" — naïve café! ", "日本語のテキストと中文字符。 ",
        "emoji 😀👍🏽🇫🇷 and    spaces\t\ttabs\r\n", "<|im_start|>user\nhi<|im_end|>\n",
    };
    char *s = malloc(size + 256);
    if (!s) return NULL;
    size_t n = 0;
    for (int i = 0; n < size; i++) {
        const char *p = parts[(i * 7) % 6];
        memcpy(s + n, p, strlen(p));
        n += strlen(p);
    }
    *len = n;
    return s;
}

static void test_real_model(const char *path) {
    char err[512];
    struct gguf_file f;
    if (gguf_open(&f, path, err, sizeof err)) {
        CHECK_MSG(0, "%s", err);
        return;
    }
    double t0 = now_s();
    struct ebb_tokenizer *t = tokenizer_load(&f, err, sizeof err);
    double load_ms = (now_s() - t0) * 1e3;
    gguf_close(&f);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    printf("test_tokenizer: tokenizer_load %.1f ms\n", load_ms);
    CHECK(tokenizer_n_vocab(t) == 49152);
    CHECK(tokenizer_bos(t) == 1 && tokenizer_eos(t) == 2 && tokenizer_add_bos(t) == 0);
    CHECK(tokenizer_bos_to_add(t) == -1);   /* SmolLM2 has a BOS but does not ask for it */
    CHECK(tokenizer_find(t, "<|im_start|>") == 1 && tokenizer_is_control(t, 1));
    /* Ids from Hugging Face `tokenizers` on a tokenizer built from this GGUF
     * (Digits(individual) + ByteLevel), see tests/reference/test_tokenizer.py. */
    CHECK(encodes_to(t, "Hello world! 123", 1, IDS(19556, 905, 17, 216, 33, 34, 35)));
    CHECK(encodes_to(t, "<|im_start|>user\nhi<|im_end|>\n", 1, IDS(1, 4093, 198, 6004, 2, 198)));
    CHECK(encodes_to(t, "naïve café 😀 日本語", 1,
                     IDS(3546, 46494, 37366, 40303, 218, 17097, 241, 115, 40993, 179, 120, 248)));
    CHECK(encodes_to(t, "  multiple   spaces\t\r\n", 1, IDS(216, 2701, 256, 5600, 197, 2738)));
    /* "😀 😀" (F0 9F 98 80) as HF splits it: F0 9F | 98 | 80 | " " F0 9F 98 | 80. */
    CHECK(encodes_to(t, "😀 😀", 1, IDS(10813, 242, 218, 40303, 218)));
    char out[64];
    struct detok d;
    detok_init(&d, t);
    size_t w = detok_push(&d, 10813, out, sizeof out);
    w += detok_push(&d, 242, out + w, sizeof out - w);
    CHECK(w == 0);
    w = detok_push(&d, 218, out, sizeof out);
    CHECK(w == 4 && !memcmp(out, "\xF0\x9F\x98\x80", 4));
    w = detok_push(&d, 40303, out, sizeof out);
    CHECK(w == 1 && out[0] == ' ');
    w = detok_push(&d, 218, out, sizeof out);
    CHECK(w == 4 && !memcmp(out, "\xF0\x9F\x98\x80", 4));

    /* The model's own template: its default system prompt is inserted. */
    struct chat_msg msgs[] = {{"user", "What is 2+2?"}};
    CHECK(str_is(chat_render(t, msgs, 1, 1),
                 "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                 "<|im_start|>assistant\n"));

    /* Speed, and the same result from several threads at once. */
    size_t len;
    char *text = make_text(2 << 20, &len);
    CHECK(text != NULL);
    if (text) {
        int32_t *ids;
        t0 = now_s();
        int n = tokenizer_encode(t, text, len, 1, &ids);
        double s = now_s() - t0;
        CHECK(n > 0);
        printf("test_tokenizer: encoded %.1f MB into %d tokens in %.0f ms (%.1f MB/s)\n",
               len / 1e6, n, s * 1e3, len / s / 1e6);
        /* Decoding gives the text back. */
        char *back = malloc(len + 64);
        CHECK(back != NULL);
        if (back && n > 0) {
            size_t bw = 0;
            detok_init(&d, t);
            for (int i = 0; i < n; i++) bw += detok_push(&d, ids[i], back + bw, len + 64 - bw);
            bw += detok_flush(&d, back + bw, len + 64 - bw);
            CHECK(bw == len && !memcmp(back, text, len));
        }
        free(back);
        struct thread_job jobs[4];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) {
            jobs[i] = (struct thread_job){t, text, len / 8, 0, NULL};
            CHECK(pthread_create(&th[i], NULL, encode_job, &jobs[i]) == 0);
        }
        int32_t *one;
        int n_one = tokenizer_encode(t, text, len / 8, 1, &one);
        for (int i = 0; i < 4; i++) {
            pthread_join(th[i], NULL);
            CHECK(jobs[i].n == n_one && !memcmp(jobs[i].ids, one, (size_t)n_one * sizeof *one));
            free(jobs[i].ids);
        }
        free(one);
        free(ids);
        /* A very long run of whitespace is one word: no recursion, no blow-up. */
        memset(text, ' ', 1 << 20);
        n = tokenizer_encode(t, text, 1 << 20, 1, &ids);
        CHECK(n > 0 && n < (1 << 20) / 8);
        free(ids);
        free(text);
    }
    tokenizer_free(t);
}

int main(void) {
    test_metadata();
    test_encode_rules();
    test_long_pieces();
    test_load_errors();
    test_pre_tokenizers();
    test_detok();
    test_chat_render();
    char path[4096];
    if (check_model_path(path, sizeof path)) return check_report_skipped("test_tokenizer", path);
    test_real_model(path);
    return check_report("test_tokenizer");
}
