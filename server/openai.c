/* OpenAI-compatible request parsing and response building (see openai.h for
 * the policy).
 *
 * Parsing is table-driven: each route lists the top-level keys it accepts
 * and a function per key that checks and stores the value. Keys are visited
 * in body order (jansson keeps insertion order), so the first problem in the
 * body is the one reported, the same one every time. Rules that involve
 * several keys (a required field, stream_options without stream, best_of
 * against n) run after the walk.
 *
 * jansson does the byte-level checks while parsing: invalid UTF-8, a NUL in
 * a string or key (JSON_ALLOW_NUL is off), duplicate keys
 * (JSON_REJECT_DUPLICATES), nesting deeper than its 2048-level limit, and
 * integers beyond int64. Its error codes are mapped to messages a client can
 * act on. Everything copied out of the tree is therefore valid UTF-8 without
 * NULs, and the tree is freed before the parser returns.
 *
 * Responses are built as jansson trees and dumped compact. Text that reaches
 * JSON goes through json_text(), which replaces invalid UTF-8 with U+FFFD
 * instead of failing, because the engine's token bytes need not be whole
 * characters. Out of memory anywhere makes the builder return NULL.
 */
#include "server/openai.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/compress.h"
#include "engine/draft.h"
#include "engine/grammar.h"
#include "engine/utf8.h"
#include "server/json_schema.h"

/* ------------------------------------------------------------------ UTF-8 */

/* Characters in n bytes (bytes that do not continue a character): the unit
 * Python clients index text with, for text_offset. */
static size_t utf8_count_chars(const char *s, size_t n) {
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) chars += ((unsigned char)s[i] & 0xC0) != 0x80;
    return chars;
}

/* A JSON string for any bytes: invalid sequences become U+FFFD. */
static json_t *json_text(const char *s, size_t n) {
    if (utf8_valid(s, n)) return json_stringn_nocheck(s, n);
    char *fixed = malloc(n * 3 + 1);
    if (!fixed) return NULL;
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq_len(p + i, n - i);
        if (l) {
            memcpy(fixed + o, s + i, l);
            o += l;
            i += l;
        } else {
            memcpy(fixed + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += utf8_invalid_span(p + i, n - i);
        }
    }
    json_t *j = json_stringn_nocheck(fixed, o);
    free(fixed);
    return j;
}

/* ------------------------------------------------------------------ errors */

/* Replaces, in place, bytes that are not part of valid UTF-8 with '?', so a
 * message cut by snprintf in the middle of a character still encodes. */
static void utf8_repair(char *s) {
    size_t n = strlen(s);
    unsigned char *p = (unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq_len(p + i, n - i);
        if (l) i += l;
        else p[i++] = '?';
    }
}

void oai_error_set(struct oai_error *err, int status, const char *type, const char *param, const char *fmt, ...) {
    err->status = status;
    snprintf(err->type, sizeof err->type, "%s", type);
    snprintf(err->param, sizeof err->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    utf8_repair(err->param);
    utf8_repair(err->message);
}

#define BAD(p, param, ...) (oai_error_set((p)->err, 400, "invalid_request_error", (param), __VA_ARGS__), -1)
#define NOMEM(p) (oai_error_set((p)->err, 503, "server_error", NULL, "out of memory while reading the request"), -1)

/* "an integer", "true", "3.5"...: what a client sent, for messages. Long
 * strings are not echoed; the field name says where to look. */
static const char *describe(const json_t *v, char *buf, size_t n) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: snprintf(buf, n, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); return buf;
    case JSON_REAL: snprintf(buf, n, "%g", json_real_value(v)); return buf;
    case JSON_TRUE: return "true";
    case JSON_FALSE: return "false";
    default: return "null";
    }
}

/* ------------------------------------------------------------------ parsing */

enum {
    K_CMPL = 1 << OAI_COMPLETION, K_CHAT = 1 << OAI_CHAT, K_TOK = 1 << OAI_TOKENIZE, K_DETOK = 1 << OAI_DETOKENIZE,
    K_EMB = 1 << OAI_EMBEDDING
};

struct pctx {
    struct oai_request *r;
    struct oai_error *err;
    /* seen, for the checks across keys */
    bool has_prompt, has_messages, has_tokens, has_stream_options, has_add_special, has_top_logprobs;
    bool has_tool_choice;
    char named_tool[65];         /* tool_choice's function, resolved once tools are read */
    int64_t best_of;             /* 0: not given */
    int64_t max_tokens, max_completion_tokens;   /* 0: not given */
};

static const char *route_name(enum oai_kind k) {
    switch (k) {
    case OAI_COMPLETION: return "/v1/completions";
    case OAI_CHAT: return "/v1/chat/completions";
    case OAI_TOKENIZE: return "/tokenize";
    case OAI_EMBEDDING: return "/v1/embeddings";
    default: return "/detokenize";
    }
}

/* A whole number held by an integer, or by a real with no fraction (some
 * clients serialise every number as a float: 16.0). */
static bool as_int64(const json_t *v, int64_t *out) {
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == floor(d) && fabs(d) <= 9007199254740992.0) {   /* 2^53: exact in a double */
            *out = (int64_t)d;
            return true;
        }
    }
    return false;
}

/* An integer in [lo, hi]; `what` names the range in the message ("an
 * integer >= 1"). A value above a bound the message does not mention gets
 * its own message. */
static int want_int(struct pctx *p, const char *key, const json_t *v, int64_t lo, int64_t hi, const char *what,
                    int64_t *out) {
    char got[48];
    int64_t x;
    if (!as_int64(v, &x) || x < lo)
        return BAD(p, key, "'%s' must be %s, got %s", key, what, describe(v, got, sizeof got));
    if (x > hi) return BAD(p, key, "'%s' must be at most %" PRId64 ", got %" PRId64, key, hi, x);
    *out = x;
    return 0;
}

/* A number in [lo, hi], or (lo, hi] when lo_open; `what` names the range. */
static int want_number(struct pctx *p, const char *key, const json_t *v, double lo, bool lo_open, double hi,
                       const char *what, float *out) {
    char got[48];
    if (!json_is_number(v)) return BAD(p, key, "'%s' must be %s, got %s", key, what, describe(v, got, sizeof got));
    double x = json_number_value(v);
    if (x < lo || (lo_open && x == lo) || x > hi)
        return BAD(p, key, "'%s' must be %s, got %s", key, what, describe(v, got, sizeof got));
    *out = (float)x;
    return 0;
}

static int want_bool(struct pctx *p, const char *key, const json_t *v, bool *out) {
    char got[48];
    if (!json_is_boolean(v))
        return BAD(p, key, "'%s' must be a boolean (true or false), got %s", key, describe(v, got, sizeof got));
    *out = json_is_true(v);
    return 0;
}

static int want_string(struct pctx *p, const char *key, const json_t *v) {
    char got[48];
    if (!json_is_string(v)) return BAD(p, key, "'%s' must be a string, got %s", key, describe(v, got, sizeof got));
    return 0;
}

/* A field that must keep its default value, since it is not implemented. */
static int not_supported(struct pctx *p, const char *key, const char *why) {
    return BAD(p, key, "'%s' is not supported: %s", key, why);
}

/* A field's name for messages and `param` ("messages[3].content[0].type").
 * Truncation is acceptable here (oai_error_set repairs a cut character), so
 * this goes through vsnprintf, which the truncation warnings leave alone. */
static void field_name(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void field_name(char *buf, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
}

static char *dup_bytes(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* ---- per-field parsers: (context, key, non-null value) -> 0 or -1 ---- */

static int f_model(struct pctx *p, const char *key, json_t *v) {
    if (want_string(p, key, v)) return -1;
    size_t n = json_string_length(v);
    if (n > OAI_MAX_MODEL_NAME)
        return BAD(p, key, "'model' is too long: %zu bytes, at most %d are allowed", n, OAI_MAX_MODEL_NAME);
    memcpy(p->r->model, json_string_value(v), n + 1);
    return 0;
}

static int add_text_prompt(struct pctx *p, const json_t *s) {
    struct oai_prompt *pr = &p->r->prompts[p->r->n_prompts];
    pr->text_len = json_string_length(s);
    pr->text = dup_bytes(json_string_value(s), pr->text_len);
    if (!pr->text) return NOMEM(p);
    p->r->n_prompts++;
    return 0;
}

/* An array of token ids into a new prompt. *budget counts the ids left. */
static int add_token_prompt(struct pctx *p, const json_t *arr, const char *name, size_t *budget) {
    size_t n = json_array_size(arr);
    char param[64], got[48];
    if (n == 0) return BAD(p, name, "'%s' must not be an empty array of token ids", name);
    const char *field = oai_prompt_field(p->r->kind);
    if (n > *budget)
        return BAD(p, field, "'%s' has more than %d token ids in total; at most %d are allowed", field,
                   OAI_MAX_TOKEN_IDS, OAI_MAX_TOKEN_IDS);
    struct oai_prompt *pr = &p->r->prompts[p->r->n_prompts];
    pr->tokens = malloc(n * sizeof *pr->tokens);
    if (!pr->tokens) return NOMEM(p);
    p->r->n_prompts++;   /* owned by the request from here, freed with it */
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(arr, i);
        int64_t id;
        if (!as_int64(e, &id) || id < 0 || id > INT32_MAX) {
            field_name(param, sizeof param, "%s[%zu]", name, i);
            return BAD(p, param, "'%s' must be a token id (an integer between 0 and %d), got %s", param, INT32_MAX,
                       describe(e, got, sizeof got));
        }
        pr->tokens[i] = (int32_t)id;
    }
    pr->n_tokens = (int)n;
    *budget -= n;
    return 0;
}

static int alloc_prompts(struct pctx *p, size_t n) {
    p->r->prompts = calloc(n, sizeof *p->r->prompts);
    return p->r->prompts ? 0 : NOMEM(p);
}

static int f_prompt(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    p->has_prompt = true;
    if (json_is_string(v)) return alloc_prompts(p, 1) || add_text_prompt(p, v);
    const char *field = oai_prompt_field(p->r->kind);
    const char *shapes = p->r->kind == OAI_TOKENIZE
                             ? "a string"
                             : "a string, an array of strings, an array of token ids or an array of arrays of "
                               "token ids";
    if (!json_is_array(v) || p->r->kind == OAI_TOKENIZE)
        return BAD(p, key, "'%s' must be %s, got %s", field, shapes, describe(v, got, sizeof got));
    size_t n = json_array_size(v);
    if (n == 0) return BAD(p, key, "'%s' must not be an empty array", field);
    const json_t *first = json_array_get(v, 0);
    size_t budget = OAI_MAX_TOKEN_IDS;
    if (json_is_number(first)) return alloc_prompts(p, 1) || add_token_prompt(p, v, field, &budget);
    if (!json_is_string(first) && !json_is_array(first)) {
        field_name(param, sizeof param, "%s[0]", field);
        return BAD(p, param, "'%s' must be %s, got an array whose first element is %s", field, shapes,
                   describe(first, got, sizeof got));
    }
    if (n > OAI_MAX_PROMPTS)
        return BAD(p, key, "'%s' has %zu prompts; at most %d are allowed in one request", field, n, OAI_MAX_PROMPTS);
    if (alloc_prompts(p, n)) return -1;
    p->r->nested_token_prompts = json_is_array(first);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(v, i);
        field_name(param, sizeof param, "%s[%zu]", field, i);
        if (json_is_string(first)) {
            if (!json_is_string(e))
                return BAD(p, param, "'%s' must be a string like '%s[0]', got %s", param, field,
                           describe(e, got, sizeof got));
            if (add_text_prompt(p, e)) return -1;
        } else {
            if (!json_is_array(e))
                return BAD(p, param, "'%s' must be an array of token ids like '%s[0]', got %s", param, field,
                           describe(e, got, sizeof got));
            if (add_token_prompt(p, e, param, &budget)) return -1;
        }
    }
    return 0;
}

const char *oai_prompt_field(enum oai_kind kind) { return kind == OAI_EMBEDDING ? "input" : "prompt"; }

static int f_encoding_format(struct pctx *p, const char *key, json_t *v) {
    char got[48];
    if (json_is_string(v) && !strcmp(json_string_value(v), "float")) return 0;
    if (json_is_string(v) && !strcmp(json_string_value(v), "base64")) {
        p->r->base64 = true;
        return 0;
    }
    return BAD(p, key, "'encoding_format' must be \"float\" or \"base64\", got %s",
               json_is_string(v) ? "another string" : describe(v, got, sizeof got));
}

static int f_dimensions(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, 1, INT32_MAX, "an integer >= 1", &x)) return -1;
    p->r->dimensions = (int)x;   /* checked against the model's width by the route */
    return 0;
}

static int f_tokens(struct pctx *p, const char *key, json_t *v) {
    char got[48];
    size_t budget = OAI_MAX_TOKEN_IDS;
    p->has_tokens = true;
    if (!json_is_array(v))
        return BAD(p, key, "'tokens' must be an array of token ids, got %s", describe(v, got, sizeof got));
    if (alloc_prompts(p, 1)) return -1;
    if (json_array_size(v) == 0) {   /* detokenizing nothing gives "" */
        p->r->n_prompts = 1;
        return 0;
    }
    if (json_array_size(v) > budget)
        return BAD(p, key, "'tokens' has %zu token ids; at most %d are allowed", json_array_size(v), OAI_MAX_TOKEN_IDS);
    return add_token_prompt(p, v, "tokens", &budget);
}

static bool role_from_name(const char *s, enum oai_role *out) {
    static const struct { const char *name; enum oai_role role; } roles[] = {
        {"system", OAI_ROLE_SYSTEM}, {"developer", OAI_ROLE_SYSTEM}, {"user", OAI_ROLE_USER},
        {"assistant", OAI_ROLE_ASSISTANT}, {"tool", OAI_ROLE_TOOL},
    };
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (!strcmp(s, roles[i].name)) {
            *out = roles[i].role;
            return true;
        }
    return false;
}

/* One content part: {"type":"text","text":"..."}; returns its text. The
 * type is checked first, so an image part is refused for being an image,
 * not for its "image_url" key. */
static int content_part(struct pctx *p, const json_t *part, const char *where, const json_t **text) {
    char param[64], got[48];
    if (!json_is_object(part))
        return BAD(p, where, "'%s' must be an object like {\"type\": \"text\", \"text\": \"...\"}, got %s", where,
                   describe(part, got, sizeof got));
    const json_t *type = json_object_get(part, "type");
    field_name(param, sizeof param, "%s.type", where);
    if (!type) return BAD(p, param, "'%s' is required", param);
    if (want_string(p, param, type)) return -1;
    if (strcmp(json_string_value(type), "text"))
        return BAD(p, param, "content part type '%.40s' is not supported; only 'text' parts are",
                   json_string_value(type));
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)part, k, v) {
        if (strcmp(k, "type") && strcmp(k, "text")) {
            field_name(param, sizeof param, "%s.%s", where, k);
            return BAD(p, param, "unknown field '%s' in a content part", param);
        }
    }
    *text = json_object_get(part, "text");
    field_name(param, sizeof param, "%s.text", where);
    if (!*text) return BAD(p, param, "'%s' is required", param);
    if (want_string(p, param, *text)) return -1;
    return 0;
}

/* content: a string, or a non-empty array of text parts joined with "\n". */
static int message_content(struct pctx *p, struct oai_message *m, const json_t *c, const char *where) {
    char got[48], param[64];
    if (json_is_string(c)) {
        m->content_len = json_string_length(c);
        m->content = dup_bytes(json_string_value(c), m->content_len);
        return m->content ? 0 : NOMEM(p);
    }
    if (!json_is_array(c))
        return BAD(p, where, "'%s' must be a string or an array of content parts, got %s", where,
                   describe(c, got, sizeof got));
    size_t n = json_array_size(c);
    if (n == 0) return BAD(p, where, "'%s' must not be an empty array", where);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *text;
        field_name(param, sizeof param, "%s[%zu]", where, i);
        if (content_part(p, json_array_get(c, i), param, &text)) return -1;
        total += json_string_length(text) + (i > 0);
    }
    m->content = malloc(total + 1);
    if (!m->content) return NOMEM(p);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *text = json_object_get(json_array_get(c, i), "text");
        if (i > 0) m->content[o++] = '\n';
        memcpy(m->content + o, json_string_value(text), json_string_length(text));
        o += json_string_length(text);
    }
    m->content[o] = '\0';
    m->content_len = o;
    return 0;
}

/* An assistant message's tool_calls, appended to its content in the call
 * format (server/tools.h), so the history reads as the model would write it. */
static int message_tool_calls(struct pctx *p, struct oai_message *m, const json_t *calls, const char *where) {
    char param[128], got[48];
    field_name(param, sizeof param, "%s.tool_calls", where);
    if (m->role != OAI_ROLE_ASSISTANT) return BAD(p, param, "'%s' is only allowed on assistant messages", param);
    if (!json_is_array(calls)) return BAD(p, param, "'%s' must be an array, got %s", param, describe(calls, got, sizeof got));
    for (size_t i = 0; i < json_array_size(calls); i++) {
        const json_t *c = json_array_get(calls, i);
        const json_t *fn = json_is_object(c) ? json_object_get(c, "function") : NULL;
        const json_t *name = json_is_object(fn) ? json_object_get(fn, "name") : NULL;
        const json_t *args = json_is_object(fn) ? json_object_get(fn, "arguments") : NULL;
        field_name(param, sizeof param, "%s.tool_calls[%zu]", where, i);
        if (!json_is_string(name) || (args && !json_is_string(args)))
            return BAD(p, param, "'%s' must be {\"id\", \"type\": \"function\", \"function\": {\"name\": string, "
                                 "\"arguments\": string}}", param);
        char *call = tools_render_call(json_string_value(name), args ? json_string_value(args) : "{}");
        if (!call) return NOMEM(p);
        const size_t add = strlen(call) + (m->content_len ? 1 : 0);
        char *grown = realloc(m->content, m->content_len + add + 1);
        if (!grown) {
            free(call);
            return NOMEM(p);
        }
        m->content = grown;
        if (m->content_len) m->content[m->content_len++] = '\n';
        memcpy(m->content + m->content_len, call, strlen(call) + 1);
        m->content_len += strlen(call);
        free(call);
    }
    return 0;
}

static int one_message(struct pctx *p, struct oai_message *m, const json_t *obj, size_t idx) {
    char where[64], param[64], got[48];
    field_name(where, sizeof where, "messages[%zu]", idx);
    if (!json_is_object(obj))
        return BAD(p, where, "'%s' must be an object with 'role' and 'content', got %s", where,
                   describe(obj, got, sizeof got));
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v) {
        field_name(param, sizeof param, "%s.%s", where, k);
        if (!strcmp(k, "role") || !strcmp(k, "content")) continue;
        if (!strcmp(k, "name") || !strcmp(k, "tool_call_id")) {   /* accepted, not used by the template */
            if (!json_is_null(v) && want_string(p, param, v)) return -1;
            continue;
        }
        if (!strcmp(k, "tool_calls")) continue;   /* read below, once the role is known */
        if (!strcmp(k, "function_call") || !strcmp(k, "audio") || !strcmp(k, "refusal")) {
            if (json_is_null(v)) continue;
            return BAD(p, param, "'%s' is not supported: messages carry text and tool calls only", param);
        }
        return BAD(p, param, "unknown field '%s' in a message", param);
    }
    const json_t *role = json_object_get(obj, "role");
    field_name(param, sizeof param, "%s.role", where);
    if (!role || json_is_null(role)) return BAD(p, param, "'%s' is required", param);
    if (want_string(p, param, role)) return -1;
    if (!role_from_name(json_string_value(role), &m->role))
        return BAD(p, param, "'%s' must be one of 'system', 'developer', 'user', 'assistant', 'tool', got '%.32s'",
                   param, json_string_value(role));
    const json_t *content = json_object_get(obj, "content");
    field_name(param, sizeof param, "%s.content", where);
    if (!content || json_is_null(content)) {
        if (m->role != OAI_ROLE_ASSISTANT) return BAD(p, param, "'%s' is required", param);
        m->content = dup_bytes("", 0);   /* an assistant turn may be empty */
        if (!m->content) return NOMEM(p);
    } else if (message_content(p, m, content, param)) {
        return -1;
    }
    if (m->role == OAI_ROLE_TOOL) {   /* a result, in the tags the model was told about (server/tools.h) */
        char *wrapped = tools_render_response(m->content, m->content_len);
        if (!wrapped) return NOMEM(p);
        free(m->content);
        m->content = wrapped;
        m->content_len = strlen(wrapped);
    }
    const json_t *calls = json_object_get(obj, "tool_calls");
    return calls && !json_is_null(calls) ? message_tool_calls(p, m, calls, where) : 0;
}

static int f_messages(struct pctx *p, const char *key, json_t *v) {
    char got[48];
    p->has_messages = true;
    if (!json_is_array(v) || json_array_size(v) == 0)
        return BAD(p, key, "'messages' must be a non-empty array, got %s",
                   json_is_array(v) ? "an empty array" : describe(v, got, sizeof got));
    size_t n = json_array_size(v);
    if (n > OAI_MAX_MESSAGES)
        return BAD(p, key, "'messages' has %zu entries; at most %d are allowed", n, OAI_MAX_MESSAGES);
    p->r->messages = calloc(n, sizeof *p->r->messages);
    if (!p->r->messages) return NOMEM(p);
    for (size_t i = 0; i < n; i++) {
        p->r->n_messages = (int)i + 1;   /* so a failure frees what was copied */
        if (one_message(p, &p->r->messages[i], json_array_get(v, i), i)) return -1;
    }
    return 0;
}

static int f_max_tokens(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, 1, INT_MAX, "an integer >= 1", &x)) return -1;
    if (!strcmp(key, "max_tokens")) p->max_tokens = x;
    else p->max_completion_tokens = x;
    return 0;
}

static int f_temperature(struct pctx *p, const char *key, json_t *v) {
    return want_number(p, key, v, 0, false, 2, "a number between 0 and 2", &p->r->temperature);
}

static int f_top_p(struct pctx *p, const char *key, json_t *v) {
    return want_number(p, key, v, 0, true, 1, "a number > 0 and <= 1", &p->r->top_p);
}

static int f_min_p(struct pctx *p, const char *key, json_t *v) {
    return want_number(p, key, v, 0, false, 1, "a number between 0 and 1", &p->r->min_p);
}

static int f_repetition_penalty(struct pctx *p, const char *key, json_t *v) {
    return want_number(p, key, v, 0, true, 100, "a number > 0 and <= 100", &p->r->repetition_penalty);
}

static int f_top_k(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, -1, INT_MAX, "an integer >= -1 (-1 or 0: no top-k)", &x)) return -1;
    p->r->top_k = (int)x;
    return 0;
}

static int f_seed(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, INT64_MIN, INT64_MAX, "an integer", &x)) return -1;
    p->r->has_seed = true;
    p->r->seed = x;
    return 0;
}

/* ebb's extension: false (no drafts), true (n-gram drafts) or a source's
 * name. Drafts change speed only, never the text (engine/draft.h). */
static int f_speculative(struct pctx *p, const char *key, json_t *v) {
    char got[48];
    if (json_is_boolean(v)) {
        p->r->speculative = json_is_true(v) ? DRAFT_NGRAM : DRAFT_NONE;
        return 0;
    }
    const int source = json_is_string(v) ? draft_source_parse(json_string_value(v)) : -1;
    if (source < 0)
        return BAD(p, key, "'%s' must be true, false or a draft source (\"ngram\" or \"none\"), got %s", key,
                   describe(v, got, sizeof got));
    p->r->speculative = source;
    return 0;
}

/* ebb's extension: false (off), true (demote, the server's budget) or
 * {"mode": "demote"|"drop"|"off", "budget": share in [0, 1] or a token
 * count > 1, "low_budget": share demoted (the rest dropped), "select":
 * "snapkv"|"snapkv_head"|"reconstruct"|"random"|"recent", "key_bits": 2|4 (demoted keys), "min_prompt": N,
 * "lookahead": tokens 0-64}. */
static int f_context_compression(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    struct oai_request *r = p->r;
    if (json_is_boolean(v)) {
        r->compress_mode = json_is_true(v) ? COMPRESS_DEMOTE : COMPRESS_OFF;
        return 0;
    }
    if (!json_is_object(v))
        return BAD(p, key, "'%s' must be a boolean or an object (mode, budget, select, min_prompt), got %s", key,
                   describe(v, got, sizeof got));
    r->compress_mode = COMPRESS_DEMOTE;
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "%s.%s", key, k);
        if (!strcmp(k, "mode") || !strcmp(k, "select")) {
            const int mode = !strcmp(k, "mode");
            const int x = !json_is_string(e) ? -1
                          : mode             ? compress_mode_parse(json_string_value(e))
                                             : compress_select_parse(json_string_value(e));
            if (x < 0)
                return BAD(p, param, "'%s' must be %s, got %s", param,
                           mode ? "\"demote\", \"drop\" or \"off\"" : "\"snapkv\", \"snapkv_head\", \"reconstruct\", \"random\" or \"recent\"",
                           describe(e, got, sizeof got));
            if (mode) r->compress_mode = x;
            else r->compress_select = x;
        } else if (!strcmp(k, "budget")) {
            int64_t n;
            if (as_int64(e, &n) && n > 1) {
                if (n > INT_MAX) return BAD(p, param, "'%s' is too large: %" PRId64 " tokens", param, n);
                r->compress_tokens = (int)n;
            } else if (want_number(p, param, e, 0, false, 1,
                                   "a share of the prompt in [0, 1] or a whole number of tokens", &r->compress_budget)) {
                return -1;
            }
        } else if (!strcmp(k, "low_budget")) {
            if (want_number(p, param, e, 0, false, 1, "a share of the prompt in [0, 1]", &r->compress_low)) return -1;
        } else if (!strcmp(k, "key_bits")) {
            int64_t n;
            if (want_int(p, param, e, 2, 4, "2 or 4", &n) || (n == 3 && BAD(p, param, "'%s' must be 2 or 4, got 3", param)))
                return -1;
            r->compress_key_bits = (int)n;
        } else if (!strcmp(k, "min_prompt")) {
            int64_t n;
            if (want_int(p, param, e, 0, INT_MAX, "an integer >= 0", &n)) return -1;
            r->compress_min_prompt = (int)n;
        } else if (!strcmp(k, "lookahead")) {
            int64_t n;
            if (want_int(p, param, e, 0, COMPRESS_MAX_LOOKAHEAD, "an integer between 0 and 64", &n)) return -1;
            r->compress_lookahead = (int)n;
        } else {
            return BAD(p, param,
                       "unknown field '%s' (mode, budget, low_budget, select, key_bits, min_prompt and lookahead are)",
                       param);
        }
    }
    return 0;
}

static int f_n(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, 1, OAI_MAX_N, "an integer between 1 and 16", &x)) return -1;
    p->r->n = (int)x;
    return 0;
}

static int add_stop(struct pctx *p, const json_t *s, const char *param) {
    char got[48];
    if (!json_is_string(s)) return BAD(p, param, "'%s' must be a string, got %s", param, describe(s, got, sizeof got));
    size_t n = json_string_length(s);
    if (n == 0) return BAD(p, param, "'%s' must not be an empty string", param);
    if (n > OAI_MAX_STOP_BYTES)
        return BAD(p, param, "'%s' is %zu bytes long; stop strings are at most %d bytes", param, n, OAI_MAX_STOP_BYTES);
    char *d = dup_bytes(json_string_value(s), n);
    if (!d) return NOMEM(p);
    p->r->stops[p->r->n_stops++] = d;
    return 0;
}

static int f_stop(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_string(v) && !json_is_array(v))
        return BAD(p, key, "'stop' must be a string or an array of at most %d strings, got %s", OAI_MAX_STOPS,
                   describe(v, got, sizeof got));
    size_t n = json_is_string(v) ? 1 : json_array_size(v);
    if (n > OAI_MAX_STOPS)
        return BAD(p, key, "'stop' must be a string or an array of at most %d strings, got an array of %zu",
                   OAI_MAX_STOPS, n);
    if (n == 0) return 0;
    p->r->stops = calloc(n, sizeof *p->r->stops);
    if (!p->r->stops) return NOMEM(p);
    if (json_is_string(v)) return add_stop(p, v, "stop");
    for (size_t i = 0; i < n; i++) {
        field_name(param, sizeof param, "stop[%zu]", i);
        if (add_stop(p, json_array_get(v, i), param)) return -1;
    }
    return 0;
}

static int f_stream(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->stream);
}

static int f_stream_options(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_object(v))
        return BAD(p, key, "'stream_options' must be an object, got %s", describe(v, got, sizeof got));
    p->has_stream_options = true;
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "stream_options.%s", k);
        if (strcmp(k, "include_usage")) return BAD(p, param, "unknown field '%s'", param);
        if (!json_is_null(e) && want_bool(p, param, e, &p->r->include_usage)) return -1;
    }
    return 0;
}

static int f_logprobs(struct pctx *p, const char *key, json_t *v) {
    if (p->r->kind == OAI_CHAT) return want_bool(p, key, v, &p->r->logprobs);
    /* Completions: an integer, the alternatives wanted per token (0 still
     * returns the chosen token's logprob, as OpenAI's legacy API does). */
    int64_t x;
    if (want_int(p, key, v, 0, OAI_MAX_CMPL_LOGPROBS, "an integer between 0 and 5", &x)) return -1;
    p->r->logprobs = true;
    p->r->top_logprobs = (int)x;
    return 0;
}

static int f_top_logprobs(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, 0, OAI_MAX_TOP_LOGPROBS, "an integer between 0 and 20", &x)) return -1;
    p->r->top_logprobs = (int)x;
    p->has_top_logprobs = true;
    return 0;
}

static int f_echo(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->echo);
}

static int f_penalty(struct pctx *p, const char *key, json_t *v) {
    float *x = !strcmp(key, "presence_penalty") ? &p->r->presence_penalty : &p->r->frequency_penalty;
    return want_number(p, key, v, -2, false, 2, "a number between -2 and 2", x);
}

static int f_cache_prompt(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->cache_prompt);
}

static int f_ignore_eos(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->ignore_eos);
}

static int f_min_tokens(struct pctx *p, const char *key, json_t *v) {
    int64_t x;
    if (want_int(p, key, v, 0, INT32_MAX, "an integer >= 0", &x)) return -1;
    p->r->min_tokens = (int)x;
    return 0;
}

static int f_stop_token_ids(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_array(v))
        return BAD(p, key, "'stop_token_ids' must be an array of token ids, got %s", describe(v, got, sizeof got));
    const size_t n = json_array_size(v);
    if (n > OAI_MAX_STOP_IDS)
        return BAD(p, key, "'stop_token_ids' may hold at most %d ids, got %zu", OAI_MAX_STOP_IDS, n);
    if (n && !(p->r->stop_ids = malloc(n * sizeof *p->r->stop_ids))) return NOMEM(p);
    for (size_t i = 0; i < n; i++) {
        int64_t x;
        field_name(param, sizeof param, "stop_token_ids[%zu]", i);
        if (want_int(p, param, json_array_get(v, i), 0, INT32_MAX, "a token id (an integer >= 0)", &x)) return -1;
        p->r->stop_ids[p->r->n_stop_ids++] = (int32_t)x;
    }
    return 0;
}

static int f_best_of(struct pctx *p, const char *key, json_t *v) {
    return want_int(p, key, v, 1, OAI_MAX_N, "an integer between 1 and 16", &p->best_of);
}

static int f_suffix(struct pctx *p, const char *key, json_t *v) {
    if (want_string(p, key, v)) return -1;
    return json_string_length(v) ? not_supported(p, key, "insertion after a suffix is not implemented") : 0;
}

static int f_ignored_string(struct pctx *p, const char *key, json_t *v) {
    return want_string(p, key, v);
}

/* {"token id as a string": bias in [-100, 100]}, as OpenAI. */
static int f_logit_bias(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_object(v)) return BAD(p, key, "'logit_bias' must be an object, got %s", describe(v, got, sizeof got));
    const size_t n = json_object_size(v);
    if (n > OAI_MAX_LOGIT_BIAS)
        return BAD(p, key, "'logit_bias' may hold at most %d entries, got %zu", OAI_MAX_LOGIT_BIAS, n);
    if (n && !(p->r->logit_bias = malloc(n * sizeof *p->r->logit_bias))) return NOMEM(p);
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "logit_bias.%s", k);
        char *end;
        errno = 0;
        long long id = strtoll(k, &end, 10);
        if (!*k || *end || errno || id < 0 || id > INT32_MAX || !(k[0] >= '0' && k[0] <= '9'))
            return BAD(p, param, "'logit_bias' keys must be token ids written as decimal strings, got '%.40s'", k);
        float bias;
        if (want_number(p, param, e, -100, false, 100, "a number between -100 and 100", &bias)) return -1;
        p->r->logit_bias[p->r->n_logit_bias++] = (struct logit_bias){(int32_t)id, bias};
    }
    return 0;
}

static int f_metadata(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_object(v)) return BAD(p, key, "'metadata' must be an object, got %s", describe(v, got, sizeof got));
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "metadata.%s", k);
        if (want_string(p, param, e)) return -1;
    }
    return 0;
}

static int f_store(struct pctx *p, const char *key, json_t *v) {
    bool b;
    if (want_bool(p, key, v, &b)) return -1;
    return b ? not_supported(p, key, "completions are not stored (use false)") : 0;
}

/* Structured output: the grammar the request's text must follow, compiled
 * here so that a bad one is a 400 naming the field. */
static int set_grammar(struct pctx *p, const char *param, const char *gbnf) {
    if (p->r->grammar)
        return BAD(p, param, "give one of 'response_format' (json_object, json_schema) and 'grammar', not both");
    char err[256];
    p->r->grammar = grammar_parse(gbnf, strlen(gbnf), err, sizeof err);
    if (!p->r->grammar) return BAD(p, param, "'%s' is not a grammar this server can use: %s", param, err);
    return 0;
}

/* A function or schema name as OpenAI allows it: [a-zA-Z0-9_-]{1,64}. */
static bool valid_function_name(const json_t *v) {
    const char *n = json_is_string(v) ? json_string_value(v) : NULL;
    size_t len = n ? strlen(n) : 0;
    bool ok = len >= 1 && len <= 64;
    for (size_t i = 0; ok && i < len; i++) ok = isalnum((unsigned char)n[i]) || n[i] == '_' || n[i] == '-';
    return ok;
}

static int f_json_schema(struct pctx *p, json_t *v) {
    char got[48], param[320];
    if (!json_is_object(v))
        return BAD(p, "response_format.json_schema", "'response_format.json_schema' must be an object, got %s",
                   describe(v, got, sizeof got));
    const char *k;
    json_t *e, *schema = NULL;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "response_format.json_schema.%s", k);
        if (!strcmp(k, "name")) {
            if (!valid_function_name(e)) return BAD(p, param, "'%s' must be 1 to 64 letters, digits, '_' or '-'", param);
        } else if (!strcmp(k, "description")) {
            if (want_string(p, param, e)) return -1;
        } else if (!strcmp(k, "strict")) {
            bool strict;
            if (!json_is_null(e) && want_bool(p, param, e, &strict)) return -1;
        } else if (!strcmp(k, "schema")) {
            if (!json_is_object(e) && !json_is_boolean(e))
                return BAD(p, param, "'%s' must be a JSON Schema (an object), got %s", param,
                           describe(e, got, sizeof got));
            schema = e;
        } else {
            return BAD(p, param, "unknown field '%s'", param);
        }
    }
    /* No schema: any JSON value (OpenAI makes it optional). */
    json_t *any = schema ? NULL : json_object();
    char err[256], where[200];
    char *gbnf = json_schema_to_gbnf(schema ? schema : any, err, sizeof err, where, sizeof where);
    json_decref(any);
    if (!gbnf) {
        field_name(param, sizeof param, "response_format.json_schema.schema%s%s", *where ? "." : "", where);
        return BAD(p, param, "the schema cannot be used for structured output: %s", err);
    }
    int rc = set_grammar(p, "response_format", gbnf);
    free(gbnf);
    return rc;
}

static int f_response_format(struct pctx *p, const char *key, json_t *v) {
    char got[48], param[64];
    if (!json_is_object(v))
        return BAD(p, key, "'response_format' must be an object, got %s", describe(v, got, sizeof got));
    /* The type first: it says which other keys belong. */
    const json_t *type = json_object_get(v, "type");
    if (!type) return BAD(p, "response_format.type", "'response_format.type' is required");
    if (!json_is_string(type))
        return BAD(p, "response_format.type", "'response_format.type' must be a string, got %s",
                   describe(type, got, sizeof got));
    const char *t = json_string_value(type);
    const bool schema = !strcmp(t, "json_schema");
    if (strcmp(t, "text") && strcmp(t, "json_object") && !schema)
        return BAD(p, "response_format.type",
                   "'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", got '%.40s'", t);
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        field_name(param, sizeof param, "response_format.%s", k);
        if (strcmp(k, "type") && !(schema && !strcmp(k, "json_schema")))
            return BAD(p, param, "unknown field '%s'", param);
    }
    if (schema) {
        const json_t *js = json_object_get(v, "json_schema");
        if (!js) return BAD(p, "response_format.json_schema", "'response_format.json_schema' is required");
        return f_json_schema(p, (json_t *)js);
    }
    return strcmp(t, "json_object") ? 0 : set_grammar(p, "response_format", json_schema_any_object_gbnf());
}

/* ebb's extension (llama.cpp's name): GBNF text the output must follow. */
static int f_grammar(struct pctx *p, const char *key, json_t *v) {
    if (want_string(p, key, v)) return -1;
    return set_grammar(p, key, json_string_value(v));
}

static int one_tool(struct pctx *p, struct oai_tool *t, const json_t *v, size_t i) {
    char got[48], where[64], param[96];
    field_name(where, sizeof where, "tools[%zu]", i);
    if (!json_is_object(v)) return BAD(p, where, "'%s' must be an object, got %s", where, describe(v, got, sizeof got));
    const char *k;
    json_t *e, *fn = NULL;
    json_object_foreach((json_t *)v, k, e) {
        field_name(param, sizeof param, "%s.%s", where, k);
        if (!strcmp(k, "type")) {
            if (!json_is_string(e) || strcmp(json_string_value(e), "function"))
                return BAD(p, param, "'%s' must be \"function\" (the only kind of tool)", param);
        } else if (!strcmp(k, "function")) {
            fn = e;
        } else {
            return BAD(p, param, "unknown field '%s'", param);
        }
    }
    field_name(param, sizeof param, "%s.function", where);
    if (!fn) return BAD(p, param, "'%s' is required", param);
    if (!json_is_object(fn)) return BAD(p, param, "'%s' must be an object, got %s", param, describe(fn, got, sizeof got));
    json_t *name = NULL, *params = NULL;
    const char *desc = "";
    json_object_foreach(fn, k, e) {
        field_name(param, sizeof param, "%s.function.%s", where, k);
        if (!strcmp(k, "name")) {
            if (!valid_function_name(e)) return BAD(p, param, "'%s' must be 1 to 64 letters, digits, '_' or '-'", param);
            name = e;
        } else if (!strcmp(k, "description")) {
            if (!json_is_null(e) && want_string(p, param, e)) return -1;
            if (json_is_string(e)) desc = json_string_value(e);
        } else if (!strcmp(k, "parameters")) {
            if (!json_is_object(e) && !json_is_null(e))
                return BAD(p, param, "'%s' must be a JSON Schema (an object), got %s", param, describe(e, got, sizeof got));
            params = json_is_object(e) ? e : NULL;
        } else if (!strcmp(k, "strict")) {
            bool strict;
            if (!json_is_null(e) && want_bool(p, param, e, &strict)) return -1;
        } else {
            return BAD(p, param, "unknown field '%s'", param);
        }
    }
    field_name(param, sizeof param, "%s.function.name", where);
    if (!name) return BAD(p, param, "'%s' is required", param);
    for (int j = 0; j < p->r->n_tools; j++)
        if (!strcmp(p->r->tools[j].name, json_string_value(name)))
            return BAD(p, param, "'%s' repeats the name '%s'", param, json_string_value(name));
    t->name = strdup(json_string_value(name));
    t->description = strdup(desc);
    /* No parameters: a function of no arguments, {}. */
    t->parameters = params ? json_dumps(params, JSON_COMPACT | JSON_PRESERVE_ORDER)
                           : strdup("{\"type\":\"object\",\"properties\":{}}");
    return t->name && t->description && t->parameters ? 0 : NOMEM(p);
}

static int f_tools(struct pctx *p, const char *key, json_t *v) {
    char got[48];
    if (!json_is_array(v)) return BAD(p, key, "'tools' must be an array, got %s", describe(v, got, sizeof got));
    const size_t n = json_array_size(v);
    if (n > TOOLS_MAX) return BAD(p, key, "'tools' may hold at most %d tools, got %zu", TOOLS_MAX, n);
    if (n && !(p->r->tools = calloc(n, sizeof *p->r->tools))) return NOMEM(p);
    for (size_t i = 0; i < n; i++) {
        int rc = one_tool(p, &p->r->tools[i], json_array_get(v, i), i);
        p->r->n_tools++;   /* owned from here, even half filled */
        if (rc) return -1;
    }
    return 0;
}

static int f_tool_choice(struct pctx *p, const char *key, json_t *v) {
    char param[64];
    p->has_tool_choice = true;
    if (json_is_string(v)) {
        const char *c = json_string_value(v);
        if (!strcmp(c, "auto")) p->r->tool_choice = TOOL_CHOICE_AUTO;
        else if (!strcmp(c, "none")) p->r->tool_choice = TOOL_CHOICE_NONE;
        else if (!strcmp(c, "required")) p->r->tool_choice = TOOL_CHOICE_REQUIRED;
        else return BAD(p, key, "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}, got '%.40s'", c);
        return 0;
    }
    const json_t *fn = json_is_object(v) ? json_object_get(v, "function") : NULL;
    const json_t *type = json_is_object(v) ? json_object_get(v, "type") : NULL;
    if (!fn || !json_is_object(fn) || !type || !json_is_string(type) || strcmp(json_string_value(type), "function") ||
        json_object_size(v) != 2)
        return BAD(p, key, "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    field_name(param, sizeof param, "tool_choice.function.name");
    const json_t *name = json_object_get(fn, "name");
    if (!valid_function_name(name) || json_object_size(fn) != 1)
        return BAD(p, param, "'%s' must name one of the tools", param);
    snprintf(p->named_tool, sizeof p->named_tool, "%s", json_string_value(name));
    p->r->tool_choice = TOOL_CHOICE_NAMED;
    return 0;
}

static int f_parallel_tool_calls(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->parallel_tool_calls);
}

/* Once every key is read: the tool choice named, and the grammar of what
 * the model may write. */
static int check_tools(struct pctx *p) {
    struct oai_request *r = p->r;
    if (r->tool_choice == TOOL_CHOICE_NAMED || r->tool_choice == TOOL_CHOICE_REQUIRED) {
        if (!r->n_tools) return BAD(p, "tool_choice", "'tool_choice' asks for a tool call, and 'tools' is empty");
    }
    if (r->tool_choice == TOOL_CHOICE_NAMED) {
        r->tool_named = -1;
        for (int i = 0; i < r->n_tools; i++)
            if (!strcmp(r->tools[i].name, p->named_tool)) r->tool_named = i;
        if (r->tool_named < 0)
            return BAD(p, "tool_choice.function.name", "'tool_choice.function.name' is '%s', which is not in 'tools'",
                       p->named_tool);
    }
    if (!r->n_tools) return 0;
    if (r->grammar)
        return BAD(p, "tools", "give one of 'tools' and 'response_format' (json_object, json_schema) or 'grammar'");
    char err[256], path[256];
    char *gbnf = tools_gbnf(r->tools, r->n_tools, (enum tool_choice)r->tool_choice, r->tool_named,
                            r->parallel_tool_calls, err, sizeof err, path, sizeof path);
    if (!gbnf) return BAD(p, *path ? path : "tools", "the tool's parameters cannot be used: %s", err);
    int rc = set_grammar(p, "tools", gbnf);
    free(gbnf);
    return rc;
}

static int f_add_special_tokens(struct pctx *p, const char *key, json_t *v) {
    p->has_add_special = true;
    return want_bool(p, key, v, &p->r->add_special_tokens);
}

static int f_add_generation_prompt(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->add_generation_prompt);
}

static int f_return_token_strs(struct pctx *p, const char *key, json_t *v) {
    return want_bool(p, key, v, &p->r->return_token_strs);
}

struct field {
    const char *name;
    unsigned kinds;   /* K_* routes that accept it */
    int (*parse)(struct pctx *p, const char *key, json_t *v);
};

#define K_GEN (K_CMPL | K_CHAT)
static const struct field fields[] = {
    {"model", K_CMPL | K_CHAT | K_TOK | K_DETOK | K_EMB, f_model},
    {"prompt", K_CMPL | K_TOK, f_prompt},
    {"input", K_EMB, f_prompt},
    {"encoding_format", K_EMB, f_encoding_format},
    {"dimensions", K_EMB, f_dimensions},
    {"messages", K_CHAT | K_TOK, f_messages},
    {"tokens", K_DETOK, f_tokens},
    {"max_tokens", K_GEN, f_max_tokens},
    {"max_completion_tokens", K_CHAT, f_max_tokens},
    {"temperature", K_GEN, f_temperature},
    {"top_p", K_GEN, f_top_p},
    {"top_k", K_GEN, f_top_k},
    {"min_p", K_GEN, f_min_p},
    {"repetition_penalty", K_GEN, f_repetition_penalty},
    {"seed", K_GEN, f_seed},
    {"speculative", K_GEN, f_speculative},
    {"context_compression", K_GEN, f_context_compression},
    {"n", K_GEN, f_n},
    {"stop", K_GEN, f_stop},
    {"stream", K_GEN, f_stream},
    {"stream_options", K_GEN, f_stream_options},
    {"logprobs", K_GEN, f_logprobs},
    {"top_logprobs", K_CHAT, f_top_logprobs},
    {"echo", K_CMPL, f_echo},
    {"ignore_eos", K_GEN, f_ignore_eos},
    {"cache_prompt", K_GEN, f_cache_prompt},
    {"min_tokens", K_GEN, f_min_tokens},
    {"stop_token_ids", K_GEN, f_stop_token_ids},
    {"best_of", K_CMPL, f_best_of},
    {"suffix", K_CMPL, f_suffix},
    {"presence_penalty", K_GEN, f_penalty},
    {"frequency_penalty", K_GEN, f_penalty},
    {"user", K_GEN | K_EMB, f_ignored_string},
    {"logit_bias", K_GEN, f_logit_bias},
    {"response_format", K_GEN, f_response_format},
    {"grammar", K_GEN, f_grammar},
    {"parallel_tool_calls", K_CHAT, f_parallel_tool_calls},
    {"metadata", K_CHAT, f_metadata},
    {"store", K_CHAT, f_store},
    {"service_tier", K_CHAT, f_ignored_string},
    {"tools", K_CHAT, f_tools},
    {"tool_choice", K_CHAT, f_tool_choice},
    {"add_special_tokens", K_TOK, f_add_special_tokens},
    {"add_generation_prompt", K_TOK, f_add_generation_prompt},
    {"return_token_strs", K_TOK, f_return_token_strs},
};

static const struct field *find_field(const char *name) {
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (!strcmp(fields[i].name, name)) return &fields[i];
    return NULL;
}

/* jansson's parse error as a message a client can act on. */
static void json_load_error(struct oai_error *err, const json_error_t *je) {
    switch (json_error_code(je)) {
    case json_error_out_of_memory:
        oai_error_set(err, 503, "server_error", NULL, "out of memory while reading the request");
        break;
    case json_error_invalid_utf8:
        oai_error_set(err, 400, "invalid_request_error", NULL,
                      "request body is not valid UTF-8: %s at line %d column %d", je->text, je->line, je->column);
        break;
    case json_error_null_character:
    case json_error_null_byte_in_key:
        oai_error_set(err, 400, "invalid_request_error", NULL,
                      "request body has a NUL character (\\u0000) in a string, which is not accepted: "
                      "line %d column %d", je->line, je->column);
        break;
    default:
        oai_error_set(err, 400, "invalid_request_error", NULL,
                      "request body is not valid JSON: %s at line %d column %d", je->text, je->line, je->column);
    }
}

static void request_defaults(struct oai_request *r, enum oai_kind kind) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->max_tokens = kind == OAI_COMPLETION ? OAI_DEFAULT_MAX_TOKENS : kind == OAI_CHAT ? -1 : 0;
    r->temperature = 1.0f;
    r->top_p = 1.0f;
    r->repetition_penalty = 1.0f;
    r->speculative = -1;
    r->cache_prompt = true;
    r->compress_mode = r->compress_select = r->compress_tokens = r->compress_min_prompt = r->compress_key_bits =
        r->compress_lookahead = -1;
    r->compress_budget = r->compress_low = -1;
    r->n = 1;
    r->add_generation_prompt = true;
    r->parallel_tool_calls = true;   /* OpenAI's default */
    r->tool_named = -1;
}

/* Rules that involve several keys, once every key has been read. */
static int check_request(struct pctx *p) {
    struct oai_request *r = p->r;
    switch (r->kind) {
    case OAI_COMPLETION:
        if (!p->has_prompt) return BAD(p, "prompt", "'prompt' is required");
        if (p->best_of && p->best_of != r->n)
            return not_supported(p, "best_of", "it must equal 'n' (every generated choice is returned)");

        break;
    case OAI_CHAT:
        if (!p->has_messages) return BAD(p, "messages", "'messages' is required");
        if (p->has_top_logprobs && r->top_logprobs > 0 && !r->logprobs)
            return BAD(p, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        if (check_tools(p)) return -1;
        if (p->max_tokens && p->max_completion_tokens && p->max_tokens != p->max_completion_tokens)
            return BAD(p, "max_completion_tokens",
                       "'max_tokens' (%" PRId64 ") and 'max_completion_tokens' (%" PRId64 ") disagree; "
                       "give one of them",
                       p->max_tokens, p->max_completion_tokens);
        break;
    case OAI_TOKENIZE:
        if (p->has_prompt == p->has_messages)
            return p->has_prompt ? BAD(p, "messages", "give either 'prompt' or 'messages', not both")
                                 : BAD(p, "prompt", "'prompt' or 'messages' is required");
        if (!p->has_add_special) r->add_special_tokens = p->has_prompt;
        break;
    case OAI_DETOKENIZE:
        if (!p->has_tokens) return BAD(p, "tokens", "'tokens' is required");
        break;
    case OAI_EMBEDDING:
        if (!p->has_prompt) return BAD(p, "input", "'input' is required");
        r->add_special_tokens = true;
        break;
    }
    if (p->max_completion_tokens) r->max_tokens = (int)p->max_completion_tokens;
    if (p->max_tokens) r->max_tokens = (int)p->max_tokens;
    if (p->has_stream_options && !r->stream)
        return BAD(p, "stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (r->kind == OAI_COMPLETION) r->add_special_tokens = true;
    return 0;
}

static int parse_request(enum oai_kind kind, const char *body, size_t len, struct oai_request *out,
                         struct oai_error *err) {
    request_defaults(out, kind);
    memset(err, 0, sizeof *err);
    struct pctx p = {.r = out, .err = err};
    if (!body) len = 0;
    size_t i = 0;
    while (i < len && (body[i] == ' ' || body[i] == '\t' || body[i] == '\r' || body[i] == '\n')) i++;
    if (i == len) return BAD(&p, NULL, "request body is empty; a JSON object is expected");

    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root) {
        json_load_error(err, &je);
        return -1;
    }
    int rc = 0;
    char got[48];
    if (!json_is_object(root)) {
        rc = BAD(&p, NULL, "request body must be a JSON object, got %s", describe(root, got, sizeof got));
        goto done;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const struct field *f = find_field(key);
        if (!f) {
            rc = BAD(&p, key, "unknown field '%.48s' in a %s request", key, route_name(kind));
            goto done;
        }
        if (!(f->kinds & (1u << kind))) {
            rc = BAD(&p, key, "'%s' is not a field of %s requests", key, route_name(kind));
            goto done;
        }
        if (json_is_null(v)) continue;   /* null: not given */
        if ((rc = f->parse(&p, key, v))) goto done;
    }
    rc = check_request(&p);
done:
    json_decref(root);
    if (rc) {
        oai_request_free(out);
        request_defaults(out, kind);
    }
    return rc ? -1 : 0;
}

int openai_parse_completion(const char *body, size_t len, struct oai_request *out, struct oai_error *err) {
    return parse_request(OAI_COMPLETION, body, len, out, err);
}

int openai_parse_chat(const char *body, size_t len, struct oai_request *out, struct oai_error *err) {
    return parse_request(OAI_CHAT, body, len, out, err);
}

int openai_parse_tokenize(const char *body, size_t len, struct oai_request *out, struct oai_error *err) {
    return parse_request(OAI_TOKENIZE, body, len, out, err);
}

int openai_parse_detokenize(const char *body, size_t len, struct oai_request *out, struct oai_error *err) {
    return parse_request(OAI_DETOKENIZE, body, len, out, err);
}

int openai_parse_embedding(const char *body, size_t len, struct oai_request *out, struct oai_error *err) {
    return parse_request(OAI_EMBEDDING, body, len, out, err);
}

void oai_request_free(struct oai_request *r) {
    if (!r) return;
    for (int i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].tokens);
    }
    free(r->prompts);
    for (int i = 0; i < r->n_messages; i++) free(r->messages[i].content);
    free(r->messages);
    for (int i = 0; i < r->n_stops; i++) free(r->stops[i]);
    free(r->stops);
    free(r->stop_ids);
    free(r->logit_bias);
    grammar_free(r->grammar);
    r->grammar = NULL;
    for (int i = 0; i < r->n_tools; i++) {
        free(r->tools[i].name);
        free(r->tools[i].description);
        free(r->tools[i].parameters);
    }
    free(r->tools);
    r->tools = NULL;
    r->n_tools = 0;
    r->prompts = NULL;
    r->messages = NULL;
    r->stops = NULL;
    r->stop_ids = NULL;
    r->logit_bias = NULL;
    r->n_prompts = r->n_messages = r->n_stops = r->n_stop_ids = r->n_logit_bias = 0;
}

int oai_check_token_ids(const struct oai_request *r, int n_vocab, struct oai_error *err) {
    for (int i = 0; i < r->n_prompts; i++) {
        const struct oai_prompt *pr = &r->prompts[i];
        for (int j = 0; j < pr->n_tokens; j++) {
            if (pr->tokens[j] < n_vocab) continue;
            char param[64];
            if (r->kind == OAI_DETOKENIZE) field_name(param, sizeof param, "tokens[%d]", j);
            else if (r->nested_token_prompts)
                field_name(param, sizeof param, "%s[%d][%d]", oai_prompt_field(r->kind), i, j);
            else field_name(param, sizeof param, "%s[%d]", oai_prompt_field(r->kind), j);
            oai_error_set(err, 400, "invalid_request_error", param,
                          "'%s' is token id %" PRId32 ", outside the model's vocabulary of %d tokens", param,
                          pr->tokens[j], n_vocab);
            return -1;
        }
    }
    char param[64];
    for (int i = 0; i < r->n_stop_ids; i++) {
        if (r->stop_ids[i] < n_vocab) continue;
        field_name(param, sizeof param, "stop_token_ids[%d]", i);
        oai_error_set(err, 400, "invalid_request_error", param,
                      "'%s' is token id %" PRId32 ", outside the model's vocabulary of %d tokens", param,
                      r->stop_ids[i], n_vocab);
        return -1;
    }
    for (int i = 0; i < r->n_logit_bias; i++) {
        if (r->logit_bias[i].id < n_vocab) continue;
        field_name(param, sizeof param, "logit_bias.%" PRId32, r->logit_bias[i].id);
        oai_error_set(err, 400, "invalid_request_error", param,
                      "'logit_bias' names token id %" PRId32 ", outside the model's vocabulary of %d tokens",
                      r->logit_bias[i].id, n_vocab);
        return -1;
    }
    return 0;
}

int oai_n_choices(const struct oai_request *r) {
    if (r->kind == OAI_EMBEDDING) return r->n_prompts;   /* one vector per input */
    return r->kind == OAI_COMPLETION ? r->n_prompts * r->n : r->n;
}

const char *oai_role_name(enum oai_role role) {
    switch (role) {
    case OAI_ROLE_SYSTEM: return "system";
    case OAI_ROLE_USER: return "user";
    case OAI_ROLE_ASSISTANT: return "assistant";
    default: return "tool";
    }
}

const char *oai_finish_reason(enum finish_reason f) { return f == FINISH_NONE ? NULL : finish_reason_name(f); }

void oai_format_id(char *buf, size_t size, enum oai_kind kind, uint64_t request_id) {
    snprintf(buf, size, "%s-%" PRIu64, kind == OAI_CHAT ? "chatcmpl" : "cmpl", request_id);
}

int oai_parse_id(const char *s, uint64_t *request_id) {
    if (!strncmp(s, "chatcmpl-", 9)) s += 9;
    else if (!strncmp(s, "cmpl-", 5)) s += 5;
    if (*s < '0' || *s > '9') return -1;
    uint64_t x = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return -1;
        uint64_t d = (uint64_t)(*s - '0');
        if (x > (UINT64_MAX - d) / 10) return -1;   /* would overflow */
        x = x * 10 + d;
    }
    *request_id = x;
    return 0;
}

/* ------------------------------------------------------------------ choices */

void oai_choice_init(struct oai_choice *c, int index, bool logprobs, int top_logprobs, size_t max_bytes) {
    memset(c, 0, sizeof *c);
    c->index = index;
    c->finish = FINISH_NONE;
    c->logprobs = logprobs;
    c->top_logprobs = logprobs ? top_logprobs : 0;
    c->max_bytes = max_bytes ? max_bytes : OAI_CHOICE_MAX_BYTES;
}

void oai_choice_expect_tools(struct oai_choice *c) { c->tools = true; }

void oai_choice_free(struct oai_choice *c) {
    free(c->call_text);
    free(c->text);
    free(c->pieces);
    free(c->piece_end);
    free(c->token_logprob);
    free(c->alts_end);
    free(c->alt_pieces);
    free(c->alt_piece_end);
    free(c->alt_logprob);
    memset(c, 0, sizeof *c);
}

#define TOKEN_OVERHEAD 16   /* bytes charged per recorded token (offsets, logprob) */

static size_t choice_bytes(const struct oai_choice *c) {
    return c->text_len + c->pieces_len + c->alt_pieces_len + (size_t)(c->n_tokens + c->n_alts) * TOKEN_OVERHEAD;
}

/* Makes room for `need` bytes in *buf (NUL included); 0 or -1. */
static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    char *nb = realloc(*buf, ncap);
    if (!nb) return -1;
    *buf = nb;
    *cap = ncap;
    return 0;
}

int oai_choice_add_text(struct oai_choice *c, const char *text, size_t len) {
    if (len == 0) return 0;
    if (len > c->max_bytes || choice_bytes(c) > c->max_bytes - len) return -1;
    if (grow(&c->text, &c->text_cap, c->text_len + len + 1)) return -1;
    memcpy(c->text + c->text_len, text, len);
    c->text_len += len;
    c->text[c->text_len] = '\0';
    return 0;
}

/* Room for one more entry in a pair of parallel arrays (ends, logprobs). */
static int grow_entries(size_t **ends, float **lps, int *cap, int need) {
    if (need <= *cap) return 0;
    int ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    size_t *e = realloc(*ends, (size_t)ncap * sizeof *e);
    if (!e) return -1;
    *ends = e;
    float *l = realloc(*lps, (size_t)ncap * sizeof *l);
    if (!l) return -1;
    *lps = l;
    *cap = ncap;
    return 0;
}

int oai_choice_add_token(struct oai_choice *c, const char *piece, size_t len, float logprob,
                         const struct oai_alt *alts, int n_alts) {
    if (!c->logprobs) return 0;
    if (n_alts > c->top_logprobs) n_alts = c->top_logprobs;
    size_t add = len + (size_t)(1 + n_alts) * TOKEN_OVERHEAD;
    for (int i = 0; i < n_alts; i++) add += alts[i].len;
    if (add > c->max_bytes || choice_bytes(c) > c->max_bytes - add) return -1;
    const int cap_before = c->cap_tokens;
    if (grow_entries(&c->piece_end, &c->token_logprob, &c->cap_tokens, c->n_tokens + 1)) return -1;
    if (c->cap_tokens != cap_before) {
        int *ae = realloc(c->alts_end, (size_t)c->cap_tokens * sizeof *ae);
        if (!ae) return -1;
        c->alts_end = ae;
    }
    if (grow_entries(&c->alt_piece_end, &c->alt_logprob, &c->cap_alts, c->n_alts + n_alts)) return -1;
    if (grow(&c->pieces, &c->pieces_cap, c->pieces_len + len + 1)) return -1;
    size_t alt_bytes = 0;
    for (int i = 0; i < n_alts; i++) alt_bytes += alts[i].len;
    if (grow(&c->alt_pieces, &c->alt_pieces_cap, c->alt_pieces_len + alt_bytes + 1)) return -1;
    if (len) memcpy(c->pieces + c->pieces_len, piece, len);
    c->pieces_len += len;
    c->piece_end[c->n_tokens] = c->pieces_len;
    c->token_logprob[c->n_tokens] = logprob;
    for (int i = 0; i < n_alts; i++) {
        if (alts[i].len) memcpy(c->alt_pieces + c->alt_pieces_len, alts[i].piece, alts[i].len);
        c->alt_pieces_len += alts[i].len;
        c->alt_piece_end[c->n_alts] = c->alt_pieces_len;
        c->alt_logprob[c->n_alts] = alts[i].logprob;
        c->n_alts++;
    }
    c->alts_end[c->n_tokens] = c->n_alts;
    c->n_tokens++;
    return 0;
}

/* ------------------------------------------------------------------ responses */

/* Builders set into objects and arrays through these: a NULL value (failed
 * allocation) or a failed insertion clears *ok, and the tree is dropped at
 * the end, so no step needs its own error path. */
static void put(json_t *obj, const char *key, json_t *v, bool *ok) {
    if (json_object_set_new(obj, key, v)) *ok = false;
}

static void push(json_t *arr, json_t *v, bool *ok) {
    if (json_array_append_new(arr, v)) *ok = false;
}

/* Compact text of root (consumed); NULL when !ok or out of memory. */
static char *dump(json_t *root, bool ok, size_t *len) {
    char *s = ok && root ? json_dumps(root, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(root);
    if (s && len) *len = strlen(s);
    return s;
}

/* "data: <json>\n\n" appended to a growing buffer. */
struct sse {
    char *buf;
    size_t len, cap;
    bool ok;
};

static void sse_event(struct sse *s, json_t *root, bool ok) {
    size_t n = 0;
    char *js = dump(root, ok, &n);
    if (!js || grow(&s->buf, &s->cap, s->len + n + 9)) {
        s->ok = false;
        free(js);
        return;
    }
    memcpy(s->buf + s->len, "data: ", 6);
    memcpy(s->buf + s->len + 6, js, n);
    memcpy(s->buf + s->len + 6 + n, "\n\n", 3);
    s->len += n + 8;
    free(js);
}

static char *sse_finish(struct sse *s, size_t *len) {
    if (s->ok && !s->buf) {
        s->buf = malloc(1);
        if (s->buf) s->buf[0] = '\0';
        else s->ok = false;
    }
    if (!s->ok) {
        free(s->buf);
        return NULL;
    }
    if (len) *len = s->len;
    return s->buf;
}

static json_t *logprob_value(float lp) {
    if (isnan(lp)) return json_null();   /* an echoed prompt's first token: nothing predicts it */
    return json_real(isfinite(lp) ? lp : -9999.0);   /* OpenAI's stand-in for -inf */
}

/* A token's text for "tokens"/"token": its bytes when they are whole UTF-8
 * characters, else "bytes:\xNN..." (OpenAI's spelling for partial ones). */
static json_t *token_string(const char *piece, size_t n) {
    if (utf8_valid(piece, n)) return json_stringn_nocheck(piece, n);
    char *s = malloc(6 + 4 * n + 1);
    if (!s) return NULL;
    memcpy(s, "bytes:", 6);
    for (size_t i = 0; i < n; i++) snprintf(s + 6 + 4 * i, 5, "\\x%02x", (unsigned char)piece[i]);
    json_t *j = json_stringn_nocheck(s, 6 + 4 * n);
    free(s);
    return j;
}

static size_t piece_start(const struct oai_choice *c, int i) {
    return i ? c->piece_end[i - 1] : 0;
}

/* Token i's alternatives are entries [alts_begin(i), alts_end[i]). */
static int alts_begin(const struct oai_choice *c, int i) {
    return i ? c->alts_end[i - 1] : 0;
}

static size_t alt_start(const struct oai_choice *c, int a) {
    return a ? c->alt_piece_end[a - 1] : 0;
}

/* Completions' top_logprobs entry for token i: {"text": logprob, ...};
 * null for an echoed prompt's first token, which nothing predicts. */
static json_t *completion_alts(const struct oai_choice *c, int i, bool *ok) {
    if (isnan(c->token_logprob[i])) return json_null();
    json_t *o = json_object();
    for (int a = alts_begin(c, i); a < c->alts_end[i]; a++) {
        size_t x = alt_start(c, a), y = c->alt_piece_end[a];
        json_t *key = token_string(c->alt_pieces + x, y - x);
        if (!key) {
            *ok = false;
            continue;
        }
        put(o, json_string_value(key), logprob_value(c->alt_logprob[a]), ok);
        json_decref(key);
    }
    if (!o) *ok = false;
    return o;
}

/* Chat's entry for one token or alternative: {"token","logprob","bytes"}. */
static json_t *chat_token(const char *piece, size_t n, float logprob, bool *ok) {
    json_t *t = json_object(), *bytes = json_array();
    for (size_t k = 0; k < n; k++) push(bytes, json_integer((unsigned char)piece[k]), ok);
    put(t, "token", token_string(piece, n), ok);
    put(t, "logprob", logprob_value(logprob), ok);
    put(t, "bytes", bytes, ok);
    if (!t) *ok = false;
    return t;
}

/* Completions' logprobs object over the choice's recorded tokens; offsets
 * count characters from char_base and never pass char_limit. */
static json_t *completion_logprobs(const struct oai_choice *c, size_t char_base, size_t char_limit, bool *ok) {
    json_t *lp = json_object(), *toks = json_array(), *lps = json_array(), *offs = json_array();
    size_t chars = char_base;
    for (int i = 0; i < c->n_tokens; i++) {
        size_t a = piece_start(c, i), b = c->piece_end[i];
        push(toks, token_string(c->pieces + a, b - a), ok);
        push(lps, logprob_value(c->token_logprob[i]), ok);
        push(offs, json_integer((json_int_t)(chars < char_limit ? chars : char_limit)), ok);
        chars += utf8_count_chars(c->pieces + a, b - a);
    }
    put(lp, "tokens", toks, ok);
    put(lp, "token_logprobs", lps, ok);
    if (c->top_logprobs > 0) {
        json_t *tops = json_array();
        for (int i = 0; i < c->n_tokens; i++) push(tops, completion_alts(c, i, ok), ok);
        put(lp, "top_logprobs", tops, ok);
    } else {
        put(lp, "top_logprobs", json_null(), ok);
    }
    put(lp, "text_offset", offs, ok);
    if (!lp) *ok = false;
    return lp;
}

/* Chat's logprobs object: {"content":[{"token","logprob","bytes","top_logprobs":[]}]}. */
static json_t *chat_logprobs(const struct oai_choice *c, bool *ok) {
    json_t *lp = json_object(), *content = json_array();
    for (int i = 0; i < c->n_tokens; i++) {
        size_t a = piece_start(c, i), b = c->piece_end[i];
        json_t *t = chat_token(c->pieces + a, b - a, c->token_logprob[i], ok), *tops = json_array();
        for (int k = alts_begin(c, i); k < c->alts_end[i]; k++) {
            size_t x = alt_start(c, k), y = c->alt_piece_end[k];
            push(tops, chat_token(c->alt_pieces + x, y - x, c->alt_logprob[k], ok), ok);
        }
        put(t, "top_logprobs", tops, ok);
        push(content, t, ok);
    }
    put(lp, "content", content, ok);
    if (!lp) *ok = false;
    return lp;
}

/* A chat choice that ended by calling tools: its finish_reason here only
 * ("tool_calls"), never an engine value. */
#define FINISH_TOOL_CALLS ((enum finish_reason)100)

static json_t *finish_value(enum finish_reason f) {
    if (f == FINISH_TOOL_CALLS) return json_string("tool_calls");
    const char *name = oai_finish_reason(f);
    return name ? json_string(name) : json_null();
}

static json_t *usage_object(const struct oai_usage *u, bool *ok) {
    json_t *o = json_object();
    put(o, "prompt_tokens", json_integer(u->prompt_tokens), ok);
    put(o, "completion_tokens", json_integer(u->completion_tokens), ok);
    put(o, "total_tokens", json_integer((json_int_t)u->prompt_tokens + u->completion_tokens), ok);
    json_t *details = json_object();   /* OpenAI's field for prompt caching */
    put(details, "cached_tokens", json_integer(u->cached_tokens), ok);
    put(o, "prompt_tokens_details", details, ok);
    if (u->draft_tokens) {
        put(o, "draft_tokens", json_integer(u->draft_tokens), ok);
        put(o, "accepted_draft_tokens", json_integer(u->accepted_draft_tokens), ok);
    }
    if (u->compressed) {
        json_t *c = json_object();
        put(c, "kept_tokens", json_integer(u->kept_tokens), ok);
        put(c, "demoted_tokens", json_integer(u->demoted_tokens), ok);
        put(c, "dropped_tokens", json_integer(u->dropped_tokens), ok);
        put(c, "kv_bytes", json_integer((json_int_t)u->kv_bytes_full), ok);
        put(c, "kv_bytes_compressed", json_integer((json_int_t)u->kv_bytes_compressed), ok);
        put(o, "context_compression", c, ok);
    }
    if (!o) *ok = false;
    return o;
}

/* llama.cpp's "timings": what benchmark clients of llama-server read. */
static json_t *timings_object(const struct oai_usage *u, bool *ok) {
    json_t *o = json_object();
    put(o, "cache_n", json_integer(u->cached_tokens), ok);
    put(o, "prompt_n", json_integer(u->prompt_tokens - u->cached_tokens), ok);
    put(o, "prompt_ms", json_real(u->prompt_ms), ok);
    put(o, "prompt_per_second",
        json_real(u->prompt_ms > 0 ? (u->prompt_tokens - u->cached_tokens) * 1000.0 / u->prompt_ms : 0), ok);
    put(o, "predicted_n", json_integer(u->completion_tokens), ok);
    put(o, "predicted_ms", json_real(u->predicted_ms), ok);
    put(o, "predicted_per_second",
        json_real(u->predicted_ms > 0 && u->completion_tokens > 1 ? (u->completion_tokens - 1) * 1000.0 / u->predicted_ms
                                                                   : 0), ok);
    put(o, "draft_n", json_integer(u->draft_tokens), ok);
    put(o, "draft_n_accepted", json_integer(u->accepted_draft_tokens), ok);
    if (u->grammar_ms > 0) put(o, "grammar_ms", json_real(u->grammar_ms), ok);
    if (!o) *ok = false;
    return o;
}

/* The fields every response and chunk starts with. */
static json_t *envelope(const struct oai_meta *m, const char *object, bool *ok) {
    json_t *o = json_object();
    put(o, "id", json_text(m->id, strlen(m->id)), ok);
    put(o, "object", json_string(object), ok);
    put(o, "created", json_integer(m->created), ok);
    put(o, "model", json_text(m->model, strlen(m->model)), ok);
    if (!o) *ok = false;
    return o;
}

/* "call_<request number>_<i>": unique within the server's life, like the response id. */
static json_t *call_id(const struct oai_meta *m, int i) {
    const char *dash = strrchr(m->id, '-');
    char id[96];
    snprintf(id, sizeof id, "call_%s_%d", dash ? dash + 1 : m->id, i);
    return json_string(id);
}

/* message.tool_calls: [{"id","type":"function","function":{"name","arguments"}}]. */
static json_t *tool_calls_value(const struct oai_meta *m, const char *text, const struct tool_call *calls, int n,
                                bool *ok) {
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        json_t *call = json_object(), *fn = json_object();
        put(fn, "name", json_string(calls[i].name), ok);
        put(fn, "arguments", json_text(text + calls[i].args_start, calls[i].args_end - calls[i].args_start), ok);
        put(call, "id", call_id(m, i), ok);
        put(call, "type", json_string("function"), ok);
        put(call, "function", fn, ok);
        push(arr, call, ok);
    }
    if (!arr) *ok = false;
    return arr;
}

char *oai_response(const struct oai_meta *m, const struct oai_choice *choices, int n_choices,
                   const struct oai_usage *u, size_t *len) {
    bool ok = true, chat = m->kind == OAI_CHAT;
    json_t *root = envelope(m, chat ? "chat.completion" : "text_completion", &ok);
    json_t *arr = json_array();
    for (int i = 0; i < n_choices; i++) {
        const struct oai_choice *c = &choices[i];
        json_t *ch = json_object();
        json_t *text = json_text(c->text ? c->text : "", c->text_len);
        put(ch, "index", json_integer(c->index), &ok);
        struct tool_call calls[TOOLS_MAX_CALLS];
        const int n_calls = chat && c->tools && c->text && tools_text_is_call(c->text, c->text_len)
                                ? tools_parse_calls(c->text, c->text_len, calls, TOOLS_MAX_CALLS)
                                : -1;
        if (chat) {
            json_t *msg = json_object();
            put(msg, "role", json_string("assistant"), &ok);
            if (n_calls > 0) {
                json_decref(text);
                put(msg, "content", json_null(), &ok);
                put(msg, "tool_calls", tool_calls_value(m, c->text, calls, n_calls, &ok), &ok);
            } else {
                put(msg, "content", text, &ok);
            }
            put(ch, "message", msg, &ok);
        } else {
            put(ch, "text", text, &ok);
        }
        json_t *lp = !c->logprobs ? json_null()
                     : chat       ? chat_logprobs(c, &ok)
                                  : completion_logprobs(c, 0, utf8_count_chars(c->text, c->text_len), &ok);
        put(ch, "logprobs", lp, &ok);
        put(ch, "finish_reason", finish_value(n_calls > 0 && c->finish == FINISH_STOP ? FINISH_TOOL_CALLS : c->finish),
            &ok);
        push(arr, ch, &ok);
    }
    put(root, "choices", arr, &ok);
    put(root, "usage", usage_object(u, &ok), &ok);
    put(root, "timings", timings_object(u, &ok), &ok);
    return dump(root, ok, len);
}

/* One chunk carrying one choice. delta_or_text is the chat delta object or
 * the completion text; logprobs may be NULL (JSON null). */
static void chunk_event(struct sse *s, const struct oai_meta *m, const struct oai_choice *c, json_t *delta_or_text,
                        json_t *logprobs, enum finish_reason finish) {
    bool ok = true, chat = m->kind == OAI_CHAT;
    json_t *root = envelope(m, chat ? "chat.completion.chunk" : "text_completion", &ok);
    json_t *arr = json_array(), *ch = json_object();
    put(ch, "index", json_integer(c->index), &ok);
    put(ch, chat ? "delta" : "text", delta_or_text, &ok);
    put(ch, "logprobs", logprobs ? logprobs : json_null(), &ok);
    put(ch, "finish_reason", finish_value(finish), &ok);
    push(arr, ch, &ok);
    put(root, "choices", arr, &ok);
    if (m->include_usage) put(root, "usage", json_null(), &ok);
    sse_event(s, root, ok);
}

/* Forgets what was streamed, keeping the character count for text_offset. */
static void choice_consume(struct oai_choice *c) {
    c->chars_streamed += utf8_count_chars(c->pieces, c->pieces_len);
    c->text_len = 0;
    c->pieces_len = 0;
    c->n_tokens = 0;
    c->alt_pieces_len = 0;
    c->n_alts = 0;
}

enum { TOOL_MODE_UNDECIDED, TOOL_MODE_TEXT, TOOL_MODE_CALLS };

struct tool_events {
    struct sse *s;
    const struct oai_meta *m;
    const struct oai_choice *c;
};

/* delta {"tool_calls": [{"index", ("id", "type", "function": {"name", "arguments": ""}) | ("function": {"arguments"})}]} */
static void tool_delta(struct tool_events *e, int index, const char *name, const char *args, size_t len) {
    bool ok = true;
    json_t *delta = json_object(), *calls = json_array(), *call = json_object(), *fn = json_object();
    put(call, "index", json_integer(index), &ok);
    if (name) {
        put(call, "id", call_id(e->m, index), &ok);
        put(call, "type", json_string("function"), &ok);
        put(fn, "name", json_string(name), &ok);
    }
    put(fn, "arguments", json_text(args, len), &ok);
    put(call, "function", fn, &ok);
    push(calls, call, &ok);
    put(delta, "tool_calls", calls, &ok);
    if (!ok) e->s->ok = false;
    chunk_event(e->s, e->m, e->c, delta, NULL, FINISH_NONE);
}

static int on_tool_name(void *ud, int index, const char *name) {
    tool_delta(ud, index, name, "", 0);
    return 0;
}

static int on_tool_args(void *ud, int index, const char *bytes, size_t len) {
    tool_delta(ud, index, NULL, bytes, len);
    return 0;
}

/* A call list streams as deltas: the text is kept whole (the parser looks
 * back at it) and only what tool_stream_feed releases is sent. */
static void stream_tool_calls(struct sse *s, const struct oai_meta *m, struct oai_choice *c, bool has_new,
                              bool finishing) {
    if (has_new && c->text_len) {
        if (grow(&c->call_text, &c->call_cap, c->call_len + c->text_len + 1)) {
            s->ok = false;
            return;
        }
        memcpy(c->call_text + c->call_len, c->text, c->text_len);
        c->call_len += c->text_len;
        c->call_text[c->call_len] = '\0';
    }
    struct tool_events e = {s, m, c};
    tool_stream_feed(&c->tool_stream, c->call_text, c->call_len, finishing, on_tool_name, on_tool_args, &e);
}

char *oai_stream_chunk(const struct oai_meta *m, struct oai_choice *c, size_t *len) {
    struct sse s = {.ok = true};
    bool chat = m->kind == OAI_CHAT, ok = true;
    bool has_new = c->text_len > 0 || c->n_tokens > 0;
    bool finishing = c->finish != FINISH_NONE && !c->finish_sent;
    if (c->finish_sent) has_new = false;

    if (chat && !c->started) {
        json_t *delta = json_object();
        put(delta, "role", json_string("assistant"), &ok);
        put(delta, "content", json_string(""), &ok);
        if (!ok) s.ok = false;
        chunk_event(&s, m, c, delta, NULL, FINISH_NONE);
    }
    c->started = true;
    if (chat && c->tools && !c->tool_mode && c->text_len)
        c->tool_mode = tools_text_is_call(c->text, c->text_len) ? TOOL_MODE_CALLS : TOOL_MODE_TEXT;
    if (chat && c->tool_mode == TOOL_MODE_CALLS) {
        if (has_new || finishing) stream_tool_calls(&s, m, c, has_new, finishing);
    } else if (chat && has_new) {
        json_t *delta = json_object();
        put(delta, "content", json_text(c->text ? c->text : "", c->text_len), &ok);
        json_t *lp = c->logprobs ? chat_logprobs(c, &ok) : NULL;
        if (!ok) s.ok = false;
        chunk_event(&s, m, c, delta, lp, FINISH_NONE);
    }
    if (chat && finishing)
        chunk_event(&s, m, c, json_object(), NULL,
                    c->tool_mode == TOOL_MODE_CALLS && c->finish == FINISH_STOP && c->tool_stream.calls > 0
                        ? FINISH_TOOL_CALLS : c->finish);
    if (!chat && (has_new || finishing)) {
        /* completions carry the last text and the finish reason together */
        json_t *lp = c->logprobs ? completion_logprobs(c, c->chars_streamed, SIZE_MAX, &ok) : NULL;
        if (!ok) s.ok = false;
        chunk_event(&s, m, c, json_text(c->text ? c->text : "", c->text_len), lp,
                    finishing ? c->finish : FINISH_NONE);
    }
    if (has_new) choice_consume(c);
    if (finishing) c->finish_sent = true;
    return sse_finish(&s, len);
}

char *oai_stream_usage(const struct oai_meta *m, const struct oai_usage *u, size_t *len) {
    struct sse s = {.ok = true};
    bool ok = true;
    json_t *root = envelope(m, m->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion", &ok);
    put(root, "choices", json_array(), &ok);
    put(root, "usage", usage_object(u, &ok), &ok);
    put(root, "timings", timings_object(u, &ok), &ok);
    sse_event(&s, root, ok);
    return sse_finish(&s, len);
}

char *oai_stream_error(const struct oai_error *e, size_t *len) {
    struct sse s = {.ok = true};
    bool ok = true;
    json_t *root = json_object(), *err = json_object();
    put(err, "message", json_text(e->message, strlen(e->message)), &ok);
    put(err, "type", json_text(e->type, strlen(e->type)), &ok);
    put(err, "param", e->param[0] ? json_text(e->param, strlen(e->param)) : json_null(), &ok);
    put(err, "code", json_null(), &ok);
    put(root, "error", err, &ok);
    sse_event(&s, root, ok);
    return sse_finish(&s, len);
}

static json_t *model_object(const char *name, int64_t created, bool *ok) {
    json_t *mo = json_object();
    put(mo, "id", json_text(name, strlen(name)), ok);
    put(mo, "object", json_string("model"), ok);
    put(mo, "created", json_integer(created), ok);
    put(mo, "owned_by", json_string("ebb"), ok);
    return mo;
}

char *oai_models_response(const char *const *names, const int64_t *created, int n, size_t *len) {
    bool ok = true;
    json_t *root = json_object(), *data = json_array();
    put(root, "object", json_string("list"), &ok);
    for (int i = 0; i < n; i++) push(data, model_object(names[i], created ? created[i] : 0, &ok), &ok);
    put(root, "data", data, &ok);
    return dump(root, ok, len);
}

char *oai_model_response(const char *name, int64_t created, size_t *len) {
    bool ok = true;
    return dump(model_object(name, created, &ok), ok, len);
}

char *oai_tokenize_response(const int32_t *ids, int n, int max_model_len, const char *const *pieces,
                            const size_t *piece_lens, size_t *len) {
    bool ok = true;
    json_t *root = json_object(), *toks = json_array();
    put(root, "count", json_integer(n), &ok);
    put(root, "max_model_len", json_integer(max_model_len), &ok);
    for (int i = 0; i < n; i++) push(toks, json_integer(ids[i]), &ok);
    put(root, "tokens", toks, &ok);
    if (pieces) {
        json_t *strs = json_array();
        for (int i = 0; i < n; i++) push(strs, token_string(pieces[i], piece_lens[i]), &ok);
        put(root, "token_strs", strs, &ok);
    }
    return dump(root, ok, len);
}

/* Standard base64 (RFC 4648, with padding) of n bytes; malloc'd. */
static char *base64_encode(const unsigned char *in, size_t n) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc((n + 2) / 3 * 4 + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i += 3) {
        const uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                           (i + 2 < n ? in[i + 2] : 0);
        *o++ = abc[v >> 18 & 63];
        *o++ = abc[v >> 12 & 63];
        *o++ = i + 1 < n ? abc[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? abc[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

/* One vector as OpenAI sends it: numbers, or base64 of little-endian float32. */
static json_t *embedding_value(const float *v, int dim, bool base64, bool *ok) {
    if (!base64) {
        json_t *a = json_array();
        for (int i = 0; i < dim; i++) push(a, json_real(v[i]), ok);
        if (!a) *ok = false;
        return a;
    }
    unsigned char *bytes = malloc((size_t)dim * 4);
    char *text = NULL;
    if (bytes) {
        for (int i = 0; i < dim; i++) {
            uint32_t u;
            memcpy(&u, &v[i], 4);
            for (int b = 0; b < 4; b++) bytes[4 * i + b] = (unsigned char)(u >> (8 * b));
        }
        text = base64_encode(bytes, (size_t)dim * 4);
    }
    free(bytes);
    json_t *j = text ? json_string_nocheck(text) : NULL;
    free(text);
    if (!j) *ok = false;
    return j;
}

char *oai_embedding_response(const char *model, const float *vectors, int n, int dim, bool base64,
                             int prompt_tokens, size_t *len) {
    bool ok = true;
    json_t *root = json_object(), *data = json_array(), *usage = json_object();
    put(root, "object", json_string("list"), &ok);
    for (int i = 0; i < n; i++) {
        json_t *e = json_object();
        put(e, "object", json_string("embedding"), &ok);
        put(e, "index", json_integer(i), &ok);
        put(e, "embedding", embedding_value(vectors + (size_t)i * dim, dim, base64, &ok), &ok);
        push(data, e, &ok);
    }
    put(root, "data", data, &ok);
    put(root, "model", json_text(model, strlen(model)), &ok);
    put(usage, "prompt_tokens", json_integer(prompt_tokens), &ok);
    put(usage, "total_tokens", json_integer(prompt_tokens), &ok);
    put(root, "usage", usage, &ok);
    return dump(root, ok, len);
}

char *oai_detokenize_response(const char *text, size_t text_len, size_t *len) {
    bool ok = true;
    json_t *root = json_object();
    put(root, "prompt", json_text(text ? text : "", text_len), &ok);
    return dump(root, ok, len);
}
