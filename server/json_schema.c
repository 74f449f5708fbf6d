/* JSON Schema to GBNF; see json_schema.h for what the grammar accepts.
 *
 * One pass over the schema. Every schema node becomes one rule "sN" whose
 * body is built in its own buffer while the nodes below it append their
 * rules to the output, so the output is the rules in post-order followed by
 * the fixed primitives (string, number, ws...). A $ref target is compiled
 * once: its rule number is reserved and remembered before its body is
 * built, so a recursive reference finds the number and becomes a rule
 * reference (root is "#", rule s0). The result is handed to grammar_parse
 * before it is returned, which refuses what the grammar cannot run (a $ref
 * cycle that consumes nothing, an oversized grammar) and proves the text
 * compiles.
 *
 * Object members. For properties p0..pk-1, first_i is "the members from i
 * on, none written yet" and rest_i "the members from i on, at least one
 * written" (so each is preceded by a comma):
 *   rest_i  ::= "," ws kv_i rest_i+1          (p_i required)
 *             | ( "," ws kv_i )? rest_i+1     (p_i optional)
 *   first_i ::= kv_i rest_i+1                 (p_i required)
 *             | kv_i rest_i+1 | first_i+1     (p_i optional)
 * with first_k and rest_k empty: any in-order subset containing the
 * required members, in 2k + 2 rules.
 */
#include "server/json_schema.h"
#include "engine/grammar.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_ITEMS 1024
#define MAX_LENGTH 4096
#define MAX_OUTPUT (1u << 20)

/* Shared by both grammars: the JSON primitives and the bounded whitespace. */
#define PRIMITIVES \
    "ws ::= ( \" \" | \"\\n\" [ \\t]{0,20} )?\n" \
    "value ::= object | array | string | number | \"true\" | \"false\" | \"null\"\n" \
    "object ::= \"{\" ws ( string ws \":\" ws value ws ( \",\" ws string ws \":\" ws value ws )* )? \"}\"\n" \
    "array ::= \"[\" ws ( value ws ( \",\" ws value ws )* )? \"]\"\n" \
    "string ::= \"\\\"\" char* \"\\\"\"\n" \
    "char ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4} )\n" \
    "number ::= integer ( \".\" [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?\n" \
    "integer ::= \"-\"? ( \"0\" | [1-9] [0-9]{0,18} )\n" \
    "boolean ::= \"true\" | \"false\"\n" \
    "date ::= [0-9]{4} \"-\" ( \"0\" [1-9] | \"1\" [0-2] ) \"-\" ( \"0\" [1-9] | [12] [0-9] | \"3\" [01] )\n" \
    "time ::= ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" [0-5] [0-9] ( \".\" [0-9]{1,9} )? " \
    "( \"Z\" | [+-] ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] )\n" \
    "date-time ::= date \"T\" time\n" \
    "uuid ::= [0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" " \
    "[0-9a-fA-F]{12}\n"

static const char ANY_OBJECT_GBNF[] = "root ::= object\n" PRIMITIVES;

const char *json_schema_any_object_gbnf(void) { return ANY_OBJECT_GBNF; }

/* ------------------------------------------------------------ buffers --- */

struct sbuf {
    char *p;
    size_t n, cap;
    int failed;   /* out of memory or over MAX_OUTPUT: later appends do nothing */
};

static void sb_add(struct sbuf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->n + n + 1 > MAX_OUTPUT) { b->failed = 1; return; }
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) { b->failed = 1; return; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_printf(struct sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) { b->failed = 1; return; }
    sb_add(b, tmp, (size_t)n);
}

/* bytes as the inside of a GBNF string literal. */
static void sb_literal(struct sbuf *b, const char *s, size_t n) {
    sb_puts(b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; sb_add(b, e, 2); }
        else if (c < 0x20) sb_printf(b, "\\x%02X", c);
        else sb_add(b, s + i, 1);
    }
    sb_puts(b, "\"");
}

/* ------------------------------------------------------------ context --- */

struct ref_memo {
    char *ref;   /* the normalised $ref ("#", "$defs/NAME", "definitions/NAME") */
    int rule;
};

struct ctx {
    const json_t *root;
    struct sbuf out;
    int n_rules;
    struct ref_memo *memo;
    size_t n_memo, cap_memo;
    char path[512];
    size_t path_len;
    int depth;
    int failed;
    char *err, *err_path;
    size_t errlen, pathlen;
};

/* Records the first error: message, and the path of keyword under the
 * current node (keyword NULL: the node itself). Returns -1. */
static int fail(struct ctx *c, const char *keyword, const char *fmt, ...) {
    if (c->failed) return -1;
    c->failed = 1;
    if (c->err && c->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
    }
    if (c->err_path && c->pathlen)
        snprintf(c->err_path, c->pathlen, "%s%s%s", c->path, c->path_len && keyword ? "." : "",
                 keyword ? keyword : "");
    return -1;
}

static int fail_memory(struct ctx *c) {
    return fail(c, NULL, "out of memory, or the grammar is over %u bytes", MAX_OUTPUT);
}

/* Appends ".comp" (or "comp" at the root) to the path; returns the length
 * to restore. A path too long for the buffer is cut, which only shortens
 * error messages. */
static size_t path_push(struct ctx *c, const char *comp) {
    size_t old = c->path_len;
    int n = snprintf(c->path + old, sizeof c->path - old, "%s%s", old ? "." : "", comp);
    if (n > 0) c->path_len = old + (size_t)n < sizeof c->path ? old + (size_t)n : sizeof c->path - 1;
    return old;
}

static size_t path_push_index(struct ctx *c, size_t i) {
    char tmp[24];
    snprintf(tmp, sizeof tmp, "%zu", i);
    return path_push(c, tmp);
}

static void path_pop(struct ctx *c, size_t old) {
    c->path_len = old;
    c->path[old] = '\0';
}

/* -------------------------------------------------------------- values --- */

/* Shortest "%.*g" that reads back as v. */
static void format_real(char *buf, size_t n, double v) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* v as compact JSON text, the one spelling the grammar will allow. */
static int dump_value(struct ctx *c, struct sbuf *b, const json_t *v, int depth) {
    if (depth > MAX_DEPTH) return fail(c, NULL, "enum/const value nested over %d deep", MAX_DEPTH);
    switch (json_typeof(v)) {
    case JSON_NULL: sb_puts(b, "null"); return 0;
    case JSON_TRUE: sb_puts(b, "true"); return 0;
    case JSON_FALSE: sb_puts(b, "false"); return 0;
    case JSON_INTEGER: sb_printf(b, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); return 0;
    case JSON_REAL: {
        char tmp[40];
        format_real(tmp, sizeof tmp, json_real_value(v));
        sb_puts(b, tmp);
        return 0;
    }
    case JSON_STRING: {
        char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!s) return fail_memory(c);
        sb_puts(b, s);
        free(s);
        return 0;
    }
    case JSON_ARRAY: {
        sb_puts(b, "[");
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) sb_puts(b, ",");
            if (dump_value(c, b, json_array_get(v, i), depth + 1)) return -1;
        }
        sb_puts(b, "]");
        return 0;
    }
    case JSON_OBJECT: {
        const char *k;
        const json_t *x;
        int first = 1;
        sb_puts(b, "{");
        json_object_foreach((json_t *)v, k, x) {
            if (!first) sb_puts(b, ",");
            first = 0;
            json_t *key = json_string(k);
            char *s = key ? json_dumps(key, JSON_ENCODE_ANY) : NULL;
            json_decref(key);
            if (!s) return fail_memory(c);
            sb_puts(b, s);
            free(s);
            sb_puts(b, ":");
            if (dump_value(c, b, x, depth + 1)) return -1;
        }
        sb_puts(b, "}");
        return 0;
    }
    }
    return fail(c, NULL, "unknown JSON value");
}

/* Whether value v is of JSON Schema type name. */
static int value_has_type(const json_t *v, const char *name) {
    if (!strcmp(name, "null")) return json_is_null(v);
    if (!strcmp(name, "boolean")) return json_is_boolean(v);
    if (!strcmp(name, "integer"))
        return json_is_integer(v) || (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v));
    if (!strcmp(name, "number")) return json_is_number(v);
    if (!strcmp(name, "string")) return json_is_string(v);
    if (!strcmp(name, "array")) return json_is_array(v);
    if (!strcmp(name, "object")) return json_is_object(v);
    return 0;
}

/* ------------------------------------------------------------ keywords --- */

static const char *const ANNOTATIONS[] = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly",
    "writeOnly", "deprecated", "strict", "$defs", "definitions", NULL,
};
static const char *const OBJECT_KEYS[] = {"properties", "required", "additionalProperties", NULL};
static const char *const ARRAY_KEYS[] = {"items", "prefixItems", "minItems", "maxItems", NULL};
static const char *const STRING_KEYS[] = {"minLength", "maxLength", "format", NULL};
static const char *const TYPES[] = {"null", "boolean", "integer", "number", "string", "array", "object", NULL};

static int in_list(const char *const *list, const char *k) {
    for (; *list; list++)
        if (!strcmp(*list, k)) return 1;
    return 0;
}

static int has_any(const json_t *s, const char *const *list) {
    for (; *list; list++)
        if (json_object_get(s, *list)) return 1;
    return 0;
}

/* Refuses every key of s that is neither an annotation nor in allowed
 * (NULL-terminated), naming it; beside names the keyword that rules them
 * out when set. */
static int only_keys(struct ctx *c, const json_t *s, const char *const *allowed, const char *beside) {
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)s, k, v) {
        if (in_list(ANNOTATIONS, k) || in_list(allowed, k)) continue;
        int known = in_list(OBJECT_KEYS, k) || in_list(ARRAY_KEYS, k) || in_list(STRING_KEYS, k) ||
                    !strcmp(k, "type") || !strcmp(k, "enum") || !strcmp(k, "const") || !strcmp(k, "$ref") ||
                    !strcmp(k, "anyOf") || !strcmp(k, "oneOf") || !strcmp(k, "allOf");
        if (known && beside) return fail(c, k, "'%s' beside '%s' is not supported", k, beside);
        return fail(c, k, "JSON Schema keyword '%s' is not supported", k);
    }
    return 0;
}

/* A non-negative integer keyword up to max; def when absent. */
static int count_keyword(struct ctx *c, const json_t *s, const char *k, long long def, long long max,
                         long long *out) {
    const json_t *v = json_object_get(s, k);
    *out = def;
    if (!v) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return fail(c, k, "'%s' must be a non-negative integer", k);
    if (json_integer_value(v) > max)
        return fail(c, k, "'%s' %lld is above the supported %lld", k, (long long)json_integer_value(v), max);
    *out = json_integer_value(v);
    return 0;
}

/* " {min,max}" for a repetition (max < 0: unbounded). */
static void sb_bounds(struct sbuf *b, long long min, long long max) {
    if (max < 0) sb_printf(b, "{%lld,}", min);
    else sb_printf(b, "{%lld,%lld}", min, max);
}

/* --------------------------------------------------------------- rules --- */

static int compile(struct ctx *c, const json_t *s);
static int compile_into(struct ctx *c, const json_t *s, int rule);

/* Appends "sN ::= body" to the output. */
static int emit_rule(struct ctx *c, int rule, struct sbuf *body) {
    if (body->failed) return fail_memory(c);
    sb_printf(&c->out, "s%d ::= ", rule);
    sb_add(&c->out, body->p ? body->p : "\"\"", body->p ? body->n : 2);
    sb_puts(&c->out, "\n");
    return c->out.failed ? fail_memory(c) : 0;
}

/* A new rule with a fixed body. */
static int simple_rule(struct ctx *c, const char *body) {
    int r = c->n_rules++;
    sb_printf(&c->out, "s%d ::= %s\n", r, body);
    return c->out.failed ? fail_memory(c) : r;
}

static int compile_ref(struct ctx *c, const json_t *s) {
    const json_t *ref = json_object_get(s, "$ref");
    if (!json_is_string(ref)) return fail(c, "$ref", "'$ref' must be a string");
    const char *r = json_string_value(ref);
    const char *kinds[] = {"#/$defs/", "#/definitions/"};
    const json_t *target = NULL;
    char key[256];
    if (!strcmp(r, "#")) {
        target = c->root;
        snprintf(key, sizeof key, "#");
    } else {
        for (int k = 0; k < 2 && !target; k++) {
            size_t pre = strlen(kinds[k]);
            if (strncmp(r, kinds[k], pre)) continue;
            /* The name, with JSON pointer escapes (~1 is /, ~0 is ~) undone. */
            char name[200];
            size_t n = 0;
            for (const char *p = r + pre; *p; p++) {
                char ch = *p;
                if (ch == '/') return fail(c, "$ref", "'$ref' %s: only \"#\", \"#/$defs/NAME\" and "
                                           "\"#/definitions/NAME\" are supported", r);
                if (ch == '~' && (p[1] == '0' || p[1] == '1')) ch = *++p == '0' ? '~' : '/';
                if (n + 1 >= sizeof name) return fail(c, "$ref", "'$ref' name too long");
                name[n++] = ch;
            }
            name[n] = '\0';
            target = json_object_get(json_object_get(c->root, k ? "definitions" : "$defs"), name);
            if (!target) return fail(c, "$ref", "'$ref' %s: no such definition", r);
            snprintf(key, sizeof key, "%s/%s", k ? "definitions" : "$defs", name);
        }
        if (!target) return fail(c, "$ref", "'$ref' %s: only \"#\", \"#/$defs/NAME\" and "
                                 "\"#/definitions/NAME\" are supported", r);
    }
    for (size_t i = 0; i < c->n_memo; i++)
        if (!strcmp(c->memo[i].ref, key)) return c->memo[i].rule;
    if (c->n_memo == c->cap_memo) {
        size_t cap = c->cap_memo ? 2 * c->cap_memo : 8;
        struct ref_memo *m = realloc(c->memo, cap * sizeof *m);
        if (!m) return fail_memory(c);
        c->memo = m;
        c->cap_memo = cap;
    }
    char *dup = strdup(key);
    if (!dup) return fail_memory(c);
    int rule = c->n_rules++;
    c->memo[c->n_memo++] = (struct ref_memo){dup, rule};
    /* The definition's errors are reported at its own path. */
    char saved[sizeof c->path];
    size_t saved_len = c->path_len;
    memcpy(saved, c->path, sizeof saved);
    c->path_len = 0;
    c->path[0] = '\0';
    if (strcmp(key, "#")) {
        char comp[256];
        snprintf(comp, sizeof comp, "%s", key);
        char *slash = strchr(comp, '/');
        if (slash) *slash = '.';
        path_push(c, comp);
    }
    int rc = compile_into(c, target, rule);
    memcpy(c->path, saved, sizeof saved);
    c->path_len = saved_len;
    return rc < 0 ? -1 : rule;
}

/* anyOf / oneOf / allOf members. */
/* Each schema of list compiled (its index on the path), its rule written
 * to body as [sep]lead s<N>after, sep before all but the first. */
static int compile_each(struct ctx *c, const json_t *list, struct sbuf *body, const char *sep, const char *lead,
                        const char *after) {
    for (size_t i = 0; i < json_array_size(list); i++) {
        size_t old_i = path_push_index(c, i);
        int r = compile(c, json_array_get(list, i));
        path_pop(c, old_i);
        if (r < 0) return -1;
        sb_printf(body, "%s%ss%d%s", i ? sep : "", lead, r, after);
    }
    return 0;
}

static int compile_union(struct ctx *c, const json_t *s, const char *k, struct sbuf *body) {
    const json_t *list = json_object_get(s, k);
    if (!json_is_array(list) || !json_array_size(list))
        return fail(c, k, "'%s' must be a non-empty array of schemas", k);
    if (!strcmp(k, "allOf") && json_array_size(list) != 1)
        return fail(c, k, "'allOf' with more than one schema is not supported");
    size_t old = path_push(c, k);
    sb_puts(body, "( ");
    if (compile_each(c, list, body, " | ", "", "") < 0) return -1;
    sb_puts(body, " )");
    path_pop(c, old);
    return 0;
}

/* The types a schema allows: 1 per entry of TYPES in allowed[]. */
static int schema_types(struct ctx *c, const json_t *s, int *allowed) {
    const json_t *t = json_object_get(s, "type");
    int any = 0;
    memset(allowed, 0, 7 * sizeof *allowed);
    if (!t) return 0;
    if (!json_is_string(t) && !json_is_array(t))
        return fail(c, "type", "'type' must be a string or an array of strings");
    for (size_t i = 0; i < (json_is_array(t) ? json_array_size(t) : 1); i++) {
        const json_t *e = json_is_array(t) ? json_array_get(t, i) : t;
        int k = 0;
        if (json_is_string(e))
            for (; TYPES[k] && strcmp(TYPES[k], json_string_value(e)); k++) {}
        if (!json_is_string(e) || !TYPES[k])
            return fail(c, "type", "'type' %s%s%s is not a JSON Schema type", json_is_string(e) ? "'" : "",
                        json_is_string(e) ? json_string_value(e) : "entry", json_is_string(e) ? "'" : "");
        allowed[k] = 1;
        any = 1;
    }
    if (!any) return fail(c, "type", "'type' is an empty list");
    return 1;
}

static int compile_enum(struct ctx *c, const json_t *s, struct sbuf *body) {
    int types[7];
    int typed = schema_types(c, s, types);
    if (typed < 0 || only_keys(c, s, (const char *const[]){"enum", "const", "type", NULL}, "enum")) return -1;
    const json_t *e = json_object_get(s, "enum"), *k = json_object_get(s, "const");
    if (e && k) return fail(c, "const", "'const' beside 'enum' is not supported");
    const char *kw = e ? "enum" : "const";
    if (e && (!json_is_array(e) || !json_array_size(e)))
        return fail(c, "enum", "'enum' must be a non-empty array");
    size_t n = e ? json_array_size(e) : 1, kept = 0;
    sb_puts(body, "( ");
    for (size_t i = 0; i < n; i++) {
        const json_t *v = e ? json_array_get(e, i) : k;
        int ok = !typed;
        for (int t = 0; typed && TYPES[t]; t++) ok |= types[t] && value_has_type(v, TYPES[t]);
        if (!ok) continue;
        struct sbuf text = {0};
        if (dump_value(c, &text, v, 0)) { free(text.p); return -1; }
        if (text.failed) { free(text.p); return fail_memory(c); }
        if (kept++) sb_puts(body, " | ");
        sb_literal(body, text.p, text.n);
        free(text.p);
    }
    sb_puts(body, " )");
    if (!kept) return fail(c, kw, "no '%s' value has the schema's type", kw);
    return 0;
}

static int compile_string(struct ctx *c, const json_t *s, struct sbuf *body) {
    const json_t *f = json_object_get(s, "format");
    long long min, max;
    if (count_keyword(c, s, "minLength", 0, MAX_LENGTH, &min) ||
        count_keyword(c, s, "maxLength", -1, MAX_LENGTH, &max))
        return -1;
    if (f) {
        if (!json_is_string(f)) return fail(c, "format", "'format' must be a string");
        const char *name = json_string_value(f);
        if (strcmp(name, "date") && strcmp(name, "time") && strcmp(name, "date-time") && strcmp(name, "uuid"))
            return fail(c, "format", "'format' \"%s\" is not supported (date, time, date-time and uuid are)",
                        name);
        if (json_object_get(s, "minLength") || json_object_get(s, "maxLength"))
            return fail(c, json_object_get(s, "minLength") ? "minLength" : "maxLength",
                        "'format' with a length bound is not supported");
        sb_printf(body, "\"\\\"\" %s \"\\\"\"", name);
        return 0;
    }
    if (max >= 0 && max < min) return fail(c, "maxLength", "'maxLength' is below 'minLength'");
    if (min == 0 && max < 0) { sb_puts(body, "string"); return 0; }
    sb_puts(body, "\"\\\"\" char");
    sb_bounds(body, min, max);
    sb_puts(body, " \"\\\"\"");
    return 0;
}

static int compile_array(struct ctx *c, const json_t *s, struct sbuf *body) {
    const json_t *items = json_object_get(s, "items"), *prefix = json_object_get(s, "prefixItems");
    long long min, max;
    if (count_keyword(c, s, "minItems", 0, MAX_ITEMS, &min) || count_keyword(c, s, "maxItems", -1, MAX_ITEMS, &max))
        return -1;
    if (max >= 0 && max < min) return fail(c, "maxItems", "'maxItems' is below 'minItems'");
    if (json_is_array(items))
        return fail(c, "items", "'items' as an array (tuples) is not supported; use 'prefixItems'");
    if (prefix) {
        if (!json_is_array(prefix) || !json_array_size(prefix))
            return fail(c, "prefixItems", "'prefixItems' must be a non-empty array of schemas");
        if ((items && !json_is_false(items)) || json_object_get(s, "minItems") || json_object_get(s, "maxItems"))
            return fail(c, "prefixItems", "'prefixItems' is supported only as an exact tuple (no 'items' "
                        "other than false, no 'minItems' or 'maxItems')");
        size_t old = path_push(c, "prefixItems");
        sb_puts(body, "\"[\" ws");
        if (compile_each(c, prefix, body, " \",\" ws", " ", " ws") < 0) return -1;
        sb_puts(body, " \"]\"");
        path_pop(c, old);
        return 0;
    }
    if (json_is_false(items)) max = 0;
    if (max == 0) {
        if (min > 0) return fail(c, "minItems", "'minItems' is above 0 but no item is allowed");
        sb_puts(body, "\"[\" ws \"]\"");
        return 0;
    }
    int item;
    if (!items || json_is_true(items)) {
        item = simple_rule(c, "value");
    } else {
        size_t old = path_push(c, "items");
        item = compile(c, items);
        path_pop(c, old);
    }
    if (item < 0) return -1;
    /* "[" ws item ws ( "," ws item ws ){min-1,max-1} "]", all but the
     * brackets optional when min is 0. */
    sb_printf(body, "\"[\" ws %ss%d ws ( \",\" ws s%d ws )", min ? "" : "( ", item, item);
    sb_bounds(body, min ? min - 1 : 0, max < 0 ? -1 : max - 1);
    sb_printf(body, "%s \"]\"", min ? "" : " )?");
    return 0;
}

static int compile_object(struct ctx *c, const json_t *s, struct sbuf *body) {
    const json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required");
    const json_t *extra = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props)) return fail(c, "properties", "'properties' must be an object");
    if (req && !json_is_array(req)) return fail(c, "required", "'required' must be an array of strings");
    if (extra && !json_is_boolean(extra) && !json_is_object(extra))
        return fail(c, "additionalProperties", "'additionalProperties' must be a boolean or a schema");
    for (size_t i = 0; req && i < json_array_size(req); i++) {
        const json_t *r = json_array_get(req, i);
        if (!json_is_string(r)) return fail(c, "required", "'required' must be an array of strings");
        if (!json_object_get(props, json_string_value(r)))
            return fail(c, "required", "required property '%s' is not in 'properties'", json_string_value(r));
    }
    size_t k = props ? json_object_size(props) : 0;
    if (k == 0) {   /* a map: no declared members */
        if (json_is_false(extra)) { sb_puts(body, "\"{\" ws \"}\""); return 0; }
        if (!extra || json_is_true(extra)) { sb_puts(body, "object"); return 0; }
        size_t old = path_push(c, "additionalProperties");
        int v = compile(c, extra);
        path_pop(c, old);
        if (v < 0) return -1;
        sb_printf(body, "\"{\" ws ( string ws \":\" ws s%d ws ( \",\" ws string ws \":\" ws s%d ws )* )? \"}\"",
                  v, v);
        return 0;
    }
    /* kv_i, then rest_k..rest_0 and first_k..first_0 (see the top of the file). */
    int *kv = malloc(3 * (k + 1) * sizeof *kv);
    if (!kv) return fail_memory(c);
    int *rest = kv + (k + 1), *first = rest + (k + 1);
    char *opt = calloc(k + 1, 1);
    if (!opt) { free(kv); return fail_memory(c); }
    const char *name;
    const json_t *sub;
    size_t i = 0;
    size_t old = path_push(c, "properties");
    json_object_foreach((json_t *)props, name, sub) {
        opt[i] = 1;
        for (size_t j = 0; req && j < json_array_size(req); j++)
            if (!strcmp(json_string_value(json_array_get(req, j)), name)) opt[i] = 0;
        size_t old_p = path_push(c, name);
        int v = compile(c, sub);
        path_pop(c, old_p);
        json_t *key = v < 0 ? NULL : json_string(name);
        char *text = key ? json_dumps(key, JSON_ENCODE_ANY) : NULL;
        json_decref(key);
        if (v < 0 || !text) {
            free(kv);
            free(opt);
            return v < 0 ? -1 : fail_memory(c);
        }
        struct sbuf b = {0};
        sb_literal(&b, text, strlen(text));
        sb_printf(&b, " ws \":\" ws s%d ws", v);
        free(text);
        kv[i] = c->n_rules++;
        int rc = emit_rule(c, kv[i], &b);
        free(b.p);
        if (rc) { free(kv); free(opt); return -1; }
        i++;
    }
    path_pop(c, old);
    rest[k] = first[k] = simple_rule(c, "\"\"");
    for (size_t j = k; j-- > 0 && rest[k] >= 0;) {
        struct sbuf b = {0};
        if (opt[j]) sb_printf(&b, "( \",\" ws s%d )? s%d", kv[j], rest[j + 1]);
        else sb_printf(&b, "\",\" ws s%d s%d", kv[j], rest[j + 1]);
        rest[j] = c->n_rules++;
        int rc = emit_rule(c, rest[j], &b);
        free(b.p);
        b = (struct sbuf){0};
        if (opt[j]) sb_printf(&b, "s%d s%d | s%d", kv[j], rest[j + 1], first[j + 1]);
        else sb_printf(&b, "s%d s%d", kv[j], rest[j + 1]);
        first[j] = c->n_rules++;
        rc |= emit_rule(c, first[j], &b);
        free(b.p);
        if (rc) { free(kv); free(opt); return -1; }
    }
    int f0 = first[0];
    free(kv);
    free(opt);
    if (f0 < 0) return -1;
    sb_printf(body, "\"{\" ws s%d \"}\"", f0);
    return 0;
}

/* The body for a schema selected by its type(s). */
static int compile_typed(struct ctx *c, const json_t *s, struct sbuf *body) {
    int types[7];
    int typed = schema_types(c, s, types);
    if (typed < 0) return -1;
    if (!typed) {   /* inferred from the keywords present; none: any value */
        types[6] = has_any(s, OBJECT_KEYS);
        types[5] = has_any(s, ARRAY_KEYS);
        types[4] = has_any(s, STRING_KEYS);
        if (!types[4] && !types[5] && !types[6]) {
            if (only_keys(c, s, (const char *const[]){NULL}, NULL)) return -1;
            sb_puts(body, "value");
            return 0;
        }
    }
    const char *allowed[16];
    int na = 0;
    allowed[na++] = "type";
    for (int i = 0; OBJECT_KEYS[i]; i++) allowed[na++] = OBJECT_KEYS[i];
    for (int i = 0; ARRAY_KEYS[i]; i++) allowed[na++] = ARRAY_KEYS[i];
    for (int i = 0; STRING_KEYS[i]; i++) allowed[na++] = STRING_KEYS[i];
    allowed[na] = NULL;
    if (only_keys(c, s, allowed, NULL)) return -1;
    int n = 0;
    sb_puts(body, "( ");
    for (int t = 0; TYPES[t]; t++) {
        if (!types[t]) continue;
        if (n++) sb_puts(body, " | ");
        int rc = 0;
        switch (t) {
        case 0: sb_puts(body, "\"null\""); break;
        case 1: sb_puts(body, "boolean"); break;
        case 2: sb_puts(body, "integer"); break;
        case 3: sb_puts(body, "number"); break;
        case 4: rc = compile_string(c, s, body); break;
        case 5: rc = compile_array(c, s, body); break;
        case 6: rc = compile_object(c, s, body); break;
        }
        if (rc) return -1;
    }
    sb_puts(body, " )");
    return 0;
}

/* Builds s's body and appends "s<rule> ::= body". */
static int compile_into(struct ctx *c, const json_t *s, int rule) {
    if (++c->depth > MAX_DEPTH) return fail(c, NULL, "schema nested over %d deep", MAX_DEPTH);
    struct sbuf body = {0};
    int rc;
    if (json_is_true(s) || (json_is_object(s) && json_object_size(s) == 0)) {
        sb_puts(&body, "value");
        rc = 0;
    } else if (json_is_false(s)) {
        rc = fail(c, NULL, "the schema false matches nothing");
    } else if (!json_is_object(s)) {
        rc = fail(c, NULL, "a schema must be an object or a boolean");
    } else if (json_object_get(s, "$ref")) {
        rc = only_keys(c, s, (const char *const[]){"$ref", NULL}, "$ref");
        int r = rc ? -1 : compile_ref(c, s);
        if (r >= 0) sb_printf(&body, "s%d", r);
        rc = r < 0 ? -1 : 0;
    } else if (json_object_get(s, "anyOf") || json_object_get(s, "oneOf") || json_object_get(s, "allOf")) {
        const char *k = json_object_get(s, "anyOf") ? "anyOf" : json_object_get(s, "oneOf") ? "oneOf" : "allOf";
        rc = only_keys(c, s, (const char *const[]){k, NULL}, k);
        if (!rc) rc = compile_union(c, s, k, &body);
    } else if (json_object_get(s, "enum") || json_object_get(s, "const")) {
        rc = compile_enum(c, s, &body);
    } else {
        rc = compile_typed(c, s, &body);
    }
    if (!rc) rc = emit_rule(c, rule, &body);
    free(body.p);
    c->depth--;
    return rc;
}

static int compile(struct ctx *c, const json_t *s) {
    int rule = c->n_rules++;
    return compile_into(c, s, rule) ? -1 : rule;
}

char *json_schema_to_gbnf(const json_t *schema, char *err, size_t errlen, char *err_path, size_t pathlen) {
    return json_schema_to_gbnf_under(schema, "root ::= s0\n", err, errlen, err_path, pathlen);
}

char *json_schema_to_gbnf_under(const json_t *schema, const char *root_rules, char *err, size_t errlen,
                                char *err_path, size_t pathlen) {
    struct ctx c = {.root = schema, .err = err, .errlen = errlen, .err_path = err_path, .pathlen = pathlen};
    if (err && errlen) err[0] = '\0';
    if (err_path && pathlen) err_path[0] = '\0';
    char *result = NULL;
    c.memo = malloc(sizeof *c.memo);
    if (!c.memo) { fail_memory(&c); goto done; }
    c.n_memo = c.cap_memo = 1;
    c.memo[0] = (struct ref_memo){strdup("#"), 0};   /* the root is rule s0 */
    if (!c.memo[0].ref) { fail_memory(&c); goto done; }
    sb_puts(&c.out, root_rules);
    if (compile(&c, schema) < 0) goto done;
    sb_puts(&c.out, PRIMITIVES);
    if (c.out.failed) { fail_memory(&c); goto done; }
    /* What is returned must compile. */
    char gerr[256];
    struct grammar *g = grammar_parse(c.out.p, c.out.n, gerr, sizeof gerr);
    if (!g) {
        fail(&c, NULL, "the schema's grammar is refused (%s)", strstr(gerr, "left recursion")
                                                                  ? "a $ref cycle that consumes no input"
                                                                  : gerr);
        goto done;
    }
    grammar_free(g);
    result = c.out.p;
    c.out.p = NULL;
done:
    for (size_t i = 0; i < c.n_memo; i++) free(c.memo[i].ref);
    free(c.memo);
    free(c.out.p);
    return result;
}
