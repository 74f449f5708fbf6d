/* Tool calling's format, grammar and output parsing; the design is in tools.h. */
#include "server/tools.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/json_schema.h"
#include "storage/error.h"

static const char CALL_OPEN[] = "<tool_call>\n";
static const char CALL_CLOSE[] = "\n</tool_call>";
#define CALL_OPEN_LEN (sizeof CALL_OPEN - 1)
#define CALL_CLOSE_LEN (sizeof CALL_CLOSE - 1)

/* ------------------------------------------------------------ the grammar */

/* Rewrites every "$ref" under v that points into the tool's own schema
 * ("#", "#/$defs/X", "#/definitions/X") to the renamed copy in the
 * combined schema's $defs. */
static int rewrite_refs(json_t *v, int tool) {
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (rewrite_refs(json_array_get(v, i), tool)) return -1;
        return 0;
    }
    if (!json_is_object(v)) return 0;
    const char *k;
    json_t *e;
    json_object_foreach(v, k, e) {
        if (!strcmp(k, "$ref") && json_is_string(e)) {
            const char *ref = json_string_value(e), *name = NULL;
            char renamed[512];
            if (!strcmp(ref, "#")) name = "";
            else if (!strncmp(ref, "#/$defs/", 8)) name = ref + 8;
            else if (!strncmp(ref, "#/definitions/", 14)) name = ref + 14;
            if (!name) continue;   /* refused, with its path, by the compiler */
            snprintf(renamed, sizeof renamed, "#/$defs/t%d%s%s", tool, *name ? "-" : "", name);
            if (json_string_set(e, renamed)) return -1;
        } else if (rewrite_refs(e, tool)) {
            return -1;
        }
    }
    return 0;
}

/* Tool i's parameters, and its $defs, into the combined schema's $defs as
 * "t<i>" and "t<i>-NAME". */
static int hoist(json_t *defs, const struct oai_tool *t, int i) {
    json_t *params = json_loads(t->parameters, 0, NULL);
    if (!params) return -1;
    int rc = rewrite_refs(params, i);
    char key[512];
    for (int pass = 0; pass < 2 && !rc; pass++) {
        json_t *own = json_object_get(params, pass ? "definitions" : "$defs");
        const char *k;
        json_t *e;
        json_object_foreach(own, k, e) {
            snprintf(key, sizeof key, "t%d-%s", i, k);
            if (json_object_set(defs, key, e)) rc = -1;
        }
        json_object_del(params, pass ? "definitions" : "$defs");
    }
    snprintf(key, sizeof key, "t%d", i);
    if (!rc && json_object_set(defs, key, params)) rc = -1;
    json_decref(params);
    return rc;
}

/* {"type":"object","properties":{"name":{"const":NAME},"arguments":{"$ref":"#/$defs/t<i>"}},...} */
static json_t *call_schema(const struct oai_tool *t, int i) {
    char ref[64];
    snprintf(ref, sizeof ref, "#/$defs/t%d", i);
    return json_pack("{s:s, s:{s:{s:s}, s:{s:s}}, s:[s,s], s:b}", "type", "object", "properties", "name", "const",
                     t->name, "arguments", "$ref", ref, "required", "name", "arguments", "additionalProperties", 0);
}

/* "$defs.t3-Foo.x" -> "tools[3].function.parameters.$defs.Foo.x"; other
 * paths are left as they are. */
static void tool_path(char *path, size_t len) {
    int tool, used = 0;
    if (len == 0 || sscanf(path, "$defs.t%d%n", &tool, &used) != 1) return;
    const char *rest = path + used;
    char out[512];
    if (*rest == '-')
        snprintf(out, sizeof out, "tools[%d].function.parameters.$defs.%s", tool, rest + 1);
    else
        snprintf(out, sizeof out, "tools[%d].function.parameters%s", tool, rest);
    snprintf(path, len, "%s", out);
}

char *tools_gbnf(const struct oai_tool *tools, int n, enum tool_choice choice, int named, bool parallel,
                 char *err, size_t errlen, char *err_path, size_t pathlen) {
    json_t *schema = json_object(), *defs = json_object(), *any = json_array();
    int rc = !schema || !defs || !any;
    for (int i = 0; i < n && !rc; i++) {
        if (choice == TOOL_CHOICE_NAMED && i != named) continue;
        rc = hoist(defs, &tools[i], i) || json_array_append_new(any, call_schema(&tools[i], i));
    }
    rc = rc || json_object_set(schema, "$defs", defs) || json_object_set(schema, "anyOf", any);
    json_decref(defs);
    json_decref(any);
    if (rc) {
        json_decref(schema);
        errf(err, errlen, "out of memory building the tools' grammar");
        return NULL;
    }
    char root[512];
    const char *text = "tool-text ::= ( [^<] .* )?\n";
    const char *calls = parallel ? "tool-calls ::= tool-call ( \"\\n\" tool-call ){0,15}\n"
                                 : "tool-calls ::= tool-call\n";
    const char *top = choice == TOOL_CHOICE_NONE   ? "root ::= tool-text\n"
                      : choice == TOOL_CHOICE_AUTO ? "root ::= tool-calls | tool-text\n"
                                                   : "root ::= tool-calls\n";
    snprintf(root, sizeof root, "%s%s%stool-call ::= \"<tool_call>\\n\" s0 \"\\n</tool_call>\"\n", top, calls, text);
    char *gbnf = json_schema_to_gbnf_under(schema, root, err, errlen, err_path, pathlen);
    json_decref(schema);
    if (!gbnf && err_path) tool_path(err_path, pathlen);
    return gbnf;
}

/* ------------------------------------------------------------ rendering */

char *tools_system_block(const struct oai_tool *tools, int n) {
    json_t *list = json_array();
    for (int i = 0; list && i < n; i++) {
        json_t *params = json_loads(tools[i].parameters, 0, NULL);
        json_t *t = json_pack("{s:s, s:s, s:o}", "name", tools[i].name, "description", tools[i].description,
                              "parameters", params ? params : json_object());
        if (!t || json_array_append_new(list, t)) {
            json_decref(list);
            return NULL;
        }
    }
    char *lines = NULL;
    size_t len = 0;
    for (size_t i = 0; list && i < json_array_size(list); i++) {
        char *one = json_dumps(json_array_get(list, i), JSON_COMPACT | JSON_PRESERVE_ORDER);
        char *grown = one ? realloc(lines, len + strlen(one) + 2) : NULL;
        if (!grown) {
            free(one);
            free(lines);
            json_decref(list);
            return NULL;
        }
        lines = grown;
        memcpy(lines + len, one, strlen(one));
        len += strlen(one);
        lines[len++] = '\n';
        lines[len] = '\0';
        free(one);
    }
    json_decref(list);
    static const char head[] =
        "You can call functions (tools) to answer. They are described here, one JSON object per line:\n"
        "<tools>\n";
    static const char tail[] =
        "</tools>\n"
        "To call one, reply with its name and arguments as JSON inside tags, and nothing else:\n"
        "<tool_call>\n"
        "{\"name\": \"<function name>\", \"arguments\": {<the arguments>}}\n"
        "</tool_call>\n"
        "Results come back in <tool_response> tags. If no tool is needed, answer in plain text.";
    size_t total = sizeof head + len + sizeof tail;
    char *out = malloc(total);
    if (out) snprintf(out, total, "%s%s%s", head, lines ? lines : "", tail);
    free(lines);
    return out;
}

char *tools_render_call(const char *name, const char *arguments) {
    json_t *args = json_loads(arguments, JSON_DECODE_ANY, NULL);
    if (!args) args = json_string(arguments);   /* not JSON: kept as the text it is */
    json_t *call = args ? json_pack("{s:s, s:o}", "name", name, "arguments", args) : NULL;
    char *js = call ? json_dumps(call, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(call);
    if (!js) return NULL;
    size_t total = CALL_OPEN_LEN + strlen(js) + CALL_CLOSE_LEN + 1;
    char *out = malloc(total);
    if (out) snprintf(out, total, "%s%s%s", CALL_OPEN, js, CALL_CLOSE);
    free(js);
    return out;
}

char *tools_render_response(const char *content, size_t len) {
    static const char open[] = "<tool_response>\n", close[] = "\n</tool_response>";
    char *out = malloc(sizeof open + len + sizeof close);
    if (!out) return NULL;
    memcpy(out, open, sizeof open - 1);
    memcpy(out + sizeof open - 1, content, len);
    memcpy(out + sizeof open - 1 + len, close, sizeof close);
    return out;
}

/* ------------------------------------------------------------ output */

bool tools_text_is_call(const char *text, size_t len) {
    return len > 0 && text[0] == '<';   /* the grammar lets nothing else start with '<' */
}

static size_t skip_ws(const char *s, size_t i, size_t end) {
    while (i < end && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    return i;
}

/* In the call whose JSON starts at `start`: the name (when its closing
 * quote has arrived) and where the arguments' text starts (0 until the
 * colon after "arguments" and the whitespace after it are in). The grammar
 * fixes the shape: {ws "name" ws : ws "NAME" ws , ws "arguments" ws : ws ARGS ws }. */
static void call_head(const char *s, size_t start, size_t len, char name[65], size_t *args_start) {
    name[0] = '\0';
    *args_start = 0;
    size_t i = skip_ws(s, start + 1, len);
    if (i + 6 > len || memcmp(s + i, "\"name\"", 6)) return;
    i = skip_ws(s, i + 6, len);
    if (i >= len || s[i] != ':') return;
    i = skip_ws(s, i + 1, len);
    if (i >= len || s[i] != '"') return;
    const char *q = memchr(s + i + 1, '"', len - i - 1);
    if (!q || (size_t)(q - (s + i + 1)) > 64) return;
    const size_t n = (size_t)(q - (s + i + 1));
    memcpy(name, s + i + 1, n);
    name[n] = '\0';
    i = skip_ws(s, (size_t)(q - s) + 1, len);
    if (i >= len || s[i] != ',') return;
    i = skip_ws(s, i + 1, len);
    if (i + 11 > len || memcmp(s + i, "\"arguments\"", 11)) return;
    i = skip_ws(s, i + 11, len);
    if (i >= len || s[i] != ':') return;
    i = skip_ws(s, i + 1, len);
    if (i < len) *args_start = i;
}

/* Where the closing tag of the call block starting at `at` begins, or 0. */
static size_t find_close(const char *s, size_t at, size_t len) {
    for (size_t i = at; i + CALL_CLOSE_LEN <= len; i++)
        if (!memcmp(s + i, CALL_CLOSE, CALL_CLOSE_LEN)) return i;
    return 0;
}

/* The arguments' end in a complete call: before the object's closing brace
 * and the whitespace ahead of it. */
static size_t args_end(const char *s, size_t args_start, size_t close) {
    size_t e = close;
    while (e > args_start && s[e - 1] != '}') e--;   /* the call object's brace */
    if (e > args_start) e--;
    while (e > args_start && (s[e - 1] == ' ' || s[e - 1] == '\n' || s[e - 1] == '\t')) e--;
    return e;
}

int tools_parse_calls(const char *text, size_t len, struct tool_call *calls, int max) {
    int n = 0;
    size_t at = 0;
    /* A block cut short (max_tokens) ends the list: the calls before it
     * are complete and are returned. */
    while (at < len) {
        if (n == max || len - at < CALL_OPEN_LEN || memcmp(text + at, CALL_OPEN, CALL_OPEN_LEN)) break;
        const size_t start = at + CALL_OPEN_LEN, close = find_close(text, start, len);
        if (!close) break;
        json_error_t je;
        json_t *obj = json_loadb(text + start, close - start, 0, &je);
        const int ok = json_is_object(obj) && json_is_string(json_object_get(obj, "name")) &&
                       json_object_get(obj, "arguments");
        json_decref(obj);
        if (!ok) break;
        call_head(text, start, close, calls[n].name, &calls[n].args_start);
        if (!calls[n].args_start) break;
        calls[n].args_end = args_end(text, calls[n].args_start, close);
        n++;
        at = close + CALL_CLOSE_LEN;
        if (at < len && text[at] == '\n') at++;
    }
    return n > 0 ? n : -1;
}

/* What a call's text may still end with after its arguments: whitespace
 * (a newline and up to 20 spaces or tabs, json_schema.h's bound), the call
 * object's "}", and the closing tag. Argument bytes closer than this to the
 * end of an unfinished block are held back. */
#define HOLD_BACK (1 + 21 + 1 + CALL_CLOSE_LEN)

/* Back to a character boundary, so a fragment never splits UTF-8. */
static size_t char_boundary(const char *s, size_t i, size_t floor) {
    while (i > floor && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    return i;
}

int tool_stream_feed(struct tool_stream *s, const char *text, size_t len, bool final, tool_name_fn on_name,
                     tool_args_fn on_args, void *ud) {
    for (;;) {
        if (s->scanned > 0 && s->scanned < len && text[s->scanned] == '\n') s->scanned++;   /* between calls */
        const size_t block = s->scanned;
        if (len < block + CALL_OPEN_LEN || memcmp(text + block, CALL_OPEN, CALL_OPEN_LEN)) return 0;
        const size_t start = block + CALL_OPEN_LEN;
        char name[65];
        size_t args_start;
        call_head(text, start, len, name, &args_start);
        if (!s->announced) {
            if (!name[0]) return 0;
            s->announced = true;
            s->args_sent = 0;
            int rc = on_name(ud, s->calls++, name);
            if (rc) return rc;
        }
        if (!args_start) return 0;
        const size_t close = find_close(text, start, len);
        size_t end;
        if (close) end = args_end(text, args_start, close);
        else if (final) end = len;
        else end = len > args_start + HOLD_BACK ? char_boundary(text, len - HOLD_BACK, args_start) : args_start;
        const size_t from = args_start + s->args_sent;
        if (end > from) {
            int rc = on_args(ud, s->calls - 1, text + from, end - from);
            if (rc) return rc;
            s->args_sent = end - args_start;
        }
        if (!close) return 0;
        s->scanned = close + CALL_CLOSE_LEN;
        s->announced = false;
    }
}
