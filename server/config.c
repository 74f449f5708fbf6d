/* Configuration loading; see config.h for the layering and docs/operations.md
 * for what each setting means.
 *
 * The table `fields` is the single source of truth. Each row names a struct
 * member by offset and size and gives its type, allowed range and default
 * written as text; defaults are applied by parsing that text with the same
 * code that parses environment values and flags, so a default can never be
 * something the parser would refuse.
 *
 * model_kv_bits is a string with a grammar of its own (FIELD_KV_MAP): it is
 * validated as a whole before it is stored, so a refused value leaves the old
 * one, and config_kv_bits_for can then walk it without error paths. The bit
 * widths it allows are the kv_bits row's choices, so the two cannot drift.
 */
#include "server/config.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "engine/compress.h"
#include "engine/draft.h"
#include "engine/model.h"
#include "kernels/backend.h"
#include "storage/catalog.h"
#include "storage/error.h"

enum field_type {
    FIELD_STRING,  /* char array */
    FIELD_INT,     /* int, in [min, max] */
    FIELD_U64,     /* uint64_t, in [min, max] */
    FIELD_CHOICE,  /* int, one of choices[] */
    FIELD_NAME,    /* int, the index of one of names[] */
    FIELD_KV_MAP,  /* char array: "NAME=BITS,..." with BITS one of kv_bits's choices */
};

struct field {
    const char *key;
    enum field_type type;
    size_t offset, size;
    long long min, max;
    int choices[5];            /* FIELD_CHOICE; 0 ends the list */
    const char *const *names;  /* FIELD_NAME; NULL ends the list */
    const char *def;           /* default, as text */
    const char *metavar;       /* for --help */
    const char *doc;           /* one line, for --help */
};

#define AT(member) offsetof(struct ebb_config, member), sizeof(((struct ebb_config *)0)->member)

/* In enum order: the stored int is the index. */
static const char *const level_names[] = {"error", "warn", "info", "debug", NULL};
static const char *const weights_names[] = {[MODEL_WEIGHTS_NATIVE] = "native", [MODEL_WEIGHTS_F32] = "f32", NULL};
static const char *const budget_mode_names[] = {"fixed", "auto", NULL};
/* A boolean setting: JSON true/false, or these words in the environment and flags. */
static const char *const bool_names[] = {"false", "true", NULL};
static const char *const draft_names[] = {[DRAFT_NONE] = "none", [DRAFT_NGRAM] = "ngram", NULL};
static const char *const draft_policy_names[] = {[CONFIG_DRAFT_ADAPTIVE] = "adaptive",
                                                  [CONFIG_DRAFT_ALWAYS] = "always", NULL};
static const char *const verify_names[] = {[CATALOG_CHECK_SHA256] = "sha256", [CATALOG_CHECK_STAT] = "stat", NULL};

static const struct field fields[] = {
    {"host", FIELD_STRING, AT(host), 1, 0, {0}, NULL, "127.0.0.1", "ADDR", "listen address (IPv4 or IPv6)"},
    {"port", FIELD_INT, AT(port), 0, 65535, {0}, NULL, "8080", "N", "listen port (0: any free port)"},
    {"admin_token", FIELD_STRING, AT(admin_token), 0, 0, {0}, NULL, "", "TOKEN",
     "bearer token for /admin routes (empty: admin routes refused)"},
    {"api_keys", FIELD_STRING, AT(api_keys), 0, 0, {0}, NULL, "", "KEYS",
     "comma-separated keys the API routes require as 'Authorization: Bearer KEY' (empty: none)"},
    {"api_key_file", FIELD_STRING, AT(api_key_file), 0, 0, {0}, NULL, "", "PATH",
     "a file of API keys, one per line, '#' comments, read at start (empty: none)"},
    {"insecure_no_auth", FIELD_NAME, AT(insecure_no_auth), 0, 0, {0}, bool_names, "false", "[BOOL]",
     "serve the API on a non-loopback address without API keys (otherwise refused at start)"},
    {"cors_origins", FIELD_STRING, AT(cors_origins), 0, 0, {0}, NULL, "", "ORIGINS",
     "comma-separated origins browsers may call the API from (https://app.example), * for any (empty: none)"},
    {"catalog", FIELD_STRING, AT(catalog), 0, 0, {0}, NULL, "", "PATH",
     "catalog database (empty: $XDG_DATA_HOME/ebb/catalog.db)"},
    {"default_model", FIELD_STRING, AT(default_model), 0, 0, {0}, NULL, "SmolLM2-135M-Instruct.Q4_1", "NAME",
     "model loaded at start and used when a request names none (empty: first in the catalog)"},
    {"default_model_path", FIELD_STRING, AT(default_model_path), 0, 0, {0}, NULL,
     "models/SmolLM2-135M-Instruct.Q4_1.gguf", "PATH",
     "GGUF registered as default_model when the catalog is empty (empty: none)"},
    {"threads", FIELD_INT, AT(threads), 0, 1024, {0}, NULL, "0", "N", "compute threads (0: one per CPU)"},
    {"memory_budget_bytes", FIELD_U64, AT(memory_budget_bytes), 0, INT64_MAX, {0}, NULL, "0", "BYTES",
     "memory budget for weights and KV cache (0: no budget)"},
    {"memory_budget_mode", FIELD_NAME, AT(memory_budget_mode), 0, 0, {0}, budget_mode_names, "fixed", "MODE",
     "fixed (memory_budget_bytes) or auto (the free memory, cgroup v2 or MemAvailable, less memory_reserve_bytes)"},
    {"memory_reserve_bytes", FIELD_U64, AT(memory_reserve_bytes), 0, INT64_MAX, {0}, NULL, "536870912", "BYTES",
     "auto budget: memory left to the rest of the machine"},
    {"max_body_bytes", FIELD_U64, AT(max_body_bytes), 1024, 1LL << 32, {0}, NULL, "8388608", "BYTES",
     "largest request body accepted (larger: 413)"},
    {"max_header_bytes", FIELD_INT, AT(max_header_bytes), 256, 1 << 20, {0}, NULL, "16384", "BYTES",
     "largest request line plus headers (larger: 431)"},
    {"max_connections", FIELD_INT, AT(max_connections), 1, 1000000, {0}, NULL, "1024", "N",
     "open client connections at most (more: 503 and closed)"},
    {"header_timeout_ms", FIELD_INT, AT(header_timeout_ms), 1, 3600000, {0}, NULL, "10000", "MS",
     "time allowed to send a request's headers"},
    {"idle_timeout_ms", FIELD_INT, AT(idle_timeout_ms), 1, 86400000, {0}, NULL, "30000", "MS",
     "keep-alive idle and request-body inactivity limit"},
    {"request_timeout_ms", FIELD_INT, AT(request_timeout_ms), 1, 86400000, {0}, NULL, "60000", "MS",
     "time allowed to send a whole request, headers and body (slower: 408)"},
    {"queue_length", FIELD_INT, AT(queue_length), 0, 1000000, {0}, NULL, "64", "N",
     "requests that may wait for a slot (more: 429)"},
    {"max_running", FIELD_INT, AT(max_running), 1, 4096, {0}, NULL, "16", "N", "sequences decoded together"},
    {"max_context", FIELD_INT, AT(max_context), 0, 1 << 24, {0}, NULL, "0", "N",
     "tokens per sequence, prompt included (0: the model's own)"},
    {"kv_bits", FIELD_CHOICE, AT(kv_bits), 0, 0, {32, 16, 8, 4, 0}, NULL, "32", "BITS",
     "KV cache precision: 32, 16, 8 or 4"},
    {"model_kv_bits", FIELD_KV_MAP, AT(model_kv_bits), 0, 0, {0}, NULL, "", "NAME=BITS,...",
     "kv_bits for particular models, overriding kv_bits (empty: none)"},
    {"weights", FIELD_NAME, AT(weights), 0, 0, {0}, weights_names, "native", "FORM",
     "plain GGUF weights computed in their own types (native) or dequantized to float32 (f32)"},
    {"device", FIELD_STRING, AT(device), 1, 0, {0}, NULL, "cpu", "DEVICE",
     "where models compute: cpu, or cuda[:N] (an NVIDIA GPU holding the weights and KV caches)"},
    {"verify_models", FIELD_NAME, AT(verify_models), 0, 0, {0}, verify_names, "sha256", "HOW",
     "before loading a model, compare its file with the catalog by sha256 or by size and time (stat)"},
    {"shutdown_timeout_ms", FIELD_INT, AT(shutdown_timeout_ms), 0, 3600000, {0}, NULL, "10000", "MS",
     "on SIGTERM/SIGINT, how long running requests may finish"},
    {"log_level", FIELD_NAME, AT(log_level), 0, 0, {0}, level_names, "info", "LEVEL", "error, warn, info or debug"},
    {"speculative", FIELD_NAME, AT(speculative), 0, 0, {0}, draft_names, "ngram", "SOURCE",
     "speculative decoding for requests that do not say: ngram (drafts where they measure to pay) or none"},
    {"draft_policy", FIELD_NAME, AT(draft_policy), 0, 0, {0}, draft_policy_names, "adaptive", "POLICY",
     "adaptive (verify drafts while step times and acceptance say they pay) or always (every draft found)"},
    {"context_compression", FIELD_NAME, AT(context_compression), 0, 0, {0}, compress_mode_names, "off", "MODE",
     "after a long prompt's prefill, keep its most attended tokens and demote the rest to 2 bits (demote), "
     "evict them (drop), or neither (off), for requests that do not say"},
    {"compression_budget_percent", FIELD_INT, AT(compression_budget_percent), 0, 100, {0}, NULL, "25", "PCT",
     "share of a compressed prompt kept at the KV cache's precision"},
    {"compression_min_prompt", FIELD_INT, AT(compression_min_prompt), 0, 1 << 24, {0}, NULL, "1024", "N",
     "prompts shorter than this are not compressed"},
    {"compression_lookahead", FIELD_INT, AT(compression_lookahead), 0, COMPRESS_MAX_LOOKAHEAD, {0}, NULL, "32",
     "TOKENS", "tokens decoded greedily past a compressed prompt whose queries also score its tokens, then forgotten"},
    {"compression_select", FIELD_NAME, AT(compression_select), 0, 0, {0}, compress_select_names, "snapkv", "SCORING",
     "how a compressed prompt's tokens are ranked for requests that do not say: snapkv (the attention of its last "
     "tokens and the lookahead's), reconstruct (also while the model repeats the prompt: for contexts compressed "
     "before their question is known; about 0.4 of a prefill more), snapkv_head, random or recent"},
    {"prompt_cache_bytes", FIELD_U64, AT(prompt_cache_bytes), 0, INT64_MAX, {0}, NULL, "1073741824", "BYTES",
     "KV caches of finished requests kept per model, within its KV budget, for requests that start with the "
     "same tokens (a conversation's next turn); kept caches give way whenever memory is wanted; 0: off"},
};
#define N_FIELDS ((int)(sizeof fields / sizeof fields[0]))
_Static_assert(sizeof fields / sizeof fields[0] == CONFIG_N_FIELDS, "CONFIG_N_FIELDS matches the table");

static void *field_ptr(struct ebb_config *cfg, const struct field *f) { return (char *)cfg + f->offset; }

static const struct field *find_key(const char *key) {
    for (int i = 0; i < N_FIELDS; i++)
        if (!strcmp(fields[i].key, key)) return &fields[i];
    return NULL;
}

/* "what is expected" for messages, e.g. "an integer in [1, 65535]". */
static void describe(const struct field *f, char *buf, size_t len) {
    switch (f->type) {
    case FIELD_STRING:
        snprintf(buf, len, "a string of at most %zu bytes", f->size - 1);
        break;
    case FIELD_INT:
    case FIELD_U64:
        snprintf(buf, len, "an integer in [%lld, %lld]", f->min, f->max);
        break;
    case FIELD_CHOICE: {
        int n = snprintf(buf, len, "one of");
        for (int i = 0; f->choices[i] && n > 0 && (size_t)n < len; i++)
            n += snprintf(buf + n, len - n, "%s %d", i ? "," : "", f->choices[i]);
        break;
    }
    case FIELD_NAME: {
        int n = snprintf(buf, len, "one of");
        for (int i = 0; f->names[i] && n > 0 && (size_t)n < len; i++)
            n += snprintf(buf + n, len - n, "%s \"%s\"", i ? "," : "", f->names[i]);
        break;
    }
    case FIELD_KV_MAP:
        snprintf(buf, len, "a string of comma-separated NAME=BITS pairs");
        break;
    }
}

/* Stores an integer after checking it against the field's range/choices.
 * `where` prefixes the message ("EBB_PORT", "conf.json: key 'port'"). */
static int store_int(struct ebb_config *cfg, const struct field *f, long long v, const char *where, char *err,
                     size_t errlen) {
    int ok;
    if (f->type == FIELD_CHOICE) {
        ok = 0;
        for (int i = 0; f->choices[i]; i++) ok |= f->choices[i] == v;
    } else {
        ok = v >= f->min && v <= f->max;
    }
    if (!ok) {
        char want[128];
        describe(f, want, sizeof want);
        errf(err, errlen, "%s: %lld is out of range: expected %s", where, v, want);
        return -1;
    }
    if (f->type == FIELD_U64) *(uint64_t *)field_ptr(cfg, f) = (uint64_t)v;
    else *(int *)field_ptr(cfg, f) = (int)v;
    return 0;
}

static int store_string(struct ebb_config *cfg, const struct field *f, const char *s, size_t len, const char *where,
                        char *err, size_t errlen) {
    if (len >= f->size) {
        errf(err, errlen, "%s: value is %zu bytes long; at most %zu allowed", where, len, f->size - 1);
        return -1;
    }
    if (memchr(s, 0, len)) {
        errf(err, errlen, "%s: value contains a NUL character", where);
        return -1;
    }
    if (len < (size_t)f->min) {
        errf(err, errlen, "%s: value must not be empty", where);
        return -1;
    }
    /* A string with a form of its own (the table's types say nothing more). */
    if (f->offset == offsetof(struct ebb_config, device)) {
        char value[sizeof cfg->device];
        snprintf(value, sizeof value, "%.*s", (int)len, s);
        const char *problem = ebb_device_name_problem(value);
        if (problem) {
            errf(err, errlen, "%s: '%s' is not a valid value: %s", where, value, problem);
            return -1;
        }
    }
    char *dst = field_ptr(cfg, f);
    memcpy(dst, s, len);
    dst[len] = 0;
    return 0;
}

static int store_name(struct ebb_config *cfg, const struct field *f, const char *s, const char *where, char *err,
                      size_t errlen) {
    for (int i = 0; f->names[i]; i++)
        if (!strcmp(s, f->names[i])) {
            *(int *)field_ptr(cfg, f) = i;
            return 0;
        }
    char want[128];
    describe(f, want, sizeof want);
    errf(err, errlen, "%s: '%s' is not a valid value: expected %s", where, s, want);
    return -1;
}

/* ---- model_kv_bits: "NAME=BITS,NAME=BITS" ----
 *
 * Entries are separated by commas; blanks around an entry, a name or a bit
 * width are ignored (model names cannot contain blanks, commas or '=', see
 * catalog_name_check, so nothing is ambiguous). The empty string has no
 * entries; any other value must have only well-formed ones: a trailing or
 * doubled comma is refused rather than guessed at. */

struct kv_entry {
    const char *text; int text_len;   /* the whole entry, trimmed, for messages */
    const char *name; int name_len;
    const char *bits; int bits_len;   /* bits is NULL when the entry has no '=' */
};

static int is_blank(char c) { return c == ' ' || c == '\t'; }

static void trim(const char **s, int *n) {
    while (*n > 0 && is_blank(**s)) (*s)++, (*n)--;
    while (*n > 0 && is_blank((*s)[*n - 1])) (*n)--;
}

/* Splits the next entry off [*cursor, end); 0 when there is none left. */
static int kv_next(const char **cursor, const char *end, struct kv_entry *e) {
    if (!*cursor) return 0;
    const char *s = *cursor, *comma = memchr(s, ',', (size_t)(end - s));
    const char *stop = comma ? comma : end;
    *cursor = comma ? comma + 1 : NULL;
    e->text = s;
    e->text_len = (int)(stop - s);
    trim(&e->text, &e->text_len);
    const char *eq = memchr(e->text, '=', (size_t)e->text_len);
    e->name = e->text;
    e->name_len = eq ? (int)(eq - e->text) : e->text_len;
    trim(&e->name, &e->name_len);
    e->bits = eq ? eq + 1 : NULL;
    e->bits_len = eq ? (int)(e->text + e->text_len - e->bits) : 0;
    if (e->bits) trim(&e->bits, &e->bits_len);
    return 1;
}

/* The entry's bit width if it is one of kv_bits's choices, else 0. */
static int kv_entry_bits(const struct kv_entry *e) {
    if (!e->bits || e->bits_len < 1 || e->bits_len > 3) return 0;
    int v = 0;
    for (int i = 0; i < e->bits_len; i++) {
        if (!isdigit((unsigned char)e->bits[i])) return 0;
        v = v * 10 + (e->bits[i] - '0');
    }
    const struct field *kv = find_key("kv_bits");
    for (int i = 0; kv->choices[i]; i++)
        if (kv->choices[i] == v) return v;
    return 0;
}

/* Checks a whole model_kv_bits value; 0, or -1 naming the first bad entry. */
static int kv_map_check(const char *s, size_t len, const char *where, char *err, size_t errlen) {
    if (len == 0) return 0;
    const char *end = s + len, *cursor = s;
    struct kv_entry e;
    while (kv_next(&cursor, end, &e)) {
        /* Messages quote the entry, cut to keep them readable. */
        int shown = e.text_len < 200 ? e.text_len : 200;
        const char *more = shown < e.text_len ? "..." : "";
        if (e.text_len == 0) {
            errf(err, errlen, "%s: empty entry (a doubled or trailing comma?): expected NAME=BITS pairs "
                 "separated by commas", where);
            return -1;
        }
        if (!e.bits) {
            errf(err, errlen, "%s: '%.*s%s': expected NAME=BITS", where, shown, e.text, more);
            return -1;
        }
        char name[CATALOG_NAME_MAX + 1], why[256];
        if (e.name_len > CATALOG_NAME_MAX) {
            errf(err, errlen, "%s: '%.*s%s': model name is %d bytes long; at most %d allowed", where, shown, e.text,
                 more, e.name_len, CATALOG_NAME_MAX);
            return -1;
        }
        memcpy(name, e.name, (size_t)e.name_len);
        name[e.name_len] = 0;
        if (catalog_name_check(name, why, sizeof why)) {
            errf(err, errlen, "%s: '%.*s%s': %s", where, shown, e.text, more, why);
            return -1;
        }
        if (!kv_entry_bits(&e)) {
            char want[128];
            describe(find_key("kv_bits"), want, sizeof want);
            errf(err, errlen, "%s: '%.*s%s': bits must be %s", where, shown, e.text, more, want);
            return -1;
        }
        /* A name given twice is refused rather than resolved by order: the
         * two entries say different things, or one is a leftover. */
        const char *before = s;
        struct kv_entry prev;
        while (kv_next(&before, end, &prev) && prev.text != e.text)
            if (prev.name_len == e.name_len && !memcmp(prev.name, e.name, (size_t)e.name_len)) {
                errf(err, errlen, "%s: '%.*s%s': model '%s' is given more than once", where, shown, e.text, more,
                     name);
                return -1;
            }
    }
    return 0;
}

static int store_kv_map(struct ebb_config *cfg, const struct field *f, const char *s, size_t len, const char *where,
                        char *err, size_t errlen) {
    /* Length and NULs first: the checker reads exactly len bytes. */
    if (len >= f->size || memchr(s, 0, len)) return store_string(cfg, f, s, len, where, err, errlen);
    if (kv_map_check(s, len, where, err, errlen)) return -1;
    return store_string(cfg, f, s, len, where, err, errlen);
}

int config_kv_bits_for(const struct ebb_config *cfg, const char *model_name) {
    const char *s = cfg->model_kv_bits, *end = s + strlen(s), *cursor = *s ? s : NULL;
    size_t n = strlen(model_name);
    struct kv_entry e;
    while (kv_next(&cursor, end, &e)) {
        int bits = kv_entry_bits(&e);
        if (bits && (size_t)e.name_len == n && !memcmp(e.name, model_name, n)) return bits;
    }
    return cfg->kv_bits;
}

/* Parses a value given as text (defaults, environment, flags). */
static int set_from_text(struct ebb_config *cfg, const struct field *f, const char *text, const char *where,
                         char *err, size_t errlen) {
    if (f->type == FIELD_STRING) return store_string(cfg, f, text, strlen(text), where, err, errlen);
    if (f->type == FIELD_KV_MAP) return store_kv_map(cfg, f, text, strlen(text), where, err, errlen);
    if (f->type == FIELD_NAME) return store_name(cfg, f, text, where, err, errlen);
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || isspace((unsigned char)text[0])) {
        char want[128];
        describe(f, want, sizeof want);
        errf(err, errlen, "%s: '%s' is not a valid value: expected %s", where, text, want);
        return -1;
    }
    return store_int(cfg, f, v, where, err, errlen);
}

void config_defaults(struct ebb_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < N_FIELDS; i++) {
        char err[256];
        /* The defaults are constants checked by the unit tests; failing here
         * is a programming error. */
        if (set_from_text(cfg, &fields[i], fields[i].def, fields[i].key, err, sizeof err)) {
            fprintf(stderr, "config: bad built-in default: %s\n", err);
            abort();
        }
        cfg->source[i] = CONFIG_FROM_DEFAULT;
    }
}

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number with a fraction or exponent";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

static int set_from_json(struct ebb_config *cfg, const struct field *f, json_t *v, const char *where, char *err,
                         size_t errlen) {
    if (f->type == FIELD_NAME && f->names == bool_names && json_is_boolean(v))
        return store_name(cfg, f, json_is_true(v) ? "true" : "false", where, err, errlen);
    int want_string = f->type == FIELD_STRING || f->type == FIELD_NAME || f->type == FIELD_KV_MAP;
    if (want_string ? !json_is_string(v) : !json_is_integer(v)) {
        char want[128];
        describe(f, want, sizeof want);
        errf(err, errlen, "%s: expected %s, got %s", where, want, json_type_name(v));
        return -1;
    }
    if (f->type == FIELD_STRING) return store_string(cfg, f, json_string_value(v), json_string_length(v), where,
                                                      err, errlen);
    if (f->type == FIELD_KV_MAP) return store_kv_map(cfg, f, json_string_value(v), json_string_length(v), where,
                                                     err, errlen);
    if (f->type == FIELD_NAME) return store_name(cfg, f, json_string_value(v), where, err, errlen);
    return store_int(cfg, f, (long long)json_integer_value(v), where, err, errlen);
}

static int apply_object(struct ebb_config *cfg, json_t *root, const char *name, char *err, size_t errlen) {
    if (!json_is_object(root)) {
        errf(err, errlen, "%s: the configuration must be a JSON object, not %s", name, json_type_name(root));
        return -1;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        char where[320];
        snprintf(where, sizeof where, "%s: key '%.200s'", name, key);
        const struct field *f = find_key(key);
        if (!f) {
            errf(err, errlen, "%s: unknown key '%.200s' (see docs/operations.md for the settings)", name, key);
            return -1;
        }
        if (set_from_json(cfg, f, value, where, err, errlen)) return -1;
        cfg->source[f - fields] = CONFIG_FROM_FILE;
    }
    return 0;
}

static int apply_parsed(struct ebb_config *cfg, json_t *root, const json_error_t *jerr, const char *name, char *err,
                        size_t errlen) {
    if (!root) {
        /* jansson reports line/column of the offending character (1-based
         * lines); for I/O failures the line is -1 and the text says why. */
        if (jerr->line >= 1) errf(err, errlen, "%s:%d:%d: invalid JSON: %s", name, jerr->line, jerr->column,
                                  jerr->text);
        else errf(err, errlen, "%s: %s", name, jerr->text);
        return -1;
    }
    int rc = apply_object(cfg, root, name, err, errlen);
    json_decref(root);
    return rc;
}

int config_load_file(struct ebb_config *cfg, const char *path, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    return apply_parsed(cfg, root, &jerr, path, err, errlen);
}

int config_load_text(struct ebb_config *cfg, const char *json, const char *name, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    return apply_parsed(cfg, root, &jerr, name, err, errlen);
}

/* EBB_ + the key in upper case. */
static void env_name(const struct field *f, char *buf, size_t len) {
    int n = snprintf(buf, len, "EBB_");
    for (const char *k = f->key; *k && (size_t)n + 1 < len; k++) buf[n++] = (char)toupper((unsigned char)*k);
    buf[n] = 0;
}

int config_apply_env(struct ebb_config *cfg, char *err, size_t errlen) {
    for (int i = 0; i < N_FIELDS; i++) {
        char name[64];
        env_name(&fields[i], name, sizeof name);
        const char *value = getenv(name);
        if (!value) continue;
        char where[96];
        snprintf(where, sizeof where, "environment variable %s", name);
        if (set_from_text(cfg, &fields[i], value, where, err, errlen)) return -1;
        cfg->source[i] = CONFIG_FROM_ENV;
    }
    return 0;
}

int config_apply_flag(struct ebb_config *cfg, const char *name, const char *value, char *err, size_t errlen) {
    const char *bare = name;
    while (*bare == '-') bare++;
    char key[64];
    size_t n = strlen(bare);
    const struct field *f = NULL;
    if (n < sizeof key) {
        for (size_t i = 0; i <= n; i++) key[i] = bare[i] == '-' ? '_' : bare[i];
        f = find_key(key);
    }
    if (!f) {
        errf(err, errlen, "unknown option '%s'", name);
        return 1;
    }
    const int boolean = f->type == FIELD_NAME && f->names == bool_names;
    const int alone = boolean && (!value || (strcmp(value, "true") && strcmp(value, "false")));
    if (alone) value = "true";
    if (!value) {
        errf(err, errlen, "%s needs a value", name);
        return -1;
    }
    char where[96];
    snprintf(where, sizeof where, "option %s", name);
    if (set_from_text(cfg, f, value, where, err, errlen)) return -1;
    cfg->source[f - fields] = CONFIG_FROM_FLAG;
    return alone ? 2 : 0;
}

int config_load(struct ebb_config *cfg, const char *path, char *err, size_t errlen) {
    config_defaults(cfg);
    if (!path) {
        path = getenv("EBB_CONFIG");
        if (path && !*path) path = NULL;
    }
    if (path && config_load_file(cfg, path, err, errlen)) return -1;
    return config_apply_env(cfg, err, errlen);
}

int config_catalog_path(const struct ebb_config *cfg, char *buf, size_t len, char *err, size_t errlen) {
    if (cfg->catalog[0]) {
        if (strlen(cfg->catalog) >= len) {
            errf(err, errlen, "catalog path is too long");
            return -1;
        }
        strcpy(buf, cfg->catalog);
        return 0;
    }
    return catalog_default_path(buf, len, err, errlen) == CATALOG_OK ? 0 : -1;
}

int config_resolve_catalog(const char *config_path, const char *catalog_flag, char *buf, size_t len, char *err,
                           size_t errlen) {
    struct ebb_config *cfg = malloc(sizeof *cfg);   /* large: several path buffers */
    if (!cfg) return errf(err, errlen, "out of memory");
    int bad = config_load(cfg, config_path, err, errlen);
    if (!bad && catalog_flag) bad = config_apply_flag(cfg, "--catalog", catalog_flag, err, errlen);
    if (!bad) bad = config_catalog_path(cfg, buf, len, err, errlen);
    free(cfg);
    return bad ? -1 : 0;
}

const char *config_log_level_name(int level) {
    return level >= 0 && level < (int)(sizeof level_names / sizeof level_names[0]) - 1 ? level_names[level] : "?";
}

int config_source_of(const struct ebb_config *cfg, const char *key) {
    const struct field *f = find_key(key);
    return f ? cfg->source[f - fields] : -1;
}

const char *config_key(int i) { return i >= 0 && i < N_FIELDS ? fields[i].key : NULL; }

void config_dump(const struct ebb_config *cfg, FILE *out, int with_sources) {
    static const char *const source_names[] = {"default", "file", "env", "flag"};
    json_t *root = json_object();
    json_t *sources = with_sources ? json_object() : NULL;
    if (!root || (with_sources && !sources)) {
        json_decref(root);
        json_decref(sources);
        fprintf(out, "{}\n");
        return;
    }
    struct ebb_config *c = (struct ebb_config *)cfg; /* field_ptr is shared with the setters */
    for (int i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        json_t *v;
        if (f->type == FIELD_STRING || f->type == FIELD_KV_MAP) {
            const char *s = field_ptr(c, f);
            const int secret = f->offset == offsetof(struct ebb_config, admin_token) ||
                               f->offset == offsetof(struct ebb_config, api_keys);
            v = json_string(secret && *s ? "(set)" : s);
        } else if (f->type == FIELD_NAME && f->names == bool_names) {
            v = json_boolean(*(int *)field_ptr(c, f));
        } else if (f->type == FIELD_NAME) {
            v = json_string(f->names[*(int *)field_ptr(c, f)]);
        } else if (f->type == FIELD_U64) {
            v = json_integer((json_int_t) * (uint64_t *)field_ptr(c, f));
        } else {
            v = json_integer(*(int *)field_ptr(c, f));
        }
        json_object_set_new(root, f->key, v);
        if (sources) json_object_set_new(sources, f->key, json_string(source_names[cfg->source[i]]));
    }
    if (sources) json_object_set_new(root, "_sources", sources);
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    fprintf(out, "%s\n", text ? text : "{}");
    free(text);
    json_decref(root);
}

void config_flags_help(FILE *out) {
    for (int i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        char flag[64], env[64];
        int n = snprintf(flag, sizeof flag, "--");
        for (const char *k = f->key; *k && (size_t)n + 1 < sizeof flag; k++) flag[n++] = *k == '_' ? '-' : *k;
        flag[n] = 0;
        env_name(f, env, sizeof env);
        char left[96];
        snprintf(left, sizeof left, "%s %s", flag, f->metavar);
        fprintf(out, "  %-30s %s (%s, default \"%s\")\n", left, f->doc, env, f->def);
    }
}
