/* Byte-level BPE tokenizer built from GGUF metadata (tokenizer.ggml.*). */
#ifndef EBB_ENGINE_TOKENIZER_H
#define EBB_ENGINE_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>

struct gguf_file;
struct ebb_tokenizer;

/* Builds the tokenizer from an open GGUF. NULL with a message in err if the
 * metadata is missing, inconsistent or of an unsupported model/pre-tokenizer. */
struct ebb_tokenizer *tokenizer_load(const struct gguf_file *f, char *err, size_t errlen);
void tokenizer_free(struct ebb_tokenizer *t);

int tokenizer_n_vocab(const struct ebb_tokenizer *t);
int32_t tokenizer_bos(const struct ebb_tokenizer *t);   /* -1 if none */
int32_t tokenizer_eos(const struct ebb_tokenizer *t);
int tokenizer_add_bos(const struct ebb_tokenizer *t);   /* tokenizer.ggml.add_bos_token */
/* The id a sequence starts with: BOS when the model asks for it
 * (tokenizer_add_bos) and has one, else -1. */
int32_t tokenizer_bos_to_add(const struct ebb_tokenizer *t);
/* 1 for control tokens (<|im_end|> ...) that end or structure a turn. */
int tokenizer_is_control(const struct ebb_tokenizer *t, int32_t id);
/* Id of an exact token text, or -1. */
int32_t tokenizer_find(const struct ebb_tokenizer *t, const char *text);

/* The longest pre-tokenized piece BPE runs over in one go, in bytes. A longer
 * piece (a run of one character class: one "word" of 8 MiB, a long run of
 * spaces) is encoded as consecutive chunks of at most this many bytes, each
 * cut before a UTF-8 character starts; merges never cross a cut. This bounds
 * the work per input byte (O(log TOKENIZER_MAX_PIECE)) and the scratch of an
 * encode. The ids then may differ from the reference tokenizer (Hugging Face
 * `tokenizers`, which has no such bound) around each cut -- the text still
 * decodes back exactly. Words of natural text are far shorter; a piece this
 * long is machine-made. */
#define TOKENIZER_MAX_PIECE 4096

/* Encodes len bytes of text. If parse_special, occurrences of special/control
 * token texts (e.g. "<|im_start|>") become their ids; otherwise they are
 * tokenized as plain text. Never adds BOS. Returns the number of ids, or -1
 * on invalid UTF-8 / allocation failure; *ids is malloc'd, caller frees. */
int tokenizer_encode(const struct ebb_tokenizer *t, const char *text, size_t len,
                     int parse_special, int32_t **ids);
/* tokenizer_encode, then tokenizer_bos_to_add's id put first when add_bos is
 * set and the model has one to add: the one way a prompt gets its BOS.
 * Returns the number of ids or -1 as tokenizer_encode; *ids is malloc'd with
 * room for at least one id, caller frees. */
int tokenizer_encode_with_bos(const struct ebb_tokenizer *t, const char *text, size_t len,
                              int parse_special, int add_bos, int32_t **ids);

/* The raw bytes a token stands for (byte-level decoded); control tokens
 * yield their text. *len receives the length; returns NULL for a bad id. */
const char *tokenizer_piece(const struct ebb_tokenizer *t, int32_t id, size_t *len);

/* Incremental detokenization: bytes are held back until they form complete
 * UTF-8 characters, so a stream never emits a broken sequence. */
struct detok {
    const struct ebb_tokenizer *tok;
    char pending[8];
    int n_pending;
};
void detok_init(struct detok *d, const struct ebb_tokenizer *t);
/* Output buffer size that detok_push and detok_flush always fit in. */
size_t tokenizer_detok_buffer(const struct ebb_tokenizer *t);
/* Appends the complete characters now available to out (cap bytes, at
 * least tokenizer_detok_buffer(); less and output is dropped at a character
 * boundary); returns the number of bytes written. */
size_t detok_push(struct detok *d, int32_t id, char *out, size_t cap);
/* At end of stream: flushes what is held (invalid leftovers become U+FFFD). */
size_t detok_flush(struct detok *d, char *out, size_t cap);

/* Chat messages rendered with the model's ChatML template. */
struct chat_msg { const char *role; const char *content; };
/* malloc'd NUL-terminated prompt; add_assistant appends "<|im_start|>assistant\n".
 * When the first message is not a system message and the model's template
 * supplies a default system prompt, it is inserted as the template does. */
char *chat_render(const struct ebb_tokenizer *t, const struct chat_msg *msgs, int n,
                  int add_assistant);
#endif
