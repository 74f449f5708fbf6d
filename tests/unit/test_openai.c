/* The OpenAI request parsers and response builders.
 *
 * Parsing: every accepted shape is checked field by field against the
 * values written in the test body, and every refusal for its status, the
 * `param` it names and a phrase of its message. Byte-level input problems
 * (invalid UTF-8 in values and keys, overlong forms, UTF-8-encoded
 * surrogates, NUL escaped or raw, duplicate keys, nesting 100000 deep,
 * integers beyond int64) are fed to the real parser to confirm that jansson
 * refuses them and that we report them clearly.
 *
 * Responses: built JSON is parsed back with jansson and checked field by
 * field; SSE framing is compared byte for byte with event text written out
 * here by hand from OpenAI's documented chunk shapes (not produced by the
 * code under test); text_offset values and token byte lists are worked out
 * by hand from the pieces used.
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/draft.h"
#include "server/completion.h"
#include "server/openai.h"
#include "tests/unit/check.h"

/* ------------------------------------------------------------------ helpers */

static int parse(enum oai_kind kind, const char *body, size_t len, struct oai_request *r, struct oai_error *e) {
    switch (kind) {
    case OAI_COMPLETION: return openai_parse_completion(body, len, r, e);
    case OAI_CHAT: return openai_parse_chat(body, len, r, e);
    case OAI_TOKENIZE: return openai_parse_tokenize(body, len, r, e);
    default: return openai_parse_detokenize(body, len, r, e);
    }
}

/* True when s is valid UTF-8: jansson refuses to make a string otherwise. */
static int is_utf8(const char *s) {
    json_t *j = json_string(s);
    int ok = j != NULL;
    json_decref(j);
    return ok;
}

/* Parses body expecting a refusal with this status, param ("" for none) and
 * a message containing needle. */
static void expect_err_(int line, enum oai_kind kind, const char *body, size_t len, int status, const char *param,
                        const char *needle) {
    struct oai_request r;
    struct oai_error e;
    int rc = parse(kind, body, len, &r, &e);
    CHECK_MSG(rc == -1, "line %d: accepted: %.200s", line, body);
    if (rc != -1) {
        oai_request_free(&r);
        return;
    }
    CHECK_MSG(e.status == status, "line %d: status %d, want %d (%s)", line, e.status, status, e.message);
    CHECK_MSG(!strcmp(e.param, param), "line %d: param '%s', want '%s' (%s)", line, e.param, param, e.message);
    CHECK_MSG(strstr(e.message, needle) != NULL, "line %d: message '%s' lacks '%s'", line, e.message, needle);
    CHECK_MSG(!strcmp(e.type, status == 400 ? "invalid_request_error" : "server_error"), "line %d: type %s", line,
              e.type);
    CHECK_MSG(is_utf8(e.message) && is_utf8(e.param), "line %d: error text is not valid UTF-8", line);
    /* after a refusal the request holds nothing (freeing again is harmless) */
    CHECK(r.prompts == NULL && r.messages == NULL && r.stops == NULL);
    oai_request_free(&r);
}
#define ERR(kind, body, param, needle) expect_err_(__LINE__, kind, body, strlen(body), 400, param, needle)
#define ERRN(kind, body, len, param, needle) expect_err_(__LINE__, kind, body, len, 400, param, needle)

static int parse_ok_(int line, enum oai_kind kind, const char *body, struct oai_request *r) {
    struct oai_error e;
    int rc = parse(kind, body, strlen(body), r, &e);
    CHECK_MSG(rc == 0, "line %d: refused (%d %s: %s): %.200s", line, e.status, e.param, e.message, body);
    return rc;
}
#define OK(kind, body, r) parse_ok_(__LINE__, kind, body, r)

/* A growing string for building big bodies. */
struct sb {
    char *s;
    size_t len, cap;
};
static void sb_add(struct sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (b->len + (size_t)n + 1 > b->cap) {
        b->cap = (b->len + (size_t)n + 1) * 2;
        b->s = realloc(b->s, b->cap);
        if (!b->s) abort();
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* ------------------------------------------------------------------ body-level */

static void test_body_level(void) {
    const enum oai_kind kinds[] = {OAI_COMPLETION, OAI_CHAT, OAI_TOKENIZE, OAI_DETOKENIZE};
    for (int k = 0; k < 4; k++) {
        ERRN(kinds[k], "", 0, "", "request body is empty");
        ERR(kinds[k], " \r\n\t ", "", "request body is empty");
        ERR(kinds[k], "[1,2]", "", "request body must be a JSON object, got an array");
        ERR(kinds[k], "\"hi\"", "", "must be a JSON object, got a string");
        ERR(kinds[k], "42", "", "must be a JSON object, got 42");
        ERR(kinds[k], "null", "", "must be a JSON object, got null");
    }
    struct oai_request r;
    struct oai_error e;
    CHECK(openai_parse_completion(NULL, 0, &r, &e) == -1 && e.status == 400);

    ERR(OAI_COMPLETION, "{\"prompt\": \"a\"", "", "request body is not valid JSON: ");
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\"", "", "at line 1 column");
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\",\n \"max_tokens\": }", "", "at line 2 column");
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\"} trailing", "", "not valid JSON");
    ERR(OAI_COMPLETION, "{'prompt': 'a'}", "", "not valid JSON");
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\", \"prompt\": \"b\"}", "", "duplicate");
    /* an integer beyond int64 is refused by the JSON reader itself */
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\", \"seed\": 18446744073709551616}", "", "too big integer");

    /* invalid UTF-8: a stray byte, a truncated sequence, an overlong '/',
     * a UTF-8-encoded surrogate; in a value and in a key */
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\xff\"}", "", "request body is not valid UTF-8");
    ERR(OAI_COMPLETION, "{\"prompt\": \"\xc3\"}", "", "not valid UTF-8");
    ERR(OAI_COMPLETION, "{\"prompt\": \"\xc0\xaf\"}", "", "not valid UTF-8");
    ERR(OAI_COMPLETION, "{\"prompt\": \"\xed\xa0\x80\"}", "", "not valid UTF-8");
    ERR(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"\xf5\x80\x80\x80\"}]}", "", "not valid UTF-8");
    ERR(OAI_COMPLETION, "{\"pr\xffompt\": \"a\"}", "", "not valid UTF-8");
    /* a lone surrogate escape is not a character either */
    ERR(OAI_COMPLETION, "{\"prompt\": \"\\ud800\"}", "", "not valid JSON");
    /* NUL: escaped in a value or a key, or a raw byte */
    ERR(OAI_COMPLETION, "{\"prompt\": \"a\\u0000b\"}", "", "NUL");
    ERR(OAI_COMPLETION, "{\"stop\": \"\\u0000\", \"prompt\": \"a\"}", "", "NUL");
    ERR(OAI_COMPLETION, "{\"pro\\u0000mpt\": \"a\"}", "", "NUL");
    ERRN(OAI_COMPLETION, "{\"prompt\": \"a\0b\"}", sizeof "{\"prompt\": \"a\0b\"}" - 1, "", "not valid JSON");
    ERRN(OAI_COMPLETION, "{\"prompt\": \"ab\"}\0", sizeof "{\"prompt\": \"ab\"}\0" - 1, "", "not valid JSON");

    /* nesting far deeper than anything valid: refused, no stack overflow */
    size_t depth = 100000;
    char *deep = malloc(depth * 2 + 32);
    size_t o = (size_t)sprintf(deep, "{\"prompt\": ");
    memset(deep + o, '[', depth);
    memset(deep + o + depth, ']', depth);
    strcpy(deep + o + 2 * depth, "}");
    ERR(OAI_COMPLETION, deep, "", "maximum parsing depth");
    memset(deep, '[', depth);   /* and as the whole body, unterminated */
    ERRN(OAI_CHAT, deep, depth, "", "not valid JSON");
    free(deep);
    /* 10 levels is fine for the reader but not a prompt shape */
    ERR(OAI_COMPLETION, "{\"prompt\": [[[[[[[[[[1]]]]]]]]]]}", "prompt[0][0]", "must be a token id");
}

/* ------------------------------------------------------------------ completions */

static void test_completion_defaults(void) {
    struct oai_request r;
    if (OK(OAI_COMPLETION, "{\"prompt\": \"Once upon a time\"}", &r)) return;
    CHECK(r.kind == OAI_COMPLETION);
    CHECK(!strcmp(r.model, ""));
    CHECK(r.n_prompts == 1 && r.prompts[0].text && !strcmp(r.prompts[0].text, "Once upon a time"));
    CHECK(r.prompts[0].text_len == 16 && r.prompts[0].tokens == NULL);
    CHECK(r.max_tokens == 16);
    CHECK(r.temperature == 1.0f && r.top_p == 1.0f && r.top_k == 0 && r.min_p == 0.0f);
    CHECK(r.repetition_penalty == 1.0f);
    CHECK(!r.has_seed && r.n == 1 && r.n_stops == 0 && r.stops == NULL);
    CHECK(!r.stream && !r.include_usage && !r.logprobs);
    CHECK(r.add_special_tokens);
    CHECK(oai_n_choices(&r) == 1);
    oai_request_free(&r);
}

static void test_completion_full(void) {
    struct oai_request r;
    const char *body =
        "{\"model\": \"SmolLM2-135M-Instruct.Q4_1\", \"prompt\": \"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\","
        " \"max_tokens\": 200, \"temperature\": 0, \"top_p\": 0.5, \"top_k\": 40, \"min_p\": 0.05,"
        " \"repetition_penalty\": 1.1, \"seed\": -9223372036854775808, \"n\": 3, \"stop\": [\"\\n\\n\", \"END\"],"
        " \"stream\": true, \"stream_options\": {\"include_usage\": true}, \"logprobs\": 1, \"echo\": false,"
        " \"presence_penalty\": 0, \"frequency_penalty\": 0.0, \"user\": \"u-1\", \"logit_bias\": {},"
        " \"best_of\": 3, \"suffix\": \"\"}";
    if (OK(OAI_COMPLETION, body, &r)) return;
    CHECK(!strcmp(r.model, "SmolLM2-135M-Instruct.Q4_1"));
    CHECK(r.n_prompts == 1 && !strcmp(r.prompts[0].text, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
    CHECK(r.prompts[0].text_len == 14);
    CHECK(r.max_tokens == 200 && r.temperature == 0.0f && r.top_p == 0.5f && r.top_k == 40);
    CHECK(r.min_p == 0.05f && r.repetition_penalty == 1.1f);
    CHECK(r.has_seed && r.seed == INT64_MIN);
    CHECK(r.n == 3 && oai_n_choices(&r) == 3);
    CHECK(r.n_stops == 2 && !strcmp(r.stops[0], "\n\n") && !strcmp(r.stops[1], "END"));
    CHECK(r.stream && r.include_usage && r.logprobs);

    struct gen_params g;
    completion_gen_params(&r, 2, 777, 99, DRAFT_NGRAM, &g);
    CHECK(g.max_tokens == 200 && g.speculative == DRAFT_NGRAM);   /* not given: the server's default */
    CHECK(g.sampling.temperature == 0.0f && g.sampling.top_p == 0.5f && g.sampling.top_k == 40);
    CHECK(g.sampling.min_p == 0.05f && g.sampling.repeat_penalty == 1.1f);
    CHECK(g.sampling.seed == (uint64_t)INT64_MIN + 2);   /* the request's seed, plus the choice */
    CHECK(g.stops == (const char *const *)r.stops && g.n_stops == 2 && g.logprobs == 1);
    oai_request_free(&r);

    /* explicit nulls read as "not given"; 16.0 is an integer */
    if (OK(OAI_COMPLETION,
           "{\"prompt\": \"x\", \"model\": null, \"max_tokens\": 7.0, \"temperature\": null, \"stop\": null,"
           " \"seed\": null, \"stream_options\": null, \"logprobs\": null, \"n\": null, \"user\": null}", &r))
        return;
    CHECK(r.max_tokens == 7 && r.temperature == 1.0f && r.n_stops == 0 && !r.has_seed && r.n == 1 && !r.logprobs);
    completion_gen_params(&r, 1, 777, 99, DRAFT_NONE, &g);
    CHECK(g.sampling.seed == 778);   /* no seed: the server's, plus the choice */
    oai_request_free(&r);

    /* ebb's extension: speculative decoding per request */
    if (OK(OAI_COMPLETION, "{\"prompt\": \"x\", \"speculative\": false}", &r)) return;
    completion_gen_params(&r, 0, 1, 1, DRAFT_NGRAM, &g);
    CHECK(r.speculative == DRAFT_NONE && g.speculative == DRAFT_NONE);
    oai_request_free(&r);
    if (OK(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"speculative\": \"ngram\"}", &r))
        return;
    completion_gen_params(&r, 0, 1, 1, DRAFT_NONE, &g);
    CHECK(g.speculative == DRAFT_NGRAM);
    oai_request_free(&r);
    if (OK(OAI_COMPLETION, "{\"prompt\": \"x\", \"speculative\": true}", &r)) return;
    CHECK(r.speculative == DRAFT_NGRAM);
    oai_request_free(&r);

    /* logprobs 0 also means "the chosen token's"; a single stop string */
    if (OK(OAI_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 0, \"stop\": \"###\", \"seed\": 42}", &r)) return;
    CHECK(r.logprobs && r.n_stops == 1 && !strcmp(r.stops[0], "###") && r.seed == 42);
    oai_request_free(&r);
    if (OK(OAI_COMPLETION, "{\"prompt\": \"x\", \"stop\": [], \"top_k\": -1}", &r)) return;
    CHECK(r.n_stops == 0 && r.top_k == -1);
    completion_gen_params(&r, 0, 1, 1, DRAFT_NONE, &g);
    CHECK(g.sampling.top_k == 0);   /* -1 is the sampler's "off" (0) */
    oai_request_free(&r);
}

static void test_completion_prompt_shapes(void) {
    struct oai_request r;
    if (!OK(OAI_COMPLETION, "{\"prompt\": [\"a\", \"bc\", \"\"], \"n\": 2}", &r)) {
        CHECK(r.n_prompts == 3 && !strcmp(r.prompts[1].text, "bc") && r.prompts[2].text_len == 0);
        CHECK(oai_n_choices(&r) == 6);
        oai_request_free(&r);
    }
    if (!OK(OAI_COMPLETION, "{\"prompt\": [1, 2, 49151]}", &r)) {
        CHECK(r.n_prompts == 1 && r.prompts[0].text == NULL && r.prompts[0].n_tokens == 3);
        CHECK(r.prompts[0].tokens[0] == 1 && r.prompts[0].tokens[2] == 49151);
        struct oai_error e;
        CHECK(oai_check_token_ids(&r, 49152, &e) == 0);
        CHECK(oai_check_token_ids(&r, 49151, &e) == -1);
        CHECK(e.status == 400 && !strcmp(e.param, "prompt[2]") && strstr(e.message, "49151") &&
              strstr(e.message, "vocabulary"));
        oai_request_free(&r);
    }
    if (!OK(OAI_COMPLETION, "{\"prompt\": [[5], [6, 7, 8]]}", &r)) {
        CHECK(r.n_prompts == 2 && r.prompts[0].n_tokens == 1 && r.prompts[1].n_tokens == 3);
        CHECK(r.prompts[1].tokens[2] == 8);
        struct oai_error e;
        CHECK(oai_check_token_ids(&r, 8, &e) == -1 && !strcmp(e.param, "prompt[1][2]"));
        oai_request_free(&r);
    }
    ERR(OAI_COMPLETION, "{}", "prompt", "'prompt' is required");
    ERR(OAI_COMPLETION, "{\"prompt\": null}", "prompt", "'prompt' is required");
    ERR(OAI_COMPLETION, "{\"prompt\": 5}", "prompt", "'prompt' must be a string, an array of strings");
    ERR(OAI_COMPLETION, "{\"prompt\": {}}", "prompt", "got an object");
    ERR(OAI_COMPLETION, "{\"prompt\": []}", "prompt", "must not be an empty array");
    ERR(OAI_COMPLETION, "{\"prompt\": [\"a\", 1]}", "prompt[1]", "must be a string like 'prompt[0]'");
    ERR(OAI_COMPLETION, "{\"prompt\": [1, \"a\"]}", "prompt[1]", "must be a token id");
    ERR(OAI_COMPLETION, "{\"prompt\": [1, -3]}", "prompt[1]", "got -3");
    ERR(OAI_COMPLETION, "{\"prompt\": [2147483648]}", "prompt[0]", "between 0 and 2147483647");
    ERR(OAI_COMPLETION, "{\"prompt\": [1.5]}", "prompt[0]", "got 1.5");
    ERR(OAI_COMPLETION, "{\"prompt\": [[1], []]}", "prompt[1]", "must not be an empty array");
    ERR(OAI_COMPLETION, "{\"prompt\": [[1], 2]}", "prompt[1]", "must be an array of token ids");
    ERR(OAI_COMPLETION, "{\"prompt\": [[1], [2, null]]}", "prompt[1][1]", "got null");
    ERR(OAI_COMPLETION, "{\"prompt\": [true]}", "prompt[0]", "first element is true");

    /* limits: prompts in one request, token ids in one request */
    struct sb b = {0};
    sb_add(&b, "{\"prompt\": [");
    for (int i = 0; i < OAI_MAX_PROMPTS; i++) sb_add(&b, "%s\"p%d\"", i ? "," : "", i);
    sb_add(&b, "]}");
    if (!OK(OAI_COMPLETION, b.s, &r)) {
        CHECK(r.n_prompts == OAI_MAX_PROMPTS && !strcmp(r.prompts[OAI_MAX_PROMPTS - 1].text, "p1023"));
        oai_request_free(&r);
    }
    b.len -= 2;
    sb_add(&b, ",\"one more\"]}");
    ERR(OAI_COMPLETION, b.s, "prompt", "at most 1024");
    b.len = 0;
    sb_add(&b, "{\"prompt\": [");
    for (int i = 0; i < OAI_MAX_TOKEN_IDS; i++) sb_add(&b, i ? ",%d" : "%d", i % 1000);
    sb_add(&b, "]}");
    if (!OK(OAI_COMPLETION, b.s, &r)) {
        CHECK(r.prompts[0].n_tokens == OAI_MAX_TOKEN_IDS && r.prompts[0].tokens[1001] == 1);
        oai_request_free(&r);
    }
    b.len -= 2;
    sb_add(&b, ",7]}");
    ERR(OAI_COMPLETION, b.s, "prompt", "at most 1048576");
    /* the same total split over two prompts */
    b.len = 0;
    sb_add(&b, "{\"prompt\": [[");
    for (int i = 0; i < OAI_MAX_TOKEN_IDS / 2; i++) sb_add(&b, i ? ",%d" : "%d", 3);
    sb_add(&b, "],[");
    for (int i = 0; i < OAI_MAX_TOKEN_IDS / 2 + 1; i++) sb_add(&b, i ? ",%d" : "%d", 4);
    sb_add(&b, "]]}");
    ERR(OAI_COMPLETION, b.s, "prompt", "in total");
    free(b.s);
}

static void test_completion_fields(void) {
    const enum oai_kind C = OAI_COMPLETION;
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": -5}", "max_tokens", "'max_tokens' must be an integer >= 1, got -5");
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": 0}", "max_tokens", "must be an integer >= 1, got 0");
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": \"16\"}", "max_tokens", "must be an integer >= 1, got a string");
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": 1.5}", "max_tokens", "got 1.5");
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": 3000000000}", "max_tokens", "at most 2147483647, got 3000000000");
    ERR(C, "{\"prompt\": \"a\", \"max_tokens\": true}", "max_tokens", "got true");
    ERR(C, "{\"prompt\": \"a\", \"temperature\": 2.5}", "temperature",
        "'temperature' must be a number between 0 and 2");
    ERR(C, "{\"prompt\": \"a\", \"temperature\": -0.1}", "temperature", "between 0 and 2, got -0.1");
    ERR(C, "{\"prompt\": \"a\", \"temperature\": \"hot\"}", "temperature", "got a string");
    ERR(C, "{\"prompt\": \"a\", \"top_p\": 0}", "top_p", "'top_p' must be a number > 0 and <= 1, got 0");
    ERR(C, "{\"prompt\": \"a\", \"top_p\": 1.01}", "top_p", "got 1.01");
    ERR(C, "{\"prompt\": \"a\", \"top_k\": -2}", "top_k", "'top_k' must be an integer >= -1");
    ERR(C, "{\"prompt\": \"a\", \"top_k\": 2.5}", "top_k", "got 2.5");
    ERR(C, "{\"prompt\": \"a\", \"min_p\": 1.5}", "min_p", "between 0 and 1");
    ERR(C, "{\"prompt\": \"a\", \"repetition_penalty\": 0}", "repetition_penalty", "> 0");
    ERR(C, "{\"prompt\": \"a\", \"repetition_penalty\": 1000}", "repetition_penalty", "<= 100");
    ERR(C, "{\"prompt\": \"a\", \"seed\": \"1\"}", "seed", "'seed' must be an integer, got a string");
    ERR(C, "{\"prompt\": \"a\", \"seed\": 0.5}", "seed", "got 0.5");
    ERR(C, "{\"prompt\": \"a\", \"n\": 0}", "n", "'n' must be an integer between 1 and 16, got 0");
    ERR(C, "{\"prompt\": \"a\", \"n\": 17}", "n", "at most 16");
    ERR(C, "{\"prompt\": \"a\", \"stop\": \"\"}", "stop", "must not be an empty string");
    ERR(C, "{\"prompt\": \"a\", \"stop\": [\"x\", \"\"]}", "stop[1]", "must not be an empty string");
    ERR(C, "{\"prompt\": \"a\", \"stop\": [\"1\",\"2\",\"3\",\"4\",\"5\"]}", "stop",
        "at most 4 strings, got an array of 5");
    ERR(C, "{\"prompt\": \"a\", \"stop\": [1]}", "stop[0]", "must be a string, got 1");
    ERR(C, "{\"prompt\": \"a\", \"stop\": 3}", "stop", "must be a string or an array");
    char longstop[OAI_MAX_STOP_BYTES + 64];
    int o = sprintf(longstop, "{\"prompt\": \"a\", \"stop\": \"");
    memset(longstop + o, 'x', OAI_MAX_STOP_BYTES + 1);
    strcpy(longstop + o + OAI_MAX_STOP_BYTES + 1, "\"}");
    ERR(C, longstop, "stop", "at most 256 bytes");
    ERR(C, "{\"prompt\": \"a\", \"stream\": \"yes\"}", "stream", "'stream' must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"stream\": 1}", "stream", "got 1");
    ERR(C, "{\"prompt\": \"a\", \"stream_options\": {\"include_usage\": true}}", "stream_options",
        "only allowed when 'stream' is true");
    ERR(C, "{\"prompt\": \"a\", \"stream\": false, \"stream_options\": {}}", "stream_options", "only allowed");
    ERR(C, "{\"prompt\": \"a\", \"stream\": true, \"stream_options\": {\"include_usage\": 1}}",
        "stream_options.include_usage", "must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"stream\": true, \"stream_options\": {\"continuous\": true}}",
        "stream_options.continuous", "unknown field");
    ERR(C, "{\"prompt\": \"a\", \"stream\": true, \"stream_options\": true}", "stream_options", "must be an object");
    ERR(C, "{\"prompt\": \"a\", \"logprobs\": 6}", "logprobs", "'logprobs' must be at most 5, got 6");
    ERR(C, "{\"prompt\": \"a\", \"logprobs\": -1}", "logprobs", "must be an integer");
    ERR(C, "{\"prompt\": \"a\", \"logprobs\": true}", "logprobs", "must be an integer between 0 and 5, got true");
    {
        struct oai_request r;
        if (!OK(C, "{\"prompt\": \"a\", \"echo\": true, \"logprobs\": 1}", &r)) {
            CHECK(r.echo && r.logprobs && r.top_logprobs == 1);
            oai_request_free(&r);
        }
    }
    ERR(C, "{\"prompt\": \"a\", \"stop_token_ids\": [1, -2]}", "stop_token_ids[1]", "a token id");
    ERR(C, "{\"prompt\": \"a\", \"stop_token_ids\": 5}", "stop_token_ids", "must be an array");
    ERR(C, "{\"prompt\": \"a\", \"min_tokens\": -1}", "min_tokens", "an integer >= 0");
    ERR(C, "{\"prompt\": \"a\", \"ignore_eos\": 1}", "ignore_eos", "must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"cache_prompt\": \"no\"}", "cache_prompt", "must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"logit_bias\": {\"x1\": 1}}", "logit_bias.x1", "decimal strings");
    ERR(C, "{\"prompt\": \"a\", \"logit_bias\": {\"-3\": 1}}", "logit_bias.-3", "decimal strings");
    ERR(C, "{\"prompt\": \"a\", \"logit_bias\": {\"3\": 101}}", "logit_bias.3", "between -100 and 100");
    ERR(C, "{\"prompt\": \"a\", \"logit_bias\": {\"3\": \"1\"}}", "logit_bias.3", "between -100 and 100");
    {
        struct oai_request r;
        if (!OK(C, "{\"prompt\": \"a\", \"logprobs\": 3, \"presence_penalty\": 0.5,"
                   " \"frequency_penalty\": -1, \"logit_bias\": {\"50256\": -100, \"7\": 2.5},"
                   " \"stop_token_ids\": [2, 9], \"min_tokens\": 4, \"ignore_eos\": true}", &r)) {
            CHECK(r.logprobs && r.top_logprobs == 3 && !r.echo && r.ignore_eos && r.min_tokens == 4);
            CHECK(r.cache_prompt);   /* the default */
            CHECK(r.presence_penalty == 0.5f && r.frequency_penalty == -1.0f);
            CHECK(r.n_logit_bias == 2 && r.logit_bias[0].id == 50256 && r.logit_bias[0].bias == -100.0f &&
                  r.logit_bias[1].id == 7 && r.logit_bias[1].bias == 2.5f);
            CHECK(r.n_stop_ids == 2 && r.stop_ids[0] == 2 && r.stop_ids[1] == 9);
            struct oai_error e;
            CHECK(oai_check_token_ids(&r, 50257, &e) == 0);
            CHECK(oai_check_token_ids(&r, 50000, &e) == -1 && !strcmp(e.param, "logit_bias.50256"));
            CHECK(oai_check_token_ids(&r, 9, &e) == -1 && !strcmp(e.param, "stop_token_ids[1]"));
            oai_request_free(&r);
        }
    }
    ERR(C, "{\"prompt\": \"a\", \"echo\": 1}", "echo", "must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"echo\": \"no\"}", "echo", "must be a boolean");
    ERR(C, "{\"prompt\": \"a\", \"speculative\": \"eagle\"}", "speculative",
        "'speculative' must be true, false or a draft source (\"ngram\" or \"none\"), got a string");
    ERR(C, "{\"prompt\": \"a\", \"speculative\": 1}", "speculative", "must be true, false or a draft source");
    ERR(C, "{\"prompt\": \"a\", \"frequency_penalty\": 3}", "frequency_penalty", "between -2 and 2");
    ERR(C, "{\"prompt\": \"a\", \"best_of\": 2}", "best_of", "must equal 'n'");
    ERR(C, "{\"prompt\": \"a\", \"suffix\": \"end\"}", "suffix", "not supported");
    ERR(C, "{\"prompt\": \"a\", \"logit_bias\": []}", "logit_bias", "must be an object");
    ERR(C, "{\"prompt\": \"a\", \"user\": 5}", "user", "'user' must be a string");
    ERR(C, "{\"prompt\": \"a\", \"model\": 5}", "model", "'model' must be a string, got 5");
    char longmodel[OAI_MAX_MODEL_NAME + 64];
    o = sprintf(longmodel, "{\"prompt\": \"a\", \"model\": \"");
    memset(longmodel + o, 'm', OAI_MAX_MODEL_NAME + 1);
    strcpy(longmodel + o + OAI_MAX_MODEL_NAME + 1, "\"}");
    ERR(C, longmodel, "model", "too long");
    ERR(C, "{\"prompt\": \"a\", \"temprature\": 0.5}", "temprature", "unknown field 'temprature'");
    ERR(C, "{\"prompt\": \"a\", \"messages\": []}", "messages", "'messages' is not a field of /v1/completions");
    ERR(C, "{\"prompt\": \"a\", \"grammar\": 5}", "grammar", "must be a string");
    ERR(C, "{\"prompt\": \"a\", \"grammar\": \"root ::= (\"}", "grammar", "'grammar' is not a grammar");
    ERR(C, "{\"prompt\": \"a\", \"grammar\": \"x ::= \\\"a\\\"\"}", "grammar", "root");
    ERR(C, "{\"prompt\": \"a\", \"max_completion_tokens\": 5}", "max_completion_tokens", "not a field");
    /* the first problem in body order is the one reported */
    ERR(C, "{\"n\": 99, \"prompt\": 1, \"top_p\": 7}", "n", "'n'");
    ERR(C, "{\"top_p\": 7, \"n\": 99, \"prompt\": 1}", "top_p", "'top_p'");
    /* a long unknown key with multibyte characters: the message and param
     * are cut, but stay valid UTF-8 (checked inside ERR) */
    struct sb b = {0};
    sb_add(&b, "{\"prompt\": \"a\", \"x");
    for (int i = 0; i < 100; i++) sb_add(&b, "\xe2\x82\xac");
    sb_add(&b, "\": 1}");
    /* param holds 63 bytes: "x", 20 whole euro signs, and 2 bytes of the
     * 21st, which become "??" */
    struct sb want = {0};
    sb_add(&want, "x");
    for (int i = 0; i < 20; i++) sb_add(&want, "\xe2\x82\xac");
    sb_add(&want, "??");
    ERR(C, b.s, want.s, "unknown field 'x\xe2\x82\xac");
    free(want.s);
    free(b.s);

    struct oai_request r;
    if (!OK(C, "{\"prompt\": \"a\", \"best_of\": 2, \"n\": 2}", &r)) oai_request_free(&r);
}

/* ------------------------------------------------------------------ chat */

static void test_chat_accepts(void) {
    struct oai_request r;
    const char *body =
        "{\"model\": \"m\", \"messages\": ["
        "{\"role\": \"developer\", \"content\": \"Be brief.\"},"
        "{\"role\": \"system\", \"content\": \"\"},"
        "{\"role\": \"user\", \"name\": \"ann\", \"content\": [{\"type\": \"text\", \"text\": \"Hi\"},"
        " {\"text\": \"there \xc3\xa9\", \"type\": \"text\"}]},"
        "{\"role\": \"assistant\", \"content\": null, \"tool_calls\": null},"
        "{\"role\": \"tool\", \"tool_call_id\": \"c1\", \"content\": \"42\"},"
        "{\"role\": \"user\", \"content\": \"and?\"}]}";
    if (OK(OAI_CHAT, body, &r)) return;
    CHECK(r.kind == OAI_CHAT && !strcmp(r.model, "m") && r.n_messages == 6);
    CHECK(r.messages[0].role == OAI_ROLE_SYSTEM && !strcmp(r.messages[0].content, "Be brief."));
    CHECK(r.messages[1].role == OAI_ROLE_SYSTEM && r.messages[1].content_len == 0);
    CHECK(r.messages[2].role == OAI_ROLE_USER && !strcmp(r.messages[2].content, "Hi\nthere \xc3\xa9"));
    CHECK(r.messages[2].content_len == 11);
    CHECK(r.messages[3].role == OAI_ROLE_ASSISTANT && !strcmp(r.messages[3].content, ""));
    /* a tool result, wrapped as server/tools.h renders it */
    CHECK(r.messages[4].role == OAI_ROLE_TOOL &&
          !strcmp(r.messages[4].content, "<tool_response>\n42\n</tool_response>"));
    CHECK(!strcmp(oai_role_name(r.messages[0].role), "system") && !strcmp(oai_role_name(OAI_ROLE_TOOL), "tool"));
    CHECK(!strcmp(oai_role_name(r.messages[3].role), "assistant") && !strcmp(oai_role_name(OAI_ROLE_USER), "user"));
    CHECK(r.max_tokens == -1 && r.n == 1 && !r.logprobs && r.n_prompts == 0);
    CHECK(!r.add_special_tokens);
    struct gen_params g;
    completion_gen_params(&r, 0, 5, 1234, DRAFT_NONE, &g);
    CHECK(g.max_tokens == 1234 && g.sampling.seed == 5 && g.sampling.temperature == 1.0f && g.logprobs == 0);
    oai_request_free(&r);

    if (OK(OAI_CHAT,
           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_completion_tokens\": 9,"
           " \"logprobs\": true, \"top_logprobs\": 0, \"response_format\": {\"type\": \"text\"}, \"store\": false,"
           " \"metadata\": {\"k\": \"v\"}, \"parallel_tool_calls\": false, \"service_tier\": \"auto\", \"tools\": [],"
           " \"tool_choice\": \"none\", \"user\": \"u\", \"logit_bias\": {}, \"presence_penalty\": 0, \"n\": 16,"
           " \"stream\": true, \"stream_options\": {\"include_usage\": false}}",
           &r))
        return;
    CHECK(r.max_tokens == 9 && r.logprobs && r.n == 16 && r.stream && !r.include_usage);
    oai_request_free(&r);
    if (!OK(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 9,"
                      " \"max_completion_tokens\": 9}", &r)) {
        CHECK(r.max_tokens == 9);
        oai_request_free(&r);
    }

    /* exactly the message limit */
    struct sb b = {0};
    sb_add(&b, "{\"messages\": [");
    for (int i = 0; i < OAI_MAX_MESSAGES; i++) sb_add(&b, "%s{\"role\":\"user\",\"content\":\"m%d\"}", i ? "," : "", i);
    sb_add(&b, "]}");
    if (!OK(OAI_CHAT, b.s, &r)) {
        CHECK(r.n_messages == OAI_MAX_MESSAGES && !strcmp(r.messages[1023].content, "m1023"));
        oai_request_free(&r);
    }
    b.len -= 2;
    sb_add(&b, ",{\"role\":\"user\",\"content\":\"over\"}]}");
    ERR(OAI_CHAT, b.s, "messages", "at most 1024");
    free(b.s);
}

static void test_chat_refuses(void) {
    const enum oai_kind C = OAI_CHAT;
#define MSG "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]"
    ERR(C, "{}", "messages", "'messages' is required");
    ERR(C, "{\"messages\": []}", "messages", "'messages' must be a non-empty array");
    ERR(C, "{\"messages\": \"hi\"}", "messages", "must be a non-empty array, got a string");
    ERR(C, "{\"messages\": [1]}", "messages[0]", "must be an object");
    ERR(C, "{\"messages\": [{\"content\": \"x\"}]}", "messages[0].role", "'messages[0].role' is required");
    ERR(C, "{\"messages\": [{\"role\": 1, \"content\": \"x\"}]}", "messages[0].role", "must be a string");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"robot\", \"content\": \"x\"}]}",
        "messages[1].role", "must be one of 'system', 'developer', 'user', 'assistant', 'tool', got 'robot'");
    ERR(C, "{\"messages\": [{\"role\": \"user\"}]}", "messages[0].content", "is required");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": null}]}", "messages[0].content", "is required");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "messages[0].content",
        "must be a string or an array of content parts, got 5");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": []}]}", "messages[0].content",
        "must not be an empty array");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [\"hi\"]}]}", "messages[0].content[0]",
        "must be an object");
    ERR(C,
        "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"},"
        " {\"type\": \"image_url\", \"image_url\": {\"url\": \"http://x\"}}]}]}",
        "messages[0].content[1].type", "content part type 'image_url' is not supported");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\", \"cache\": 1}]}]}",
        "messages[0].content[0].cache", "unknown field 'messages[0].content[0].cache' in a content part");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]}",
        "messages[0].content[0].type", "content part type 'image_url' is not supported");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"input_audio\"}]}]}",
        "messages[0].content[0].type", "'input_audio' is not supported");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}",
        "messages[0].content[0].text", "is required");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": 3}]}]}",
        "messages[0].content[0].text", "must be a string");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"text\": \"a\"}]}]}", "messages[0].content[0].type",
        "is required");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"mood\": \"happy\"}]}", "messages[0].mood",
        "unknown field 'messages[0].mood'");
    ERR(C, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"name\": 3}]}", "messages[0].name",
        "must be a string");
    ERR(C, "{\"messages\": [{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{}]}]}",
        "messages[0].tool_calls[0]", "must be {\"id\"");
    {   /* an assistant's calls join its content in the call format */
        struct oai_request r;
        if (!OK(C, "{\"messages\": [{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"c1\", "
                   "\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}}]}]}", &r)) {
            CHECK(!strcmp(r.messages[0].content, "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"x\":1}}\n</tool_call>"));
            oai_request_free(&r);
        }
    }
    ERR(C, "{" MSG ", \"max_tokens\": 5, \"max_completion_tokens\": 6}", "max_completion_tokens", "disagree");
    ERR(C, "{" MSG ", \"max_completion_tokens\": -5}", "max_completion_tokens",
        "'max_completion_tokens' must be an integer >= 1, got -5");
    ERR(C, "{" MSG ", \"logprobs\": 1}", "logprobs", "'logprobs' must be a boolean");
    ERR(C, "{" MSG ", \"logprobs\": true, \"top_logprobs\": 21}", "top_logprobs", "at most 20, got 21");
    ERR(C, "{" MSG ", \"top_logprobs\": 2}", "top_logprobs", "needs 'logprobs': true");
    ERR(C, "{" MSG ", \"top_logprobs\": \"2\"}", "top_logprobs", "must be an integer");
    ERR(C, "{" MSG ", \"response_format\": {\"type\": \"yaml\"}}", "response_format.type",
        "must be \"text\", \"json_object\" or \"json_schema\", got 'yaml'");
    ERR(C, "{" MSG ", \"response_format\": {\"type\": \"text\", \"schema\": {}}}", "response_format.schema",
        "unknown field");
    /* What the official client sends for structured output: compiled here. */
    {
        struct oai_request r;
        if (!OK(C, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"x\", "
                   "\"schema\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}, \"strict\": true}}}", &r)) {
            CHECK(r.grammar != NULL);
            oai_request_free(&r);
        }
        if (!OK(C, "{" MSG ", \"response_format\": {\"type\": \"json_object\"}}", &r)) {
            CHECK(r.grammar != NULL);
            oai_request_free(&r);
        }
        if (!OK(C, "{" MSG ", \"response_format\": {\"type\": \"text\"}}", &r)) {
            CHECK(r.grammar == NULL);
            oai_request_free(&r);
        }
    }
    ERR(C, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"x\", "
        "\"schema\": {\"type\": \"string\", \"pattern\": \"a\"}}}}", "response_format.json_schema.schema.pattern",
        "pattern");
    ERR(C, "{" MSG ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"schema\": {}, "
        "\"extra\": 1}}}", "response_format.json_schema.extra", "unknown field");
    ERR(C, "{" MSG ", \"response_format\": {}}", "response_format.type", "is required");
    ERR(C, "{" MSG ", \"store\": true}", "store", "not supported");
    ERR(C, "{" MSG ", \"metadata\": {\"k\": 1}}", "metadata.k", "must be a string");
    ERR(C, "{" MSG ", \"tools\": [{\"type\": \"function\"}]}", "tools[0].function", "is required");
    ERR(C, "{" MSG ", \"tool_choice\": \"required\"}", "tool_choice", "'tools' is empty");
    ERR(C, "{" MSG ", \"tool_choice\": {\"type\": \"function\"}}", "tool_choice", "must be \"auto\"");
    ERR(C, "{" MSG ", \"tool_choice\": \"sometimes\"}", "tool_choice", "got 'sometimes'");
    ERR(C, "{" MSG ", \"parallel_tool_calls\": \"yes\"}", "parallel_tool_calls", "must be a boolean");
    ERR(C, "{" MSG ", \"prompt\": \"x\"}", "prompt", "'prompt' is not a field of /v1/chat/completions");
    ERR(C, "{" MSG ", \"echo\": false}", "echo", "not a field");
    ERR(C, "{" MSG ", \"best_of\": 1}", "best_of", "not a field");
    ERR(C, "{" MSG ", \"functions\": []}", "functions", "unknown field 'functions' in a /v1/chat/completions request");
    ERR(C, "{" MSG ", \"temperature\": 3}", "temperature", "'temperature' must be a number between 0 and 2, got 3");
#undef MSG
}

/* ------------------------------------------------------------------ tokenize */

static void test_tokenize(void) {
    struct oai_request r;
    if (!OK(OAI_TOKENIZE, "{\"model\": \"m\", \"prompt\": \"Hello world\"}", &r)) {
        CHECK(r.kind == OAI_TOKENIZE && r.n_prompts == 1 && !strcmp(r.prompts[0].text, "Hello world"));
        CHECK(r.add_special_tokens && !r.return_token_strs && r.n_messages == 0);
        oai_request_free(&r);
    }
    if (!OK(OAI_TOKENIZE, "{\"prompt\": \"x\", \"add_special_tokens\": false, \"return_token_strs\": true}", &r)) {
        CHECK(!r.add_special_tokens && r.return_token_strs);
        oai_request_free(&r);
    }
    if (!OK(OAI_TOKENIZE, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &r)) {
        CHECK(r.n_messages == 1 && r.n_prompts == 0 && !r.add_special_tokens && r.add_generation_prompt);
        oai_request_free(&r);
    }
    if (!OK(OAI_TOKENIZE,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"add_generation_prompt\": false,"
            " \"add_special_tokens\": true}", &r)) {
        CHECK(r.add_special_tokens && !r.add_generation_prompt);
        oai_request_free(&r);
    }
    ERR(OAI_TOKENIZE, "{}", "prompt", "'prompt' or 'messages' is required");
    ERR(OAI_TOKENIZE, "{\"prompt\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", "messages",
        "either 'prompt' or 'messages', not both");
    ERR(OAI_TOKENIZE, "{\"prompt\": [\"x\"]}", "prompt", "'prompt' must be a string, got an array");
    ERR(OAI_TOKENIZE, "{\"prompt\": \"x\", \"add_special_tokens\": 1}", "add_special_tokens", "must be a boolean");
    ERR(OAI_TOKENIZE, "{\"prompt\": \"x\", \"max_tokens\": 1}", "max_tokens", "not a field of /tokenize");
    ERR(OAI_TOKENIZE, "{\"messages\": [{\"role\": \"user\"}]}", "messages[0].content", "is required");

    if (!OK(OAI_DETOKENIZE, "{\"model\": \"m\", \"tokens\": [9, 0, 49151]}", &r)) {
        CHECK(r.kind == OAI_DETOKENIZE && r.n_prompts == 1 && r.prompts[0].n_tokens == 3);
        CHECK(r.prompts[0].tokens[0] == 9 && r.prompts[0].tokens[2] == 49151);
        struct oai_error e;
        CHECK(oai_check_token_ids(&r, 49152, &e) == 0);
        CHECK(oai_check_token_ids(&r, 100, &e) == -1 && !strcmp(e.param, "tokens[2]"));
        oai_request_free(&r);
    }
    if (!OK(OAI_DETOKENIZE, "{\"tokens\": []}", &r)) {
        CHECK(r.n_prompts == 1 && r.prompts[0].n_tokens == 0);
        oai_request_free(&r);
    }
    ERR(OAI_DETOKENIZE, "{}", "tokens", "'tokens' is required");
    ERR(OAI_DETOKENIZE, "{\"tokens\": \"1 2\"}", "tokens", "must be an array of token ids, got a string");
    ERR(OAI_DETOKENIZE, "{\"tokens\": [1, -1]}", "tokens[1]", "must be a token id");
    ERR(OAI_DETOKENIZE, "{\"tokens\": [[1]]}", "tokens[0]", "got an array");
    ERR(OAI_DETOKENIZE, "{\"tokens\": [1], \"prompt\": \"x\"}", "prompt", "not a field of /detokenize");
}

static void test_ids_and_names(void) {
    char buf[48];
    uint64_t id = 0;
    oai_format_id(buf, sizeof buf, OAI_COMPLETION, 42);
    CHECK(!strcmp(buf, "cmpl-42"));
    oai_format_id(buf, sizeof buf, OAI_CHAT, 18446744073709551615ull);
    CHECK(!strcmp(buf, "chatcmpl-18446744073709551615"));
    CHECK(oai_parse_id("chatcmpl-18446744073709551615", &id) == 0 && id == 18446744073709551615ull);
    CHECK(oai_parse_id("cmpl-7", &id) == 0 && id == 7);
    CHECK(oai_parse_id("123", &id) == 0 && id == 123);
    CHECK(oai_parse_id("cmpl-", &id) == -1);
    CHECK(oai_parse_id("cmpl-1x", &id) == -1);
    CHECK(oai_parse_id("foo-1", &id) == -1);
    CHECK(oai_parse_id("", &id) == -1);
    CHECK(oai_parse_id("chatcmpl-18446744073709551616", &id) == -1);
    CHECK(oai_finish_reason(FINISH_NONE) == NULL);
    CHECK(!strcmp(oai_finish_reason(FINISH_STOP), "stop") && !strcmp(oai_finish_reason(FINISH_LENGTH), "length"));
    CHECK(!strcmp(oai_finish_reason(FINISH_CANCELLED), "cancelled"));
    CHECK(!strcmp(oai_finish_reason(FINISH_ERROR), "error"));
}

/* ------------------------------------------------------------------ responses */

static json_t *load(const char *s) {
    json_error_t je;
    json_t *j = s ? json_loads(s, 0, &je) : NULL;
    CHECK_MSG(j != NULL, "not JSON: %s", s ? je.text : "(null)");
    return j;
}

static const char *sget(json_t *o, const char *k) {
    return json_string_value(json_object_get(o, k));
}

static json_int_t iget(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    CHECK_MSG(json_is_integer(v), "'%s' is not an integer", k);
    return json_integer_value(v);
}

/* Fills a choice with tokens: pieces, logprobs, and the released text. */
static void feed(struct oai_choice *c, const char *const *pieces, const float *lps, int n) {
    for (int i = 0; i < n; i++) {
        CHECK(oai_choice_add_token(c, pieces[i], strlen(pieces[i]), lps[i], NULL, 0) == 0);
        CHECK(oai_choice_add_text(c, pieces[i], strlen(pieces[i])) == 0);
    }
}

static void test_completion_response(void) {
    struct oai_choice c[2];
    oai_choice_init(&c[0], 0, true, 0, 0);
    oai_choice_init(&c[1], 1, false, 0, 0);
    /* " w\xc3\xb6r" is 4 characters in 5 bytes: offsets 0, 3, 5, 9 */
    const char *pieces[] = {"Hel", "lo", " w\xc3\xb6r", "ld"};
    const float lps[] = {-0.5f, -1.25f, -INFINITY, 0.0f};
    feed(&c[0], pieces, lps, 4);
    c[0].finish = FINISH_LENGTH;
    CHECK(oai_choice_add_text(&c[1], "Bye", 3) == 0);
    CHECK(oai_choice_add_token(&c[1], "Bye", 3, -1.0f, NULL, 0) == 0);   /* ignored: no logprobs asked */
    c[1].finish = FINISH_STOP;
    struct oai_meta m = {.kind = OAI_COMPLETION, .id = "cmpl-9", .model = "smol", .created = 1700000000};
    struct oai_usage u = {.prompt_tokens = 5, .completion_tokens = 6};
    size_t len = 0;
    char *s = oai_response(&m, c, 2, &u, &len);
    CHECK(s && len == strlen(s));
    CHECK(s && !strchr(s, '\n') && !strstr(s, ": "));   /* compact */
    json_t *j = load(s);
    if (j) {
        CHECK(!strcmp(sget(j, "id"), "cmpl-9") && !strcmp(sget(j, "object"), "text_completion"));
        CHECK(iget(j, "created") == 1700000000 && !strcmp(sget(j, "model"), "smol"));
        json_t *ch = json_object_get(j, "choices");
        CHECK(json_array_size(ch) == 2);
        json_t *c0 = json_array_get(ch, 0), *c1 = json_array_get(ch, 1);
        CHECK(iget(c0, "index") == 0 && !strcmp(sget(c0, "text"), "Hello w\xc3\xb6rld"));
        CHECK(!strcmp(sget(c0, "finish_reason"), "length"));
        json_t *lp = json_object_get(c0, "logprobs");
        json_t *toks = json_object_get(lp, "tokens"), *tl = json_object_get(lp, "token_logprobs");
        json_t *off = json_object_get(lp, "text_offset");
        CHECK(json_array_size(toks) == 4 && json_array_size(tl) == 4 && json_array_size(off) == 4);
        CHECK(!strcmp(json_string_value(json_array_get(toks, 2)), " w\xc3\xb6r"));
        CHECK_NEAR(json_number_value(json_array_get(tl, 0)), -0.5, 1e-9);
        CHECK_NEAR(json_number_value(json_array_get(tl, 1)), -1.25, 1e-9);
        CHECK_NEAR(json_number_value(json_array_get(tl, 2)), -9999.0, 1e-9);   /* -inf has no JSON spelling */
        CHECK_NEAR(json_number_value(json_array_get(tl, 3)), 0.0, 1e-9);
        CHECK(json_is_null(json_object_get(lp, "top_logprobs")));
        CHECK(json_integer_value(json_array_get(off, 0)) == 0 && json_integer_value(json_array_get(off, 1)) == 3);
        CHECK(json_integer_value(json_array_get(off, 2)) == 5 && json_integer_value(json_array_get(off, 3)) == 9);
        CHECK(!strcmp(sget(c1, "text"), "Bye") && !strcmp(sget(c1, "finish_reason"), "stop"));
        CHECK(json_is_null(json_object_get(c1, "logprobs")));
        json_t *us = json_object_get(j, "usage");
        CHECK(iget(us, "prompt_tokens") == 5 && iget(us, "completion_tokens") == 6 && iget(us, "total_tokens") == 11);
        json_decref(j);
    }
    free(s);
    oai_choice_free(&c[0]);
    oai_choice_free(&c[1]);

    /* tokens that split a character, and a stop string cut from the text:
     * offsets never point past the text */
    struct oai_choice d;
    oai_choice_init(&d, 0, true, 0, 0);
    CHECK(oai_choice_add_token(&d, "ab", 2, -0.1f, NULL, 0) == 0);
    CHECK(oai_choice_add_token(&d, "\xe2\x80", 2, -0.2f, NULL, 0) == 0);
    CHECK(oai_choice_add_token(&d, "\x9c", 1, -0.3f, NULL, 0) == 0);
    CHECK(oai_choice_add_token(&d, "STOP", 4, -0.4f, NULL, 0) == 0);
    CHECK(oai_choice_add_text(&d, "ab\xe2\x80\x9c", 5) == 0);
    d.finish = FINISH_STOP;
    s = oai_response(&m, &d, 1, &u, NULL);
    j = load(s);
    if (j) {
        json_t *lp = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
        json_t *toks = json_object_get(lp, "tokens"), *off = json_object_get(lp, "text_offset");
        CHECK(!strcmp(json_string_value(json_array_get(toks, 1)), "bytes:\\xe2\\x80"));
        CHECK(!strcmp(json_string_value(json_array_get(toks, 2)), "bytes:\\x9c"));
        /* "ab" 2 chars, then the 3-byte character counts once: 0, 2, 3, 3 */
        CHECK(json_integer_value(json_array_get(off, 1)) == 2 && json_integer_value(json_array_get(off, 2)) == 3);
        CHECK(json_integer_value(json_array_get(off, 3)) == 3);
        json_decref(j);
    }
    free(s);
    oai_choice_free(&d);
}

static void test_chat_response(void) {
    struct oai_choice c;
    oai_choice_init(&c, 0, true, 0, 0);
    CHECK(oai_choice_add_token(&c, "Hi", 2, -0.75f, NULL, 0) == 0);
    CHECK(oai_choice_add_token(&c, "\xe2\x80", 2, -2.0f, NULL, 0) == 0);
    CHECK(oai_choice_add_token(&c, "\x94", 1, -0.125f, NULL, 0) == 0);
    CHECK(oai_choice_add_text(&c, "Hi\xe2\x80\x94", 5) == 0);
    c.finish = FINISH_STOP;
    struct oai_meta m = {.kind = OAI_CHAT, .id = "chatcmpl-3", .model = "smol", .created = 1};
    struct oai_usage u = {.prompt_tokens = 20, .completion_tokens = 3};
    char *s = oai_response(&m, &c, 1, &u, NULL);
    json_t *j = load(s);
    if (j) {
        CHECK(!strcmp(sget(j, "object"), "chat.completion") && !strcmp(sget(j, "id"), "chatcmpl-3"));
        json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
        json_t *msg = json_object_get(c0, "message");
        CHECK(!strcmp(sget(msg, "role"), "assistant") && !strcmp(sget(msg, "content"), "Hi\xe2\x80\x94"));
        CHECK(!strcmp(sget(c0, "finish_reason"), "stop") && iget(c0, "index") == 0);
        json_t *content = json_object_get(json_object_get(c0, "logprobs"), "content");
        CHECK(json_array_size(content) == 3);
        json_t *t0 = json_array_get(content, 0), *t1 = json_array_get(content, 1);
        CHECK(!strcmp(sget(t0, "token"), "Hi"));
        CHECK_NEAR(json_number_value(json_object_get(t0, "logprob")), -0.75, 1e-9);
        json_t *b0 = json_object_get(t0, "bytes"), *b1 = json_object_get(t1, "bytes");
        CHECK(json_array_size(b0) == 2 && json_integer_value(json_array_get(b0, 0)) == 72 &&
              json_integer_value(json_array_get(b0, 1)) == 105);
        CHECK(json_array_size(b1) == 2 && json_integer_value(json_array_get(b1, 0)) == 0xe2 &&
              json_integer_value(json_array_get(b1, 1)) == 0x80);
        CHECK(!strcmp(sget(t1, "token"), "bytes:\\xe2\\x80"));
        json_t *top = json_object_get(t1, "top_logprobs");
        CHECK(json_is_array(top) && json_array_size(top) == 0);
        json_t *us = json_object_get(j, "usage");
        CHECK(iget(us, "total_tokens") == 23);
        json_decref(j);
    }
    free(s);
    oai_choice_free(&c);

    /* text that is not UTF-8 (a bug upstream) still yields valid JSON */
    oai_choice_init(&c, 0, false, 0, 0);
    CHECK(oai_choice_add_text(&c, "a\xff" "b\xc3", 4) == 0);
    c.finish = FINISH_LENGTH;
    s = oai_response(&m, &c, 1, &u, NULL);
    j = load(s);
    if (j) {
        json_t *msg = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "message");
        CHECK(!strcmp(sget(msg, "content"), "a\xef\xbf\xbd" "b\xef\xbf\xbd"));
        CHECK(json_is_null(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs")));
        json_decref(j);
    }
    free(s);
    oai_choice_free(&c);
}

/* Exact SSE text, written out by hand from OpenAI's chunk shapes. */
static void expect_sse(int line, char *got, size_t len, const char *want) {
    CHECK_MSG(got && !strcmp(got, want) && len == strlen(want), "line %d:\n got: %s\nwant: %s", line,
              got ? got : "(null)", want);
    free(got);
}
#define SSE(got, len, want) expect_sse(__LINE__, got, len, want)

static void test_chat_stream(void) {
    struct oai_meta m = {.kind = OAI_CHAT, .id = "chatcmpl-7", .model = "smol", .created = 1700000000};
    struct oai_choice c;
    oai_choice_init(&c, 1, false, 0, 64);
    size_t len = 99;
#define HEAD "data: {\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1700000000," \
             "\"model\":\"smol\","
    char *s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":1,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
             "\"finish_reason\":null}]}\n\n");
    s = oai_stream_chunk(&m, &c, &len);   /* nothing new */
    SSE(s, len, "");
    CHECK(oai_choice_add_text(&c, "Hel", 3) == 0);
    CHECK(oai_choice_add_text(&c, "lo \"q\"\n", 7) == 0);
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":1,\"delta\":{\"content\":\"Hello \\\"q\\\"\\n\"},\"logprobs\":null,"
             "\"finish_reason\":null}]}\n\n");
    /* what was sent is forgotten: a 64-byte cap holds a long stream */
    for (int i = 0; i < 100; i++) {
        CHECK(oai_choice_add_text(&c, "0123456789", 10) == 0);
        free(oai_stream_chunk(&m, &c, &len));
    }
    CHECK(oai_choice_add_text(&c, "!", 1) == 0);
    c.finish = FINISH_LENGTH;
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":1,\"delta\":{\"content\":\"!\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        HEAD "\"choices\":[{\"index\":1,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n");
    s = oai_stream_chunk(&m, &c, &len);   /* finished: nothing more, ever */
    SSE(s, len, "");
    oai_choice_free(&c);

    /* include_usage: every chunk says "usage":null, then the usage chunk */
    m.include_usage = true;
    oai_choice_init(&c, 0, true, 0, 0);
    CHECK(oai_choice_add_token(&c, "A", 1, -0.5f, NULL, 0) == 0);
    CHECK(oai_choice_add_text(&c, "A", 1) == 0);
    c.finish = FINISH_STOP;
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
             "\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"A\"},\"logprobs\":{\"content\":[{\"token\":\"A\","
             "\"logprob\":-0.5,\"bytes\":[65],\"top_logprobs\":[]}]},\"finish_reason\":null}],\"usage\":null}\n\n"
        HEAD "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],"
             "\"usage\":null}\n\n");
    struct oai_usage u = {.prompt_tokens = 12, .completion_tokens = 1};
    s = oai_stream_usage(&m, &u, &len);
    SSE(s, len,
        HEAD "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1,\"total_tokens\":13,"
             "\"prompt_tokens_details\":{\"cached_tokens\":0}},\"timings\":{\"cache_n\":0,\"prompt_n\":12,"
             "\"prompt_ms\":0.0,\"prompt_per_second\":0.0,\"predicted_n\":1,"
             "\"predicted_ms\":0.0,\"predicted_per_second\":0.0,\"draft_n\":0,\"draft_n_accepted\":0}}\n\n");
    oai_choice_free(&c);
#undef HEAD
    CHECK(!strcmp(OAI_SSE_DONE, "data: [DONE]\n\n"));
}

static void test_completion_stream(void) {
    struct oai_meta m = {.kind = OAI_COMPLETION, .id = "cmpl-1", .model = "smol", .created = 5};
    struct oai_choice c;
    oai_choice_init(&c, 2, true, 0, 0);
    size_t len;
#define HEAD "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,\"model\":\"smol\","
    char *s = oai_stream_chunk(&m, &c, &len);   /* completions have no role chunk */
    SSE(s, len, "");
    const char *p1[] = {"Hi", " th\xc3\xa9"};
    const float l1[] = {-1.5f, -0.25f};
    feed(&c, p1, l1, 2);
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":2,\"text\":\"Hi th\xc3\xa9\",\"logprobs\":{\"tokens\":[\"Hi\",\" th\xc3\xa9\"],"
             "\"token_logprobs\":[-1.5,-0.25],\"top_logprobs\":null,\"text_offset\":[0,2]},"
             "\"finish_reason\":null}]}\n\n");
    /* the offsets go on from the characters already streamed (2 + 4) */
    const char *p2[] = {"re"};
    const float l2[] = {-0.125f};
    feed(&c, p2, l2, 1);
    c.finish = FINISH_STOP;
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len,
        HEAD "\"choices\":[{\"index\":2,\"text\":\"re\",\"logprobs\":{\"tokens\":[\"re\"],\"token_logprobs\":[-0.125],"
             "\"top_logprobs\":null,\"text_offset\":[6]},\"finish_reason\":\"stop\"}]}\n\n");
    oai_choice_free(&c);

    /* finish with nothing new: one chunk with "" and the reason */
    oai_choice_init(&c, 0, false, 0, 0);
    CHECK(oai_choice_add_text(&c, "x", 1) == 0);
    free(oai_stream_chunk(&m, &c, &len));
    c.finish = FINISH_LENGTH;
    s = oai_stream_chunk(&m, &c, &len);
    SSE(s, len, HEAD "\"choices\":[{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n");
    oai_choice_free(&c);
    /* With drafts and times: usage's extension and llama.cpp's timings. */
    /* and a prompt mostly from the prompt cache: timings count what was computed */
    struct oai_usage u = {.prompt_tokens = 5, .cached_tokens = 4, .completion_tokens = 3, .draft_tokens = 4,
                          .accepted_draft_tokens = 1, .prompt_ms = 250, .predicted_ms = 50};
    s = oai_stream_usage(&m, &u, &len);
    SSE(s, len, HEAD "\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8,"
                     "\"prompt_tokens_details\":{\"cached_tokens\":4},\"draft_tokens\":4,\"accepted_draft_tokens\":1},"
                     "\"timings\":{\"cache_n\":4,\"prompt_n\":1,\"prompt_ms\":250.0,"
                     "\"prompt_per_second\":4.0,\"predicted_n\":3,\"predicted_ms\":50.0,\"predicted_per_second\":40.0,"
                     "\"draft_n\":4,\"draft_n_accepted\":1}}\n\n");
#undef HEAD

    struct oai_error e;
    oai_error_set(&e, 503, "server_error", NULL, "the server is shutting down");
    s = oai_stream_error(&e, &len);
    SSE(s, len,
        "data: {\"error\":{\"message\":\"the server is shutting down\",\"type\":\"server_error\",\"param\":null,"
        "\"code\":null}}\n\n");
    oai_error_set(&e, 400, "invalid_request_error", "n", "'n' %s", "bad");
    s = oai_stream_error(&e, &len);
    SSE(s, len,
        "data: {\"error\":{\"message\":\"'n' bad\",\"type\":\"invalid_request_error\",\"param\":\"n\","
        "\"code\":null}}\n\n");
}

static void test_choice_cap(void) {
    struct oai_choice c;
    oai_choice_init(&c, 0, true, 0, 100);
    CHECK(oai_choice_add_text(&c, "", 0) == 0);
    char blob[64];
    memset(blob, 'z', sizeof blob);
    CHECK(oai_choice_add_text(&c, blob, 60) == 0);
    CHECK(oai_choice_add_token(&c, blob, 20, -1.0f, NULL, 0) == 0);   /* 60 + 20 + 16 = 96 */
    CHECK(oai_choice_add_text(&c, blob, 4) == 0);            /* 100 */
    CHECK(oai_choice_add_text(&c, blob, 1) == -1);
    CHECK(oai_choice_add_token(&c, "", 0, -1.0f, NULL, 0) == -1);     /* the 16 per token count too */
    CHECK(oai_choice_add_text(&c, blob, SIZE_MAX) == -1);    /* no overflow in the check */
    CHECK(c.text_len == 64 && c.n_tokens == 1);
    oai_choice_free(&c);
    oai_choice_init(&c, 0, false, 0, 0);
    CHECK(c.max_bytes == OAI_CHOICE_MAX_BYTES);
    oai_choice_free(&c);
}

static void test_models_and_tokenize_responses(void) {
    const char *names[] = {"SmolLM2-135M-Instruct.Q4_1", "other"};
    const int64_t created[] = {1700000000, 1700000001};
    size_t len;
    char *s = oai_models_response(names, created, 2, &len);
    SSE(s, len,
        "{\"object\":\"list\",\"data\":[{\"id\":\"SmolLM2-135M-Instruct.Q4_1\",\"object\":\"model\","
        "\"created\":1700000000,"
        "\"owned_by\":\"ebb\"},{\"id\":\"other\",\"object\":\"model\",\"created\":1700000001,\"owned_by\":\"ebb\"}]}");
    s = oai_models_response(NULL, NULL, 0, &len);
    SSE(s, len, "{\"object\":\"list\",\"data\":[]}");

    const int32_t ids[] = {1, 9906, 49151};
    s = oai_tokenize_response(ids, 3, 8192, NULL, NULL, &len);
    SSE(s, len, "{\"count\":3,\"max_model_len\":8192,\"tokens\":[1,9906,49151]}");
    const char *pieces[] = {"<s>", " w\xc3\xb6", "\xe2\x80"};
    const size_t plens[] = {3, 4, 2};
    s = oai_tokenize_response(ids, 3, 8192, pieces, plens, &len);
    SSE(s, len,
        "{\"count\":3,\"max_model_len\":8192,\"tokens\":[1,9906,49151],\"token_strs\":[\"<s>\",\" w\xc3\xb6\","
        "\"bytes:\\\\xe2\\\\x80\"]}");
    s = oai_tokenize_response(NULL, 0, 10, NULL, NULL, &len);
    SSE(s, len, "{\"count\":0,\"max_model_len\":10,\"tokens\":[]}");
    s = oai_detokenize_response("Hello \"w\"\n\xc3\xa9", 12, &len);
    SSE(s, len, "{\"prompt\":\"Hello \\\"w\\\"\\n\xc3\xa9\"}");
    s = oai_detokenize_response("ab\xe2\x80", 4, &len);   /* a cut character becomes one U+FFFD */
    SSE(s, len, "{\"prompt\":\"ab\xef\xbf\xbd\"}");
    /* a stray byte, an overlong form (2 bytes), a UTF-8 surrogate (3), a cut
     * 4-byte character (3): each invalid byte run as Python decodes it */
    s = oai_detokenize_response("\x80|\xc0\xaf|\xed\xa0\x80|\xf0\x9f\x98|\xf4\x90\x80\x80", 17, &len);
    SSE(s, len,
        "{\"prompt\":\"\xef\xbf\xbd|\xef\xbf\xbd\xef\xbf\xbd|\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|\xef\xbf\xbd|"
        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"}");
    s = oai_detokenize_response(NULL, 0, &len);
    SSE(s, len, "{\"prompt\":\"\"}");
}

int main(void) {
    test_body_level();
    test_completion_defaults();
    test_completion_full();
    test_completion_prompt_shapes();
    test_completion_fields();
    test_chat_accepts();
    test_chat_refuses();
    test_tokenize();
    test_ids_and_names();
    test_completion_response();
    test_chat_response();
    test_chat_stream();
    test_completion_stream();
    test_choice_cap();
    test_models_and_tokenize_responses();
    return check_report("test_openai");
}
