/* Tests for server/tools.c: the grammar of calls, parsing a call list, and
 * the stream of deltas, which must add up to the parsed calls however the
 * text is cut. */
#include "server/tools.h"
#include "engine/grammar.h"
#include "tests/unit/check.h"

#include <stdio.h>
#include <string.h>

static struct oai_tool tools[] = {
    {"get_weather", "weather", "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}"},
    {"get_time", "time", "{\"$defs\":{\"zone\":{\"type\":\"string\"}},\"type\":\"object\",\"properties\":"
                         "{\"zone\":{\"$ref\":\"#/$defs/zone\"}},\"required\":[\"zone\"]}"},
    {"noop", "", "{\"type\":\"object\",\"properties\":{}}"},
};

static int accepts(const char *gbnf, const char *text) {
    char err[256];
    struct grammar *g = grammar_parse(gbnf, strlen(gbnf), err, sizeof err);
    CHECK_MSG(g != NULL, "%s", err);
    if (!g) return 0;
    struct grammar_matcher *m = grammar_matcher_new(g);
    int ok = m && grammar_matcher_accept(m, text, strlen(text)) == 0 && grammar_matcher_can_end(m);
    grammar_matcher_free(m);
    grammar_free(g);
    return ok;
}

static const char ONE[] = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
static const char TWO[] = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\n  \"zone\": \"CET \xc3\xa9\"\n}\n}\n</tool_call>\n"
                          "<tool_call>\n{\"name\": \"noop\", \"arguments\": {}}\n</tool_call>";

static void test_grammar(void) {
    char err[256], path[256];
    char *g = tools_gbnf(tools, 3, TOOL_CHOICE_AUTO, -1, true, err, sizeof err, path, sizeof path);
    CHECK_MSG(g != NULL, "%s at %s", err, path);
    if (!g) return;
    CHECK(accepts(g, ONE) && accepts(g, TWO) && accepts(g, "Sunny, I think.") && accepts(g, ""));
    CHECK(!accepts(g, "<b>bold</b>"));   /* auto: text may not start with '<' */
    CHECK(!accepts(g, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"zone\": \"x\"}}\n</tool_call>"));
    CHECK(!accepts(g, "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>"));
    free(g);
    g = tools_gbnf(tools, 3, TOOL_CHOICE_REQUIRED, -1, false, err, sizeof err, path, sizeof path);
    CHECK(g && accepts(g, ONE) && !accepts(g, TWO) && !accepts(g, "text") && !accepts(g, ""));
    free(g);
    g = tools_gbnf(tools, 3, TOOL_CHOICE_NAMED, 2, true, err, sizeof err, path, sizeof path);
    CHECK(g && !accepts(g, ONE) && accepts(g, "<tool_call>\n{\"name\": \"noop\", \"arguments\": {}}\n</tool_call>"));
    free(g);
    g = tools_gbnf(tools, 3, TOOL_CHOICE_NONE, -1, true, err, sizeof err, path, sizeof path);
    CHECK(g && !accepts(g, ONE) && accepts(g, "Just text."));
    free(g);
    struct oai_tool bad[] = {tools[0], {"f", "", "{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"string\","
                                                 "\"pattern\":\"a\"}}}"}};
    CHECK(tools_gbnf(bad, 2, TOOL_CHOICE_AUTO, -1, true, err, sizeof err, path, sizeof path) == NULL);
    CHECK_MSG(!strcmp(path, "tools[1].function.parameters.properties.x.pattern"), "%s", path);
}

static void test_parse(void) {
    struct tool_call c[4];
    CHECK(tools_parse_calls(ONE, strlen(ONE), c, 4) == 1);
    CHECK(!strcmp(c[0].name, "get_weather"));
    CHECK(c[0].args_end - c[0].args_start == 17 && !memcmp(ONE + c[0].args_start, "{\"city\": \"Paris\"}", 17));
    CHECK(tools_parse_calls(TWO, strlen(TWO), c, 4) == 2);
    CHECK(!strcmp(c[0].name, "get_time") && !strcmp(c[1].name, "noop"));
    CHECK(!memcmp(TWO + c[1].args_start, "{}", 2) && c[1].args_end - c[1].args_start == 2);
    CHECK(tools_parse_calls(TWO, strlen(TWO) - 5, c, 4) == 1);   /* the second cut short */
    CHECK(tools_parse_calls(TWO, strlen(TWO), c, 1) == 1);
    CHECK(tools_parse_calls("Hello", 5, c, 4) == -1);
    char *r = tools_render_call("get_weather", "{\"city\":\"Paris\"}");
    CHECK(r && !strcmp(r, "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"));
    free(r);
    r = tools_render_call("f", "not json");
    CHECK(r && strstr(r, "\"arguments\":\"not json\""));
    free(r);
}

struct seen {
    char names[4][65];
    char args[4][256];
    int n;
};

static int on_name(void *ud, int i, const char *name) {
    struct seen *s = ud;
    CHECK(i == s->n && i < 4);
    if (i < 4) snprintf(s->names[i], sizeof s->names[i], "%s", name);
    s->n++;
    return 0;
}

static int on_args(void *ud, int i, const char *b, size_t len) {
    struct seen *s = ud;
    CHECK(i == s->n - 1);
    if (i >= 0 && i < 4) strncat(s->args[i], b, len);
    return 0;
}

/* Every cut of the text (at character boundaries, as the detokenizer
 * releases text) streams the same calls the whole text parses to. */
static void test_stream(void) {
    const char *texts[] = {ONE, TWO};
    for (int t = 0; t < 2; t++) {
        const char *text = texts[t];
        const size_t len = strlen(text);
        struct tool_call c[4];
        const int n = tools_parse_calls(text, len, c, 4);
        for (size_t step = 1; step <= 7; step += 3) {
            struct tool_stream st = {0};
            struct seen s = {0};
            for (size_t have = 0; have < len;) {
                have += step;
                if (have > len) have = len;
                while (have < len && ((unsigned char)text[have] & 0xC0) == 0x80) have++;
                tool_stream_feed(&st, text, have, have == len, on_name, on_args, &s);
            }
            CHECK_MSG(s.n == n, "text %d step %zu: %d calls streamed, %d parsed", t, step, s.n, n);
            for (int i = 0; i < n && i < s.n; i++) {
                CHECK(!strcmp(s.names[i], c[i].name));
                CHECK_MSG(strlen(s.args[i]) == c[i].args_end - c[i].args_start &&
                              !memcmp(s.args[i], text + c[i].args_start, strlen(s.args[i])),
                          "text %d step %zu call %d: streamed '%s'", t, step, i, s.args[i]);
            }
        }
    }
}

int main(void) {
    test_grammar();
    test_parse();
    test_stream();
    return check_report("test_tools");
}
