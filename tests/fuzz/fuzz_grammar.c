/* Fuzz target: what structured output reads from a request. Byte 0 picks
 * (its value mod 4):
 *   0 GBNF text ("grammar"): grammar_parse, and when it compiles, a matcher
 *     fed probe texts byte by byte, whose mask over a small vocabulary must
 *     agree with grammar_token_allowed token by token;
 *   1 a JSON Schema (response_format json_schema): json_schema_to_gbnf,
 *     whose result must compile (json_schema.h promises it), then as 0;
 *   2 a tools array as a request sends it: openai_parse_chat with it, and
 *     when accepted, its compiled grammar run as 0;
 *   3 a call list as a model might write it: tools_parse_calls and the
 *     stream of deltas cut at every byte must agree.
 * The rest of the input is the text. Refusals must carry a message. */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>
#include <string.h>

#include "engine/grammar.h"
#include "server/json_schema.h"
#include "server/openai.h"
#include "server/tools.h"

static const char *const PIECES[] = {"{", "}", "\"", "a", "ab", " ", "\n", "[", "]", ",", ":", "1", "-", ".", "e",
                                     "true", "null", "\xc3", "\xa9", "\xc3\xa9", "<tool_call>", "\n</tool_call>",
                                     "\\", "\\u00", "é", "", "x\"", "0"};
#define N_PIECES ((int)(sizeof PIECES / sizeof PIECES[0]))

static const char *piece(void *ud, int32_t id, size_t *len) {
    (void)ud;
    *len = strlen(PIECES[id]);
    return PIECES[id];
}
static int is_end(void *ud, int32_t id) { (void)ud; return id == N_PIECES - 1; }

static struct grammar_vocab *vocab(void) {
    static struct grammar_vocab *v;
    if (!v) v = grammar_vocab_new(N_PIECES, piece, is_end, NULL, NULL);
    return v;
}

/* Masks along each probe, checked token by token against
 * grammar_token_allowed at the first two positions (each call is bounded,
 * but a very ambiguous grammar makes every one of them expensive, so the
 * check is kept to where most of the coverage is). */
static void exercise(const struct grammar *g) {
    static const char *const probes[] = {"{\"a\": 1}", "[true, null]", "\"\xc3\xa9\"", "<tool_call>\n{", "abc", ""};
    uint8_t allowed[N_PIECES];
    for (size_t p = 0; p < sizeof probes / sizeof probes[0]; p++) {
        struct grammar_matcher *m = grammar_matcher_new(g);
        if (!m) return;
        for (size_t i = 0; i <= strlen(probes[p]); i++) {
            const int n = grammar_mask(m, vocab(), allowed);
            if (n >= 0 && i < 2) {
                int count = 0;
                for (int t = 0; t < N_PIECES; t++) {
                    FUZZ_ASSERT(allowed[t] == grammar_token_allowed(m, vocab(), t));
                    count += allowed[t];
                }
                FUZZ_ASSERT(count == n);
            }
            if (i == strlen(probes[p]) || grammar_matcher_accept(m, probes[p] + i, 1)) break;
        }
        grammar_matcher_free(m);
    }
}

static void run_gbnf(const char *text, size_t len, bool must_compile) {
    char err[256];
    struct grammar *g = grammar_parse(text, len, err, sizeof err);
    FUZZ_ASSERT(g || (!must_compile && err[0]));
    if (g) exercise(g);
    grammar_free(g);
}

static int on_name(void *ud, int i, const char *name) {
    (void)name;
    int *n = ud;
    FUZZ_ASSERT(i == *n);
    ++*n;
    return 0;
}
static int on_args(void *ud, int i, const char *b, size_t len) {
    (void)ud; (void)i; (void)b; (void)len;
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) { (void)argc; (void)argv; return 0; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 1 << 16) return 0;
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;
    switch (data[0] & 3) {
    case 0:
        run_gbnf(text, len, false);
        break;
    case 1: {
        json_t *schema = json_loadb(text, len, JSON_DECODE_ANY, NULL);
        if (!schema) break;
        char err[256], path[256];
        char *gbnf = json_schema_to_gbnf(schema, err, sizeof err, path, sizeof path);
        FUZZ_ASSERT(gbnf || err[0]);
        if (gbnf) run_gbnf(gbnf, strlen(gbnf), true);
        free(gbnf);
        json_decref(schema);
        break;
    }
    case 2: {
        static const char head[] = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": ";
        char *body = malloc(sizeof head + len + 1);
        if (!body) break;
        memcpy(body, head, sizeof head - 1);
        memcpy(body + sizeof head - 1, text, len);
        body[sizeof head - 1 + len] = '}';
        struct oai_request r;
        struct oai_error e;
        if (openai_parse_chat(body, sizeof head + len, &r, &e) == 0) {
            if (r.grammar) exercise(r.grammar);
            oai_request_free(&r);
        } else {
            FUZZ_ASSERT(e.message[0] && (e.status == 400 || e.status == 503));
        }
        free(body);
        break;
    }
    default: {
        struct tool_call calls[TOOLS_MAX_CALLS];
        const int n = tools_parse_calls(text, len, calls, TOOLS_MAX_CALLS);
        for (int i = 0; i < n; i++) FUZZ_ASSERT(calls[i].args_start <= calls[i].args_end && calls[i].args_end <= len);
        struct tool_stream st = {0};
        int named = 0;
        for (size_t have = 0; have <= len; have++) tool_stream_feed(&st, text, have, have == len, on_name, on_args, &named);
        FUZZ_ASSERT(named <= TOOLS_MAX_CALLS * 64 + 1);
        break;
    }
    }
    return 0;
}
