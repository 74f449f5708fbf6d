/* Byte-level BPE tokenizer (the GPT-2 family: SmolLM, Llama 3, Qwen2, ...)
 * built from GGUF metadata.
 *
 * Encoding runs three stages, the same ones Hugging Face `tokenizers` runs:
 *
 *   1. Special tokens. With parse_special, the texts of control (type 3) and
 *      user-defined (type 4) tokens are cut out of the input first, leftmost
 *      and then longest match, and become their ids directly.
 *   2. Pre-tokenization. The rest is split into "words" by a sequence of
 *      regular expressions chosen by tokenizer.ggml.pre. Each expression splits
 *      every piece the previous one produced into matches and the gaps between
 *      them (HF's Split with behaviour "Isolated"). The expressions are the
 *      ones the models' tokenizer.json files use, run through PCRE2 in UTF +
 *      UCP mode (JIT-compiled when available) so that \p{L}, \p{N} and \s mean
 *      the Unicode classes, without hand-written character tables.
 *   3. BPE per word, in byte space. A byte-level vocabulary writes each byte
 *      as one printable character (GPT-2's bytes_to_unicode); rather than map
 *      every input byte to that alphabet and look strings up, the tokenizer
 *      starts from the 256 single-byte token ids and applies merges stored as
 *      (left id, right id) -> (rank, merged id) in an open-addressing hash. A
 *      binary heap ordered by (rank, position) picks the next merge, so a word
 *      of n bytes costs O(n log n) instead of the classic O(n^2) rescans.
 *      A piece longer than TOKENIZER_MAX_PIECE bytes runs BPE in chunks of
 *      that size (bpe_piece), which bounds the work and scratch per byte.
 *
 * Token strings are copied out of the GGUF mapping at load time (one arena for
 * all texts and one for the decoded byte pieces), so the tokenizer does not
 * depend on the file staying open. Everything built at load time is read-only
 * afterwards: encode allocates its own scratch, so one tokenizer serves any
 * number of threads at once. No word cache: measured encode speed is already
 * far above what a forward pass consumes, and a shared cache would need a lock.
 *
 * Deliberate choices:
 *   - No Unicode normalization (Qwen2's tokenizer.json asks for NFC; NFC text
 *     is unaffected). llama.cpp does not normalize either.
 *   - A byte whose single-byte token is missing from the vocabulary is
 *     dropped, as llama.cpp does (byte-level vocabularies have all 256).
 *   - "default" (and a missing tokenizer.ggml.pre) means the plain GPT-2
 *     expression, which is what a ByteLevel BPE without extra pre-tokenizers
 *     does in HF; llama.cpp's legacy "default" list is an approximation.
 *   - If a merge pair is listed twice, the first (lowest) rank wins.
 *   - \p{L}, \p{N} and White_Space come from PCRE2's Unicode tables (Unicode
 *     14 in PCRE2 10.42); characters assigned in later Unicode versions may
 *     be classified differently from a newer HF build.
 */
#include "engine/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/utf8.h"
#include "storage/error.h"
#include "storage/gguf.h"

enum {
    TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3,
    TOKEN_USER_DEFINED = 4, TOKEN_UNUSED = 5, TOKEN_BYTE = 6
};

/* Token types whose text is matched verbatim in the input (parse_special). */
static int is_special_type(uint8_t type) {
    return type == TOKEN_CONTROL || type == TOKEN_USER_DEFINED;
}

#define MAX_PRE_REGEX 3

/* ---------------------------------------------------------------------------
 * Pre-tokenizers: name aliases and the expressions they run, in order.
 * ------------------------------------------------------------------------- */

/* The expressions of the models' tokenizer.json files, with one change: \s
 * and \S are spelled \p{White_Space} and \P{White_Space}. In UCP mode PCRE2's
 * \s also matches U+180E (MONGOLIAN VOWEL SEPARATOR, whitespace before
 * Unicode 6.3), while the Oniguruma engine behind HF `tokenizers` uses the
 * Unicode White_Space property; the property is exact in both. */
#define WS "\\p{White_Space}"
#define NWS "\\P{White_Space}"

/* GPT-2 (HF ByteLevel, use_regex):
 * 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+" \
    "|" WS "+(?!" NWS ")|" WS "+"
/* Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
 *          | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
#define RE_LLAMA3 "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" \
    "| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" WS "*[\\r\\n]+|" WS "+(?!" NWS ")|" WS "+"
/* Qwen2: as Llama 3 but every digit on its own (\p{N} instead of \p{N}{1,3}). */
#define RE_QWEN2 "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
    "| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" WS "*[\\r\\n]+|" WS "+(?!" NWS ")|" WS "+"

struct pre_def {
    const char *names[4];              /* aliases as tokenizer.ggml.pre spells them */
    const char *regex[MAX_PRE_REGEX];  /* applied in order; NULL-terminated */
};

static const struct pre_def PRE_DEFS[] = {
    /* SmolLM's tokenizer.json: Sequence[Digits(individual_digits), ByteLevel]. */
    /* StarCoder's is the same (llama.cpp maps these names alike). */
    {{"smollm", "starcoder", "refact", NULL}, {"\\p{N}", RE_GPT2, NULL}},
    {{"gpt2", "default", NULL}, {RE_GPT2, NULL}},
    {{"llama3", "llama-bpe", NULL}, {RE_LLAMA3, NULL}},
    {{"qwen2", NULL}, {RE_QWEN2, NULL}},
};

/* ---------------------------------------------------------------------------
 * The tokenizer.
 * ------------------------------------------------------------------------- */

struct merge_slot {
    uint64_t key;     /* left id << 32 | right id; MERGE_EMPTY when free */
    int32_t rank;
    int32_t result;
};
#define MERGE_EMPTY UINT64_MAX

/* The upper hash bits ride along with the id, so a probe rejects a wrong slot
 * without touching the token's text (loading is dominated by cache misses). */
struct text_slot {
    uint32_t tag;    /* upper 32 bits of the hash */
    int32_t id;      /* id + 1; 0 = empty */
};

struct ebb_tokenizer {
    int n_vocab;
    char *texts;               /* token texts as the GGUF spells them */
    uint32_t *text_off, *text_len;
    char *pieces;              /* the bytes each token stands for */
    uint32_t *piece_off, *piece_len;
    uint8_t *type;

    struct text_slot *text_slots;  /* text -> id, open addressing */
    uint32_t text_mask;
    struct merge_slot *merges; /* (left, right) -> (rank, merged id) */
    uint32_t merge_mask;
    int32_t byte_id[256];      /* single-byte token of each byte, or -1 */

    /* Special tokens sorted by first byte, then longest first. */
    int32_t *specials;
    int n_specials;
    int special_start[257];    /* specials with first byte b: [start[b], start[b+1]) */

    pcre2_code *re[MAX_PRE_REGEX];
    int n_re;

    int32_t bos, eos;
    int add_bos;
    char *default_system;      /* from the chat template, or NULL */
    size_t max_piece;          /* longest piece in bytes */
};

/* ---------------------------------------------------------------------------
 * UTF-8 helpers.
 * ------------------------------------------------------------------------- */

/* Decodes the code point of a well-formed sequence of length l. */
static uint32_t utf8_cp(const uint8_t *s, size_t l) {
    switch (l) {
    case 1: return s[0];
    case 2: return (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
    case 3: return (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    default:
        return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
               (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    }
}

/* ---------------------------------------------------------------------------
 * GPT-2's byte <-> printable character table. Bytes that are printable and
 * not space stand for themselves; the other 68 are moved to U+0100.. in
 * byte order so every byte has a visible, unambiguous character.
 * ------------------------------------------------------------------------- */

#define BYTE_CP_LIMIT 324   /* 256 + 68: every mapped code point is below */

static void byte_table(int16_t cp_to_byte[BYTE_CP_LIMIT], uint16_t byte_to_cp[256]) {
    for (int i = 0; i < BYTE_CP_LIMIT; i++) cp_to_byte[i] = -1;
    int next = 256;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_to_cp[b] = (uint16_t)(printable ? b : next++);
        cp_to_byte[byte_to_cp[b]] = (int16_t)b;
    }
}

/* Writes the bytes token text s stands for into out (room for n bytes; the
 * result is never longer than the text). Characters outside the byte alphabet
 * are kept as their own UTF-8, as HF's ByteLevel decoder does. */
static size_t byte_decode(const int16_t *cp_to_byte, const uint8_t *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq_len(s + i, n - i);
        if (!l) { out[o++] = (char)s[i++]; continue; }
        uint32_t cp = utf8_cp(s + i, l);
        if (cp < BYTE_CP_LIMIT && cp_to_byte[cp] >= 0) out[o++] = (char)cp_to_byte[cp];
        else { memcpy(out + o, s + i, l); o += l; }
        i += l;
    }
    return o;
}

/* ---------------------------------------------------------------------------
 * Hash tables.
 * ------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;          /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ^ (h >> 31);
}

static uint32_t hash_pair(uint64_t key) {
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32);
}

static uint32_t table_size_for(uint64_t n) {
    uint32_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    return cap;
}

static int text_is(const struct ebb_tokenizer *t, int32_t id, const char *s, size_t n) {
    return t->text_len[id] == n && !memcmp(t->texts + t->text_off[id], s, n);
}

static int32_t text_lookup(const struct ebb_tokenizer *t, const char *s, size_t n) {
    uint64_t h = hash_bytes(s, n);
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint32_t i = (uint32_t)h & t->text_mask;; i = (i + 1) & t->text_mask) {
        const struct text_slot *slot = &t->text_slots[i];
        if (!slot->id) return -1;
        if (slot->tag == tag && text_is(t, slot->id - 1, s, n)) return slot->id - 1;
    }
}

/* Later duplicates of a text replace earlier ones, as in a dict built in order. */
static void text_insert(struct ebb_tokenizer *t, int32_t id) {
    const char *s = t->texts + t->text_off[id];
    size_t n = t->text_len[id];
    uint64_t h = hash_bytes(s, n);
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint32_t i = (uint32_t)h & t->text_mask;; i = (i + 1) & t->text_mask) {
        struct text_slot *slot = &t->text_slots[i];
        if (!slot->id || (slot->tag == tag && text_is(t, slot->id - 1, s, n))) {
            *slot = (struct text_slot){tag, id + 1};
            return;
        }
    }
}

static const struct merge_slot *merge_lookup(const struct ebb_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const struct merge_slot *s = &t->merges[i];
        if (s->key == key) return s;
        if (s->key == MERGE_EMPTY) return NULL;
    }
}

static void merge_insert(struct ebb_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t res) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        struct merge_slot *s = &t->merges[i];
        if (s->key == key) return;                 /* keep the lower rank */
        if (s->key == MERGE_EMPTY) {
            *s = (struct merge_slot){key, rank, res};
            return;
        }
    }
}

/* ---------------------------------------------------------------------------
 * Loading.
 * ------------------------------------------------------------------------- */

/* GGUF string arrays are stored as consecutive (u64 length, bytes) records.
 * gguf_open has bounds-checked every record, so walking them in order is safe
 * and O(1) per element (gguf_arr_str(i) would walk from the start each time). */
static struct gguf_str next_str(const uint8_t **p) {
    uint64_t len;
    memcpy(&len, *p, 8);
    struct gguf_str s = {(const char *)*p + 8, len};
    *p += 8 + len;
    return s;
}

static const struct gguf_kv *find_array(const struct gguf_file *f, const char *key, uint32_t elem,
                                        int required, char *err, size_t errlen) {
    const struct gguf_kv *kv = gguf_find(f, key);
    if (!kv) {
        if (required) errf(err, errlen, "%s: tokenizer metadata %s is missing", f->path, key);
        return NULL;
    }
    if (kv->type != GGUF_ARRAY || (elem != (uint32_t)-1 && kv->arr_type != elem)) {
        errf(err, errlen, "%s: tokenizer metadata %s has the wrong type", f->path, key);
        return NULL;
    }
    return kv;
}

static int load_tokens(struct ebb_tokenizer *t, const struct gguf_file *f, char *err, size_t errlen) {
    const struct gguf_kv *kv = find_array(f, "tokenizer.ggml.tokens", GGUF_STRING, 1, err, errlen);
    if (!kv) return -1;
    if (kv->arr_n == 0 || kv->arr_n > INT32_MAX / 2) {
        errf(err, errlen, "%s: tokenizer has %llu tokens", f->path, (unsigned long long)kv->arr_n);
        return -1;
    }
    t->n_vocab = (int)kv->arr_n;
    size_t n = (size_t)t->n_vocab, total = 0;
    const uint8_t *p = kv->value;
    for (size_t i = 0; i < n; i++) total += next_str(&p).len;
    if (total > UINT32_MAX) {
        errf(err, errlen, "%s: tokenizer vocabulary text is too large", f->path);
        return -1;
    }
    t->texts = malloc(total + 1);
    t->pieces = malloc(total + 1);
    t->text_off = malloc(n * sizeof *t->text_off);
    t->text_len = malloc(n * sizeof *t->text_len);
    t->piece_off = malloc(n * sizeof *t->piece_off);
    t->piece_len = malloc(n * sizeof *t->piece_len);
    t->type = malloc(n);
    t->text_mask = table_size_for(n) - 1;
    t->text_slots = calloc((size_t)t->text_mask + 1, sizeof *t->text_slots);
    if (!t->texts || !t->pieces || !t->text_off || !t->text_len || !t->piece_off ||
        !t->piece_len || !t->type || !t->text_slots) {
        errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
        return -1;
    }
    memset(t->type, TOKEN_NORMAL, n);
    const struct gguf_kv *types = find_array(f, "tokenizer.ggml.token_type", (uint32_t)-1, 0, err, errlen);
    if (!types && gguf_find(f, "tokenizer.ggml.token_type")) return -1;
    if (types && types->arr_n != n) {
        errf(err, errlen, "%s: tokenizer has %zu tokens but %llu token types", f->path, n,
                (unsigned long long)types->arr_n);
        return -1;
    }
    if (types && (types->arr_type == GGUF_STRING || types->arr_type == GGUF_ARRAY)) {
        errf(err, errlen, "%s: tokenizer.ggml.token_type is not numeric", f->path);
        return -1;
    }
    int16_t cp_to_byte[BYTE_CP_LIMIT];
    uint16_t byte_to_cp[256];
    byte_table(cp_to_byte, byte_to_cp);
    size_t toff = 0, poff = 0;
    p = kv->value;
    for (size_t i = 0; i < n; i++) {
        struct gguf_str s = next_str(&p);
        memcpy(t->texts + toff, s.ptr, s.len);
        t->text_off[i] = (uint32_t)toff;
        t->text_len[i] = (uint32_t)s.len;
        toff += s.len;
        if (types) {
            double ty = gguf_arr_num(types, i);
            t->type[i] = ty >= 1 && ty <= 6 ? (uint8_t)ty : TOKEN_NORMAL;
        }
        /* Control and user-defined tokens stand for their text as written. */
        int verbatim = is_special_type(t->type[i]);
        size_t plen;
        if (verbatim) {
            memcpy(t->pieces + poff, s.ptr, s.len);
            plen = s.len;
        } else {
            plen = byte_decode(cp_to_byte, (const uint8_t *)s.ptr, s.len, t->pieces + poff);
        }
        t->piece_off[i] = (uint32_t)poff;
        t->piece_len[i] = (uint32_t)plen;
        if (plen > t->max_piece) t->max_piece = plen;
        poff += plen;
        text_insert(t, (int32_t)i);
    }
    /* The single-byte tokens are the ones BPE starts from. */
    for (int b = 0; b < 256; b++) {
        unsigned cp = byte_to_cp[b];   /* below 0x800: one or two UTF-8 bytes */
        char c[2] = {(char)(0xC0 | cp >> 6), (char)(0x80 | (cp & 0x3F))};
        if (cp < 0x80) c[0] = (char)cp;
        t->byte_id[b] = text_lookup(t, c, cp < 0x80 ? 1 : 2);
    }
    return 0;
}

static int load_merges(struct ebb_tokenizer *t, const struct gguf_file *f, char *err, size_t errlen) {
    const struct gguf_kv *kv = find_array(f, "tokenizer.ggml.merges", GGUF_STRING, 1, err, errlen);
    if (!kv) return -1;
    if (kv->arr_n > INT32_MAX / 2) {
        errf(err, errlen, "%s: tokenizer has too many merges", f->path);
        return -1;
    }
    t->merge_mask = table_size_for(kv->arr_n) - 1;
    t->merges = malloc(((size_t)t->merge_mask + 1) * sizeof *t->merges);
    if (!t->merges) {
        errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
        return -1;
    }
    for (size_t i = 0; i <= t->merge_mask; i++) t->merges[i].key = MERGE_EMPTY;
    char *joined = NULL;
    size_t joined_cap = 0;
    const uint8_t *p = kv->value;
    int rc = 0;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        struct gguf_str m = next_str(&p);
        /* "left right": the separator is the first space after position 0
         * (byte-level token texts never hold a real space). */
        const char *sp = m.len > 1 ? memchr(m.ptr + 1, ' ', m.len - 1) : NULL;
        if (!sp) {
            errf(err, errlen, "%s: tokenizer merge %llu ('%.*s') is not \"left right\"", f->path,
                    (unsigned long long)i, (int)(m.len > 64 ? 64 : m.len), m.ptr);
            rc = -1;
            break;
        }
        size_t ll = (size_t)(sp - m.ptr), rl = m.len - ll - 1;
        if (ll + rl > joined_cap) {
            free(joined);
            joined_cap = (ll + rl) * 2 + 16;
            joined = malloc(joined_cap);
            if (!joined) {
                errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
                rc = -1;
                break;
            }
        }
        memcpy(joined, m.ptr, ll);
        memcpy(joined + ll, sp + 1, rl);
        int32_t a = text_lookup(t, m.ptr, ll), b = text_lookup(t, sp + 1, rl);
        int32_t r = text_lookup(t, joined, ll + rl);
        if (a < 0 || b < 0 || r < 0) {
            errf(err, errlen, "%s: tokenizer merge %llu ('%.*s') uses a token missing from the "
                    "vocabulary", f->path, (unsigned long long)i, (int)(m.len > 64 ? 64 : m.len), m.ptr);
            rc = -1;
            break;
        }
        merge_insert(t, a, b, (int32_t)i, r);
    }
    free(joined);
    return rc;
}

/* Sort key of a special token: scans try, per first byte, the longest text
 * first; ties go to the lower id so the order is deterministic. */
struct special_key {
    uint8_t first;
    uint32_t len;
    int32_t id;
};

static int cmp_special(const void *pa, const void *pb) {
    const struct special_key *a = pa, *b = pb;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static int load_specials(struct ebb_tokenizer *t, const struct gguf_file *f, char *err, size_t errlen) {
    int n = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (is_special_type(t->type[i]) && t->text_len[i] > 0) n++;
    struct special_key *keys = malloc((size_t)(n ? n : 1) * sizeof *keys);
    t->specials = malloc((size_t)(n ? n : 1) * sizeof *t->specials);
    if (!keys || !t->specials) {
        free(keys);
        errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
        return -1;
    }
    n = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (is_special_type(t->type[i]) && t->text_len[i] > 0)
            keys[n++] = (struct special_key){(uint8_t)t->texts[t->text_off[i]], t->text_len[i], i};
    qsort(keys, (size_t)n, sizeof *keys, cmp_special);
    for (int k = 0; k < n; k++) t->specials[k] = keys[k].id;
    t->n_specials = n;
    int k = 0;
    for (int b = 0; b < 256; b++) {
        while (k < n && keys[k].first < b) k++;
        t->special_start[b] = k;
    }
    t->special_start[256] = n;
    free(keys);
    return 0;
}

static int load_pre(struct ebb_tokenizer *t, const struct gguf_file *f, char *err, size_t errlen) {
    struct gguf_str pre = {"default", 7};
    if (gguf_find(f, "tokenizer.ggml.pre") && gguf_get_str(f, "tokenizer.ggml.pre", &pre)) {
        errf(err, errlen, "%s: tokenizer.ggml.pre is not a string", f->path);
        return -1;
    }
    const struct pre_def *def = NULL;
    for (size_t i = 0; !def && i < sizeof PRE_DEFS / sizeof PRE_DEFS[0]; i++)
        for (int k = 0; PRE_DEFS[i].names[k]; k++)
            if (gguf_str_eq(pre, PRE_DEFS[i].names[k])) { def = &PRE_DEFS[i]; break; }
    if (!def) {
        char known[256];
        size_t at = 0;
        for (size_t i = 0; i < sizeof PRE_DEFS / sizeof PRE_DEFS[0]; i++)
            for (int k = 0; PRE_DEFS[i].names[k] && at < sizeof known; k++)
                at += (size_t)snprintf(known + at, sizeof known - at, "%s%s", at ? ", " : "",
                                       PRE_DEFS[i].names[k]);
        errf(err, errlen, "%s: unsupported pre-tokenizer '%.*s' (tokenizer.ggml.pre); supported: %s",
                f->path, (int)(pre.len > 64 ? 64 : pre.len), pre.ptr, known);
        return -1;
    }
    for (int k = 0; k < MAX_PRE_REGEX && def->regex[k]; k++) {
        int ecode;
        PCRE2_SIZE eoff;
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)def->regex[k], PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP, &ecode, &eoff, NULL);
        if (!re) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ecode, msg, sizeof msg);
            errf(err, errlen, "%s: pre-tokenizer expression failed to compile at %zu: %s",
                    f->path, (size_t)eoff, (const char *)msg);
            return -1;
        }
        t->re[t->n_re++] = re;
        /* JIT is an optimisation only: without it pcre2_match interprets. */
        (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    }
    return 0;
}

static int get_token_id(const struct ebb_tokenizer *t, const struct gguf_file *f, const char *key,
                        int32_t *out, char *err, size_t errlen) {
    *out = -1;
    if (!gguf_find(f, key)) return 0;
    uint32_t v;
    if (gguf_get_u32(f, key, &v) || v >= (uint32_t)t->n_vocab) {
        errf(err, errlen, "%s: %s is not a token id below %d", f->path, key, t->n_vocab);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

static int find_default_system(const char *tpl, size_t n, char **out);

struct ebb_tokenizer *tokenizer_load(const struct gguf_file *f, char *err, size_t errlen) {
    struct gguf_str model;
    if (gguf_get_str(f, "tokenizer.ggml.model", &model)) {
        errf(err, errlen, "%s: tokenizer.ggml.model is missing or not a string", f->path);
        return NULL;
    }
    if (!gguf_str_eq(model, "gpt2")) {
        errf(err, errlen, "%s: unsupported tokenizer model '%.*s' (only byte-level BPE, \"gpt2\", "
                "is supported)", f->path, (int)(model.len > 64 ? 64 : model.len), model.ptr);
        return NULL;
    }
    struct ebb_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
        return NULL;
    }
    if (load_tokens(t, f, err, errlen) || load_merges(t, f, err, errlen) ||
        load_specials(t, f, err, errlen) || load_pre(t, f, err, errlen) ||
        get_token_id(t, f, "tokenizer.ggml.bos_token_id", &t->bos, err, errlen) ||
        get_token_id(t, f, "tokenizer.ggml.eos_token_id", &t->eos, err, errlen))
        goto fail;
    if (gguf_find(f, "tokenizer.ggml.add_bos_token") &&
        gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &t->add_bos)) {
        errf(err, errlen, "%s: tokenizer.ggml.add_bos_token is not a bool", f->path);
        goto fail;
    }
    struct gguf_str tpl;
    if (!gguf_get_str(f, "tokenizer.chat_template", &tpl) &&
        find_default_system(tpl.ptr, tpl.len, &t->default_system)) {
        errf(err, errlen, "%s: out of memory loading the tokenizer", f->path);
        goto fail;
    }
    return t;
fail:
    tokenizer_free(t);
    return NULL;
}

void tokenizer_free(struct ebb_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
    free(t->texts);
    free(t->pieces);
    free(t->text_off);
    free(t->text_len);
    free(t->piece_off);
    free(t->piece_len);
    free(t->type);
    free(t->text_slots);
    free(t->merges);
    free(t->specials);
    free(t->default_system);
    free(t);
}

int tokenizer_n_vocab(const struct ebb_tokenizer *t) { return t->n_vocab; }
int32_t tokenizer_bos(const struct ebb_tokenizer *t) { return t->bos; }
int32_t tokenizer_eos(const struct ebb_tokenizer *t) { return t->eos; }
int tokenizer_add_bos(const struct ebb_tokenizer *t) { return t->add_bos; }

int32_t tokenizer_bos_to_add(const struct ebb_tokenizer *t) { return t->add_bos && t->bos >= 0 ? t->bos : -1; }

int tokenizer_is_control(const struct ebb_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && t->type[id] == TOKEN_CONTROL;
}

/* The text is the token as the GGUF spells it ("Ġthe" for " the"). */
int32_t tokenizer_find(const struct ebb_tokenizer *t, const char *text) {
    return text_lookup(t, text, strlen(text));
}

size_t tokenizer_detok_buffer(const struct ebb_tokenizer *t) {
    /* A push can release held bytes, the piece, and replacement characters
     * for broken leftovers: 3 x the longest piece plus slack covers all. */
    return 3 * t->max_piece + 16;
}

const char *tokenizer_piece(const struct ebb_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = t->piece_len[id];
    return t->pieces + t->piece_off[id];
}

/* ---------------------------------------------------------------------------
 * Encoding.
 * ------------------------------------------------------------------------- */

struct symbol {
    int32_t id;      /* -1 once merged into its left neighbour */
    int32_t prev, next;
};

struct candidate {   /* a possible merge of symbol left with its right neighbour */
    int32_t rank, left, right;
    int32_t left_id, right_id;
};

/* Per-call scratch, so concurrent encodes share nothing mutable. */
struct encoder {
    const struct ebb_tokenizer *t;
    int32_t *ids;
    size_t n_ids, cap_ids;
    struct symbol *sym;
    struct candidate *heap;
    size_t cap_word, n_heap;
    pcre2_match_data *md[MAX_PRE_REGEX];
};

static int push_id(struct encoder *e, int32_t id) {
    if (e->n_ids == e->cap_ids) {
        size_t cap = e->cap_ids ? e->cap_ids * 2 : 64;
        int32_t *p = realloc(e->ids, cap * sizeof *p);
        if (!p) return -1;
        e->ids = p;
        e->cap_ids = cap;
    }
    e->ids[e->n_ids++] = id;
    return 0;
}

static int cand_less(const struct candidate *a, const struct candidate *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(struct encoder *e, struct candidate c) {
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_less(&c, &e->heap[parent])) break;
        e->heap[i] = e->heap[parent];
        i = parent;
    }
    e->heap[i] = c;
}

static struct candidate heap_pop(struct encoder *e) {
    struct candidate top = e->heap[0], last = e->heap[--e->n_heap];
    size_t i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && cand_less(&e->heap[c + 1], &e->heap[c])) c++;
        if (!cand_less(&e->heap[c], &last)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = last;
    return top;
}

static void consider_pair(struct encoder *e, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const struct merge_slot *m = merge_lookup(e->t, e->sym[left].id, e->sym[right].id);
    if (m) heap_push(e, (struct candidate){m->rank, left, right, e->sym[left].id, e->sym[right].id});
}

static int reserve_word(struct encoder *e, size_t n) {
    if (n <= e->cap_word) return 0;
    size_t cap = n < 256 ? 256 : n;
    struct symbol *s = realloc(e->sym, cap * sizeof *s);
    if (!s) return -1;
    e->sym = s;
    /* Each merge pushes at most two candidates after the n - 1 initial ones. */
    struct candidate *h = realloc(e->heap, 3 * cap * sizeof *h);
    if (!h) return -1;
    e->heap = h;
    e->cap_word = cap;
    return 0;
}

/* BPE over one pre-tokenized word: start from single bytes, apply the
 * lowest-ranked applicable merge (leftmost on ties) until none applies. */
static int bpe_word(struct encoder *e, const uint8_t *s, size_t n) {
    const struct ebb_tokenizer *t = e->t;
    if (n == 1) return t->byte_id[s[0]] >= 0 ? push_id(e, t->byte_id[s[0]]) : 0;
    if (n > INT32_MAX / 4 || reserve_word(e, n)) return -1;
    int32_t count = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) continue;   /* byte without a token: dropped, as llama.cpp does */
        e->sym[count] = (struct symbol){id, count - 1, count + 1};
        count++;
    }
    if (!count) return 0;
    e->sym[count - 1].next = -1;
    e->n_heap = 0;
    for (int32_t i = 0; i + 1 < count; i++) consider_pair(e, i, i + 1);
    while (e->n_heap) {
        struct candidate c = heap_pop(e);
        struct symbol *l = &e->sym[c.left], *r = &e->sym[c.right];
        if (l->id != c.left_id || l->next != c.right || r->id != c.right_id) continue;  /* stale */
        l->id = merge_lookup(t, c.left_id, c.right_id)->result;
        l->next = r->next;
        if (r->next >= 0) e->sym[r->next].prev = c.left;
        r->id = -1;
        consider_pair(e, l->prev, c.left);
        consider_pair(e, c.left, l->next);
    }
    for (int32_t i = 0; i >= 0; i = e->sym[i].next)
        if (push_id(e, e->sym[i].id)) return -1;
    return 0;
}

/* BPE over one pre-tokenized piece, in chunks of at most
 * TOKENIZER_MAX_PIECE bytes cut before a character (the contract is in
 * tokenizer.h). Why: the merge loop costs O(n log n) in the piece's length
 * with a heap of 3n candidates, so one 8 MiB word took 3 s and 600 MB of
 * scratch; chunked, the cost per byte and the scratch are bounded by the
 * cap, and ordinary text, whose pieces are words, never reaches it. */
static int bpe_piece(struct encoder *e, const uint8_t *s, size_t n) {
    while (n > TOKENIZER_MAX_PIECE) {
        size_t cut = TOKENIZER_MAX_PIECE;
        while ((s[cut] & 0xC0) == 0x80) cut--;   /* valid UTF-8: at most 3 steps back */
        if (bpe_word(e, s, cut)) return -1;
        s += cut;
        n -= cut;
    }
    return bpe_word(e, s, n);
}

/* Applies pre-tokenizer expression `level` to s and recurses on every match
 * and every gap between matches; below the last expression, runs BPE. */
static int split_words(struct encoder *e, int level, const char *s, size_t n) {
    if (n == 0) return 0;
    if (level == e->t->n_re) return bpe_piece(e, (const uint8_t *)s, n);
    pcre2_code *re = e->t->re[level];
    pcre2_match_data *md = e->md[level];
    size_t pos = 0, gap = 0;
    while (pos < n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)   /* the interpreter keeps its frames on the heap */
            rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms) {   /* empty match: step over one character and search on */
            size_t l = utf8_seq_len((const uint8_t *)s + ms, n - ms);
            pos = ms + (l ? l : 1);
            continue;
        }
        if (ms > gap && split_words(e, level + 1, s + gap, ms - gap)) return -1;
        if (split_words(e, level + 1, s + ms, me - ms)) return -1;
        gap = pos = me;
    }
    return split_words(e, level + 1, s + gap, n - gap);
}

/* Leftmost, then longest, special token starting at or after `from`. */
static int find_special(const struct ebb_tokenizer *t, const char *s, size_t n, size_t from,
                        size_t *at, int32_t *id) {
    for (size_t i = from; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        for (int k = t->special_start[b]; k < t->special_start[b + 1]; k++) {
            int32_t sid = t->specials[k];
            size_t l = t->text_len[sid];
            if (l <= n - i && !memcmp(s + i, t->texts + t->text_off[sid], l)) {
                *at = i;
                *id = sid;
                return 1;
            }
        }
    }
    return 0;
}

int tokenizer_encode(const struct ebb_tokenizer *t, const char *text, size_t len,
                     int parse_special, int32_t **ids) {
    *ids = NULL;
    if (len && !text) return -1;
    if (!utf8_valid((const uint8_t *)text, len)) return -1;
    struct encoder e = {.t = t};
    int rc = 0;
    for (int i = 0; i < t->n_re && !rc; i++) {
        e.md[i] = pcre2_match_data_create_from_pattern(t->re[i], NULL);
        if (!e.md[i]) rc = -1;
    }
    size_t pos = 0;
    while (!rc && pos < len) {
        size_t at = len;
        int32_t sid = -1;
        if (parse_special && t->n_specials) find_special(t, text, len, pos, &at, &sid);
        rc = split_words(&e, 0, text + pos, at - pos);
        if (!rc && sid >= 0) rc = push_id(&e, sid);
        pos = sid >= 0 ? at + t->text_len[sid] : len;
    }
    if (!rc && !e.ids) {   /* empty result: still hand back an array to free */
        e.ids = malloc(sizeof *e.ids);
        if (!e.ids) rc = -1;
    }
    for (int i = 0; i < t->n_re; i++) pcre2_match_data_free(e.md[i]);
    free(e.sym);
    free(e.heap);
    if (rc) {
        free(e.ids);
        return -1;
    }
    if (e.n_ids > INT32_MAX) {
        free(e.ids);
        return -1;
    }
    *ids = e.ids;
    return (int)e.n_ids;
}

int tokenizer_encode_with_bos(const struct ebb_tokenizer *t, const char *text, size_t len,
                              int parse_special, int add_bos, int32_t **ids) {
    int32_t *body = NULL;
    *ids = NULL;
    int n = tokenizer_encode(t, text, len, parse_special, &body);
    if (n < 0) return -1;
    const int32_t bos = add_bos ? tokenizer_bos_to_add(t) : -1;
    const int first = bos >= 0;
    *ids = malloc(((size_t)n + 1) * sizeof(int32_t));
    if (!*ids) {
        free(body);
        return -1;
    }
    if (first) (*ids)[0] = bos;
    if (n) memcpy(*ids + first, body, (size_t)n * sizeof(int32_t));
    free(body);
    return n + first;
}

/* ---------------------------------------------------------------------------
 * Incremental detokenization. Bytes go through a small UTF-8 state machine:
 * a well-formed prefix of a character waits in pending; anything ill-formed
 * is replaced by U+FFFD, one per maximal ill-formed subpart (the Unicode
 * recommendation, and what Python's errors="replace" produces).
 * ------------------------------------------------------------------------- */

static const char REPLACEMENT[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Where detokenized text goes. Once something does not fit, everything after
 * it is dropped too, so the output is a prefix of the text that always ends
 * on a character boundary. */
struct sink {
    char *out;
    size_t cap, w;
    int full;
};

static void put(struct sink *k, const char *s, size_t n) {
    if (k->full || k->w + n > k->cap) {
        k->full = 1;
        return;
    }
    memcpy(k->out + k->w, s, n);
    k->w += n;
}

static void detok_byte(struct detok *d, uint8_t b, struct sink *k) {
    for (;;) {
        if (d->n_pending == 0) {
            uint8_t lo, hi;
            if (b < 0x80) put(k, (const char *)&b, 1);
            else if (utf8_lead(b, &lo, &hi)) d->pending[d->n_pending++] = (char)b;
            else put(k, REPLACEMENT, 3);
            return;
        }
        uint8_t lo, hi;
        int need = utf8_lead((uint8_t)d->pending[0], &lo, &hi);
        if (d->n_pending > 1) { lo = 0x80; hi = 0xBF; }
        if (b >= lo && b <= hi) {
            d->pending[d->n_pending++] = (char)b;
            if (d->n_pending == need) {
                put(k, d->pending, (size_t)need);
                d->n_pending = 0;
            }
            return;
        }
        /* The held prefix cannot be completed: replace it, then start over
         * with this byte. */
        put(k, REPLACEMENT, 3);
        d->n_pending = 0;
    }
}

void detok_init(struct detok *d, const struct ebb_tokenizer *t) {
    d->tok = t;
    d->n_pending = 0;
}

size_t detok_push(struct detok *d, int32_t id, char *out, size_t cap) {
    size_t len;
    const char *p = tokenizer_piece(d->tok, id, &len);
    struct sink k = {out, cap, 0, 0};
    for (size_t i = 0; p && i < len; i++) detok_byte(d, (uint8_t)p[i], &k);
    return k.w;
}

size_t detok_flush(struct detok *d, char *out, size_t cap) {
    struct sink k = {out, cap, 0, 0};
    if (d->n_pending) put(&k, REPLACEMENT, 3);
    d->n_pending = 0;
    return k.w;
}

/* ---------------------------------------------------------------------------
 * Chat rendering (ChatML).
 *
 * Templates are Jinja; ebb does not run Jinja. Every template we serve is
 * ChatML, and the one thing that varies is a default system message the
 * template inserts when the conversation has none. Such a template carries it
 * as a string literal '<|im_start|>system\n...<|im_end|>' (SmolLM, Qwen2), so
 * the text is lifted from the first literal of that shape; a template without
 * one gets no default. A model without an <|im_start|> token still gets ChatML
 * text: it is then tokenized as ordinary text.
 * ------------------------------------------------------------------------- */

/* *out gets the text or NULL when the template has none; -1 only when out of
 * memory. */
static int find_default_system(const char *tpl, size_t n, char **out) {
    *out = NULL;
    static const char opener[] = "<|im_start|>system", closer[] = "<|im_end|>";
    const size_t lo = sizeof opener - 1, lc = sizeof closer - 1;
    for (size_t i = 1; i + lo <= n; i++) {
        if (memcmp(tpl + i, opener, lo)) continue;
        char quote = tpl[i - 1];
        if (quote != '\'' && quote != '"') continue;   /* not the start of a literal */
        size_t j = i + lo;
        if (j < n && tpl[j] == '\n') j++;
        else if (j + 1 < n && tpl[j] == '\\' && tpl[j + 1] == 'n') j += 2;
        else continue;
        /* The literal must reach <|im_end|> before it closes. */
        size_t k = j;
        int found = 0;
        while (k < n) {
            if (k + lc <= n && !memcmp(tpl + k, closer, lc)) { found = 1; break; }
            if (tpl[k] == quote) break;
            k += tpl[k] == '\\' && k + 1 < n ? 2 : 1;
        }
        if (!found || k == j) continue;
        char *s = malloc(k - j + 1);
        if (!s) return -1;
        size_t o = 0;
        for (size_t p = j; p < k; p++) {
            char c = tpl[p];
            if (c == '\\' && p + 1 < k) {
                c = tpl[++p];
                if (c == 'n') c = '\n';
                else if (c == 't') c = '\t';
                else if (c == 'r') c = '\r';
            }
            s[o++] = c;
        }
        s[o] = 0;
        *out = s;
        return 0;
    }
    return 0;
}

static size_t add_str(char *dst, size_t at, const char *s) {
    size_t l = strlen(s);
    if (dst) memcpy(dst + at, s, l);
    return at + l;
}

/* One pass to measure (dst NULL), one to write. */
static size_t render(const struct ebb_tokenizer *t, const struct chat_msg *msgs, int n,
                     int add_assistant, char *dst) {
    size_t at = 0;
    if (n > 0 && t->default_system && (!msgs[0].role || strcmp(msgs[0].role, "system"))) {
        at = add_str(dst, at, "<|im_start|>system\n");
        at = add_str(dst, at, t->default_system);
        at = add_str(dst, at, "<|im_end|>\n");
    }
    for (int i = 0; i < n; i++) {
        at = add_str(dst, at, "<|im_start|>");
        at = add_str(dst, at, msgs[i].role ? msgs[i].role : "");
        at = add_str(dst, at, "\n");
        at = add_str(dst, at, msgs[i].content ? msgs[i].content : "");
        at = add_str(dst, at, "<|im_end|>\n");
    }
    if (add_assistant) at = add_str(dst, at, "<|im_start|>assistant\n");
    return at;
}

char *chat_render(const struct ebb_tokenizer *t, const struct chat_msg *msgs, int n,
                  int add_assistant) {
    size_t len = render(t, msgs, n, add_assistant, NULL);
    char *s = malloc(len + 1);
    if (!s) return NULL;
    render(t, msgs, n, add_assistant, s);
    s[len] = 0;
    return s;
}
