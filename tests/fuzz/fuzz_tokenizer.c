/* Fuzz target: the tokenizer (engine/tokenizer.c) on arbitrary bytes, with
 * the default model's vocabulary (loaded once; EBB_MODEL names another GGUF,
 * else $EBB_SOURCE_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf, else the
 * same under the source tree this was built from; without it the target
 * exits 77, skipped).
 *
 * Byte 0: bit 0 parse special tokens, bit 1 add BOS, bit 2 read the rest as
 * token ids (little-endian 16-bit, modulo the vocabulary) instead of text.
 * Text: encoding succeeds exactly when the bytes are well-formed UTF-8
 * (tokenizer.h); then every id is in the vocabulary, the pieces put back
 * together are the text again (byte-level BPE loses nothing; control
 * tokens decode to their own text) less the bytes the vocabulary has no
 * token for (dropped, as llama.cpp does: tokenizer.c; SmolLM2 lacks most
 * C0 controls), and so is what the incremental detokenizer releases
 * (when what is left is still well-formed); the text rendered as a chat message is in the
 * prompt chat_render makes. Ids: whatever the sequence, the detokenizer
 * releases well-formed UTF-8 only and stays inside its buffer. */
#include <string.h>

#include "engine/tokenizer.h"
#include "engine/utf8.h"
#include "storage/gguf.h"
#include "tests/fuzz/fuzz.h"

#ifndef EBB_FUZZ_SOURCE_DIR
#define EBB_FUZZ_SOURCE_DIR "."
#endif

static struct gguf_file file;
static struct ebb_tokenizer *tok;
static int n_vocab;
static int has_byte[256];   /* the vocabulary has a token for this byte alone */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char path[4096];
    const char *model = getenv("EBB_MODEL"), *dir = getenv("EBB_SOURCE_DIR");
    if (model && *model) snprintf(path, sizeof path, "%s", model);
    else snprintf(path, sizeof path, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", dir && *dir ? dir : EBB_FUZZ_SOURCE_DIR);
    char err[512];
    if (gguf_open(&file, path, err, sizeof err)) {
        fprintf(stderr, "fuzz_tokenizer: skipped, the vocabulary is not readable: %s (scripts/setup fetches the model)\n", err);
        exit(FUZZ_SKIPPED);
    }
    tok = tokenizer_load(&file, err, sizeof err);
    if (!tok) { fprintf(stderr, "fuzz_tokenizer: %s\n", err); exit(1); }
    n_vocab = tokenizer_n_vocab(tok);
    for (int32_t id = 0; id < n_vocab; id++) {
        size_t len;
        const char *piece = tokenizer_piece(tok, id, &len);
        if (piece && len == 1 && !tokenizer_is_control(tok, id)) has_byte[(uint8_t)piece[0]] = 1;
    }
    return 0;
}

/* Appends the detokenizer's output for ids to out (cap bytes), checking
 * that every release is whole characters. */
static size_t detokenize(const int32_t *ids, int n, char *out, size_t cap) {
    struct detok d;
    detok_init(&d, tok);
    const size_t step = tokenizer_detok_buffer(tok);
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        FUZZ_ASSERT(cap - len >= step);
        const size_t k = detok_push(&d, ids[i], out + len, step);
        FUZZ_ASSERT(k <= step && utf8_valid(out + len, k));
        len += k;
    }
    FUZZ_ASSERT(cap - len >= step);
    const size_t k = detok_flush(&d, out + len, step);
    FUZZ_ASSERT(k <= step && utf8_valid(out + len, k));
    return len + k;
}

static void text_case(const char *text, size_t len, int special, int bos) {
    int32_t *ids = NULL;
    const int n = tokenizer_encode_with_bos(tok, text, len, special, bos, &ids);
    const int valid = utf8_valid(text, len);
    FUZZ_ASSERT((n >= 0) == valid);
    if (n < 0) { free(ids); return; }
    const int32_t bos_id = tokenizer_bos_to_add(tok);
    const int skip = bos && bos_id >= 0;
    if (skip) FUZZ_ASSERT(n >= 1 && ids[0] == bos_id);
    /* What should come back: the text without the bytes that have no token. */
    char *kept = malloc(len + 1);
    FUZZ_ASSERT(kept);
    size_t kept_len = 0;
    for (size_t i = 0; i < len; i++)
        if (has_byte[(uint8_t)text[i]]) kept[kept_len++] = text[i];
    FUZZ_ASSERT(kept_len == 0 || n > skip);
    size_t joined_cap = len + 64, joined_len = 0;
    char *joined = malloc(joined_cap);
    FUZZ_ASSERT(joined);
    for (int i = skip; i < n; i++) {
        FUZZ_ASSERT(ids[i] >= 0 && ids[i] < n_vocab);
        size_t plen;
        const char *piece = tokenizer_piece(tok, ids[i], &plen);
        FUZZ_ASSERT(piece);
        FUZZ_ASSERT(joined_len + plen <= len);   /* pieces never add bytes */
        memcpy(joined + joined_len, piece, plen);
        joined_len += plen;
    }
    FUZZ_ASSERT(joined_len == kept_len && !memcmp(joined, kept, kept_len));
    free(joined);

    const size_t cap = (size_t)(n + 1) * tokenizer_detok_buffer(tok);
    char *out = malloc(cap);
    FUZZ_ASSERT(out);
    const size_t out_len = detokenize(ids + skip, n - skip, out, cap);
    /* Dropping a byte of a character (SmolLM2 has no token for F1, say)
     * leaves ill-formed bytes, which the detokenizer replaces with U+FFFD. */
    if (utf8_valid(kept, kept_len)) FUZZ_ASSERT(out_len == kept_len && !memcmp(out, kept, kept_len));
    free(out);
    free(kept);
    free(ids);

    if (!memchr(text, 0, len)) {
        char *content = malloc(len + 1);
        FUZZ_ASSERT(content);
        memcpy(content, text, len);
        content[len] = 0;
        const struct chat_msg msgs[2] = {{"user", content}, {"assistant", content}};
        char *prompt = chat_render(tok, msgs, 2, special);
        FUZZ_ASSERT(prompt && strstr(prompt, content));
        free(prompt);
        free(content);
    }
}

static void ids_case(const uint8_t *data, size_t size) {
    const int n = (int)(size / 2);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    FUZZ_ASSERT(ids);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((data[2 * i] | data[2 * i + 1] << 8) % n_vocab);
    const size_t cap = (size_t)(n + 1) * tokenizer_detok_buffer(tok);
    char *out = malloc(cap);
    FUZZ_ASSERT(out);
    const size_t len = detokenize(ids, n, out, cap);
    FUZZ_ASSERT(utf8_valid(out, len));
    free(out);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const unsigned flags = data[0];
    char *text = malloc(size - 1 ? size - 1 : 1);   /* exact size: no terminator to lean on */
    if (!text) return 0;
    memcpy(text, data + 1, size - 1);
    if (flags & 4) ids_case((const uint8_t *)text, size - 1);
    else text_case(text, size - 1, flags & 1, (flags >> 1) & 1);
    free(text);
    return 0;
}
