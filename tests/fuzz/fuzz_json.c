/* Fuzz target: request decoding for every route that reads a body or a path
 * parameter. Byte 0 picks the route (its value mod 8), the rest is the body:
 *   0 POST /v1/completions      openai_parse_completion
 *   1 POST /v1/chat/completions openai_parse_chat
 *   2 POST /tokenize            openai_parse_tokenize
 *   3 POST /detokenize          openai_parse_detokenize
 *   4 PUT /admin/memory         admin_parse_memory
 *   5 POST /admin/models        admin_parse_model_add
 *   6 path parameters: the rest is a request path; http_path_segment under
 *     /admin/models/ and /v1/models/, catalog_name_check on the segment, and
 *     oai_parse_id on what follows /v1/requests/
 *   7 the OpenAI parsers in turn on the same body (POST /v1/embeddings,
 *     openai_parse_embedding, among them)
 * A parsed request is checked against what openai.h promises (ranges,
 * NUL-terminated texts of the stated length, bounded counts), and its texts
 * are fed through the response builders as if generated: every response
 * and stream event must be valid JSON. A refusal must be a 400 (or 503)
 * with a message that encodes as JSON. */
#include <jansson.h>
#include <string.h>

#include "server/admin_body.h"
#include "server/http.h"
#include "server/openai.h"
#include "storage/catalog.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

static void check_json(const char *text, size_t len) {
    FUZZ_ASSERT(text);
    json_error_t je;
    json_t *j = json_loadb(text, len, 0, &je);
    if (!j) fprintf(stderr, "not JSON (%s): %.*s\n", je.text, (int)(len > 400 ? 400 : len), text);
    FUZZ_ASSERT(j);
    json_decref(j);
}

/* Each "data: ...\n\n" event of an SSE text is JSON (or [DONE]). */
static void check_sse(const char *text, size_t len) {
    FUZZ_ASSERT(text);
    FUZZ_ASSERT(strlen(text) == len);
    const char *p = text, *end = text + len;
    while (p < end) {
        FUZZ_ASSERT(!strncmp(p, "data: ", 6));
        const char *stop = strstr(p, "\n\n");
        FUZZ_ASSERT(stop);
        if (strncmp(p + 6, "[DONE]", 6)) check_json(p + 6, (size_t)(stop - p - 6));
        p = stop + 2;
    }
}

static void check_error(const struct oai_error *e) {
    FUZZ_ASSERT(e->status == 400 || e->status == 503);
    FUZZ_ASSERT(e->message[0]);
    FUZZ_ASSERT(memchr(e->type, 0, sizeof e->type) && memchr(e->param, 0, sizeof e->param));
    FUZZ_ASSERT(memchr(e->message, 0, sizeof e->message));
    /* openai.h: the message is valid UTF-8, so it goes into JSON as it is. */
    json_t *s = json_string(e->message);
    FUZZ_ASSERT(s);
    json_decref(s);
    size_t n;
    char *ev = oai_stream_error(e, &n);
    check_sse(ev, n);
    free(ev);
}

/* The request's texts go through a choice as generated text and tokens. */
static void respond_with(const struct oai_request *r, const char *text, size_t len) {
    const enum oai_kind kind = r->kind == OAI_CHAT ? OAI_CHAT : OAI_COMPLETION;
    struct oai_meta meta = {.kind = kind, .id = "cmpl-1", .model = r->model, .created = 1,
                            .include_usage = r->include_usage};
    struct oai_choice c;
    oai_choice_init(&c, 0, r->logprobs, 0, 1 << 16);
    size_t n;
    char *ev = oai_stream_chunk(&meta, &c, &n);   /* the first event, before any text */
    check_sse(ev, n);
    free(ev);
    for (size_t off = 0; off < len;) {
        size_t piece = len - off < 3 ? len - off : 3;   /* splits UTF-8 characters on purpose */
        if (oai_choice_add_token(&c, text + off, piece, -0.5f, NULL, 0)) break;
        if (oai_choice_add_text(&c, text + off, piece)) break;
        off += piece;
        if ((off / 3) % 4 == 0) {
            ev = oai_stream_chunk(&meta, &c, &n);
            check_sse(ev, n);
            free(ev);
        }
    }
    c.finish = FINISH_STOP;
    ev = oai_stream_chunk(&meta, &c, &n);
    check_sse(ev, n);
    free(ev);
    struct oai_usage u = {.prompt_tokens = 3, .completion_tokens = 4};
    ev = oai_stream_usage(&meta, &u, &n);
    check_sse(ev, n);
    free(ev);

    struct oai_choice whole;
    oai_choice_init(&whole, 0, r->logprobs, 0, 1 << 16);
    oai_choice_add_text(&whole, text, len);
    oai_choice_add_token(&whole, text, len, -1.0f, NULL, 0);
    whole.finish = FINISH_LENGTH;
    char *body = oai_response(&meta, &whole, 1, &u, &n);
    check_json(body, n);
    free(body);
    body = oai_detokenize_response(text, len, &n);
    check_json(body, n);
    free(body);
    oai_choice_free(&whole);
    oai_choice_free(&c);
}

static void check_request(const struct oai_request *r) {
    FUZZ_ASSERT(strlen(r->model) <= OAI_MAX_MODEL_NAME);
    FUZZ_ASSERT(r->n >= 1 && r->n <= OAI_MAX_N);
    if (r->kind == OAI_COMPLETION || r->kind == OAI_CHAT) FUZZ_ASSERT(r->max_tokens >= 1 || r->max_tokens == -1);
    FUZZ_ASSERT(r->temperature >= 0 && r->temperature <= 2);
    FUZZ_ASSERT(r->top_p > 0 && r->top_p <= 1);
    FUZZ_ASSERT(r->top_k == 0 || r->top_k == -1 || r->top_k > 0);
    FUZZ_ASSERT(r->min_p >= 0 && r->min_p <= 1);
    FUZZ_ASSERT(r->repetition_penalty > 0 && r->repetition_penalty <= 100);
    FUZZ_ASSERT(r->n_stops >= 0 && r->n_stops <= OAI_MAX_STOPS);
    for (int i = 0; i < r->n_stops; i++) {
        size_t len = strlen(r->stops[i]);
        FUZZ_ASSERT(len > 0 && len <= OAI_MAX_STOP_BYTES);
    }
    FUZZ_ASSERT(r->n_prompts >= 0 && r->n_prompts <= OAI_MAX_PROMPTS);
    FUZZ_ASSERT(r->n_messages >= 0 && r->n_messages <= OAI_MAX_MESSAGES);
    switch (r->kind) {
    case OAI_COMPLETION: FUZZ_ASSERT(r->n_prompts >= 1); break;
    case OAI_CHAT: FUZZ_ASSERT(r->n_messages >= 1 && r->n_prompts == 0); break;
    case OAI_TOKENIZE: FUZZ_ASSERT((r->n_prompts == 1) != (r->n_messages > 0)); break;
    case OAI_DETOKENIZE: FUZZ_ASSERT(r->n_prompts == 1 && !r->prompts[0].text); break;
    case OAI_EMBEDDING: FUZZ_ASSERT(r->n_prompts >= 1); break;
    }
    long total_ids = 0;
    for (int i = 0; i < r->n_prompts; i++) {
        const struct oai_prompt *p = &r->prompts[i];
        if (r->kind != OAI_DETOKENIZE) FUZZ_ASSERT(!p->text != !p->tokens || (!p->text && p->n_tokens == 0));
        if (p->text) {
            FUZZ_ASSERT(strlen(p->text) == p->text_len);
            json_t *s = json_stringn(p->text, p->text_len);   /* valid UTF-8 */
            FUZZ_ASSERT(s);
            json_decref(s);
        }
        FUZZ_ASSERT(p->n_tokens >= 0);
        for (int k = 0; k < p->n_tokens; k++) FUZZ_ASSERT(p->tokens[k] >= 0);
        total_ids += p->n_tokens;
    }
    FUZZ_ASSERT(total_ids <= OAI_MAX_TOKEN_IDS);
    for (int i = 0; i < r->n_messages; i++) {
        const struct oai_message *m = &r->messages[i];
        FUZZ_ASSERT(m->content && strlen(m->content) == m->content_len);
        FUZZ_ASSERT(oai_role_name(m->role) != NULL);
    }
    if (r->kind == OAI_COMPLETION || r->kind == OAI_CHAT) {
        const int choices = oai_n_choices(r);
        FUZZ_ASSERT(choices == (r->kind == OAI_CHAT ? r->n : r->n * r->n_prompts));
    }
    struct oai_error e;
    if (oai_check_token_ids(r, 49152, &e)) check_error(&e);
}

typedef int (*parse_fn)(const char *, size_t, struct oai_request *, struct oai_error *);

static void openai_route(parse_fn parse, const char *body, size_t len) {
    struct oai_request r;
    struct oai_error e;
    if (parse(body, len, &r, &e)) {
        check_error(&e);
        oai_request_free(&r);   /* harmless after a failure (openai.h) */
        return;
    }
    check_request(&r);
    for (int i = 0; i < r.n_prompts; i++) {
        const struct oai_prompt *p = &r.prompts[i];
        if (p->text) respond_with(&r, p->text, p->text_len);
        if (p->n_tokens) {
            size_t n;
            char *body_out = oai_tokenize_response(p->tokens, p->n_tokens, 2048, NULL, NULL, &n);
            check_json(body_out, n);
            free(body_out);
        }
    }
    for (int i = 0; i < r.n_messages; i++) respond_with(&r, r.messages[i].content, r.messages[i].content_len);
    for (int i = 0; i < r.n_stops; i++) respond_with(&r, r.stops[i], strlen(r.stops[i]));
    oai_request_free(&r);
}

static void check_admin_error(const struct admin_body_error *e) {
    FUZZ_ASSERT(e->message[0] && memchr(e->message, 0, sizeof e->message) && memchr(e->param, 0, sizeof e->param));
    /* What routes_admin.c sends: it must encode even when the message quotes
     * a key cut in the middle of a character. */
    size_t n;
    char *text = http_error_json("invalid_request_error", e->message, *e->param ? e->param : NULL, NULL, &n);
    check_json(text, n);
    free(text);
}

static int valid_name(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > CATALOG_NAME_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        const char c = s[i];
        const int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || !strchr("._-:+", c))) return 0;
    }
    return 1;
}

static void path_route(const char *path) {
    struct http_request req = {.method = "DELETE", .path = path, .query = "", .body = ""};
    char seg[256], err[256];
    static const char *const prefixes[] = {"/admin/models/", "/v1/models/"};
    for (int i = 0; i < 2; i++) {
        if (http_path_segment(&req, prefixes[i], seg, sizeof seg)) continue;
        const size_t plen = strlen(prefixes[i]);
        FUZZ_ASSERT(!strncmp(path, prefixes[i], plen) && !strchr(path + plen, '/'));
        FUZZ_ASSERT(strlen(seg) < sizeof seg);
        FUZZ_ASSERT(strlen(seg) <= strlen(path + plen));   /* decoding only shortens */
        const int ok = !catalog_name_check(seg, err, sizeof err);
        FUZZ_ASSERT(ok == valid_name(seg));
    }
    const char *tail = !strncmp(path, "/v1/requests/", 13) ? path + 13 : path;
    uint64_t id;
    if (!oai_parse_id(tail, &id)) {
        char again[64];
        uint64_t id2;
        oai_format_id(again, sizeof again, OAI_CHAT, id);
        FUZZ_ASSERT(!oai_parse_id(again, &id2) && id2 == id);
        oai_format_id(again, sizeof again, OAI_COMPLETION, id);
        FUZZ_ASSERT(!oai_parse_id(again, &id2) && id2 == id);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const unsigned route = data[0] & 7;
    /* A copy without a terminator: a parser reading past `len` is caught. */
    const size_t len = size - 1;
    char *body = malloc(len ? len : 1);
    if (!body) return 0;
    memcpy(body, data + 1, len);
    static const parse_fn parsers[] = {openai_parse_completion, openai_parse_chat, openai_parse_tokenize,
                                       openai_parse_detokenize, openai_parse_embedding};
    switch (route) {
    case 0: case 1: case 2: case 3:
        openai_route(parsers[route], body, len);
        break;
    case 4: {
        struct memory_policy p;
        const char *key;
        struct admin_body_error e;
        if (admin_parse_memory(body, len, 1u << 20, &p, &key, &e)) {
            check_admin_error(&e);
        } else {
            FUZZ_ASSERT(p.bytes <= (uint64_t)INT64_MAX && p.reserve_bytes <= (uint64_t)INT64_MAX);
            FUZZ_ASSERT(!p.automatic || p.bytes == 0);
            FUZZ_ASSERT(!strcmp(key, "budget") || !strcmp(key, "memory_budget_bytes"));
        }
        break;
    }
    case 5: {
        char path[4096], name[CATALOG_NAME_MAX + 1];
        struct admin_body_error e;
        if (admin_parse_model_add(body, len, path, sizeof path, name, sizeof name, &e)) {
            check_admin_error(&e);
        } else {
            FUZZ_ASSERT(path[0] && strlen(path) < sizeof path);
            FUZZ_ASSERT(!name[0] || valid_name(name));
        }
        break;
    }
    case 6: {
        char *path = malloc(len + 1);   /* a path is NUL-terminated (http.c) */
        if (path) {
            memcpy(path, body, len);
            path[len] = 0;
            path_route(path);
            free(path);
        }
        break;
    }
    default:
        for (size_t i = 0; i < sizeof parsers / sizeof parsers[0]; i++) openai_route(parsers[i], body, len);
        break;
    }
    free(body);
    return 0;
}
