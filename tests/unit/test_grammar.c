/* Tests for engine/grammar.c: GBNF parsing and its errors, the matcher
 * (accept, can_end, must_end, split UTF-8, clones), and the token mask.
 *
 * The mask is checked against brute force: for each token, a clone of the
 * matcher accepts the token's bytes or not, which is the definition the
 * mask must agree with. That runs on a synthetic vocabulary (multibyte,
 * partial UTF-8, empty, special and end tokens) in many states of several
 * grammars, and, when the default model is present, on its real 49,152-token
 * vocabulary, where the mask is also timed (printed, never asserted).
 */
#include "engine/grammar.h"
#include "engine/tokenizer.h"
#include "storage/gguf.h"
#include "tests/unit/check.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static struct grammar *parse(const char *text) {
    char err[256];
    struct grammar *g = grammar_parse(text, strlen(text), err, sizeof err);
    CHECK_MSG(g != NULL, "grammar refused: %s\n%s", err, text);
    return g;
}

/* 1 when the whole input is accepted and completes root; 0 when refused
 * somewhere or incomplete. */
static int matches(const struct grammar *g, const char *input, size_t n) {
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m != NULL);
    if (!m) return 0;
    int ok = grammar_matcher_accept(m, input, n) == 0 && grammar_matcher_can_end(m);
    grammar_matcher_free(m);
    return ok;
}

/* Whether text's grammar matches each of the NULL-terminated inputs as the
 * string of 'y'/'n' says. */
static void expect(const char *text, const char *const *inputs, const char *yn) {
    struct grammar *g = parse(text);
    if (!g) return;
    for (int i = 0; inputs[i]; i++) {
        int want = yn[i] == 'y';
        CHECK_MSG(matches(g, inputs[i], strlen(inputs[i])) == want, "grammar %s: input '%s' should %s",
                  text, inputs[i], want ? "match" : "not match");
    }
    grammar_free(g);
}
#define INPUTS(...) ((const char *const[]){__VA_ARGS__, NULL})

static void expect_error(const char *text, const char *where, const char *what) {
    char err[256];
    struct grammar *g = grammar_parse(text, strlen(text), err, sizeof err);
    CHECK_MSG(g == NULL, "grammar should be refused: %s", text);
    grammar_free(g);
    if (g) return;
    CHECK_MSG(strncmp(err, where, strlen(where)) == 0 && strstr(err, what),
              "grammar %s: error '%s' should start with '%s' and say '%s'", text, err, where, what);
}

/* ------------------------------------------------------------- parsing --- */

static void test_parse_errors(void) {
    expect_error("root ::= foo", "1:10:", "undefined rule 'foo'");
    expect_error("a ::= \"x\"", "1:", "no 'root'");
    expect_error("root ::= \"x\"\nroot ::= \"y\"", "2:1:", "defined twice");
    expect_error("root ::= \"abc", "1:10:", "unterminated string");
    expect_error("root ::= [a-z", "1:10:", "unterminated character class");
    expect_error("root ::= [z-a]", "1:13:", "out of order");
    expect_error("root ::= \"\\q\"", "1:11:", "unknown escape");
    expect_error("root ::= \"\\x4\"", "1:11:", "hex digits");
    expect_error("root ::= \"\\U00110000\"", "1:11:", "above U+10FFFF");
    expect_error("root ::= ( \"a\" ", "1:", "expected ')'");
    expect_error("root ::= \"a\" )", "1:14:", "unbalanced ')'");
    expect_error("root ::= * \"a\"", "1:10:", "nothing to repeat");
    expect_error("root ::= \"a\"{3,2}", "1:13:", "below the minimum");
    expect_error("root ::= \"a\"{99999999}", "1:14:", "repetition count");
    expect_error("root \"a\"", "1:6:", "expected '::='");
    expect_error("::= \"a\"", "1:1:", "expected a rule name");
    expect_error("root ::= [^\\x00-\\U0010FFFF]", "1:10:", "matches nothing");
    expect_error("root ::= []", "1:10:", "matches nothing");
    expect_error("root ::= root \"a\"", "1:1:", "left recursion");
    expect_error("root ::= a\na ::= b \"x\"\nb ::= \"\" | root", "", "left recursion");
    expect_error("root ::= (\"a\"?)*", "1:", "repetition");
    expect_error("root ::= \"\xC3\" ", "1:11:", "ill-formed UTF-8");
    expect_error("root ::= \"a\" \xFF", "1:14:", "ill-formed UTF-8");
    expect_error("root ::= \"a\"{60000} \"b\"{60000}", "1:", "too large");
    expect_error("root ::= \"a\n\"", "1:12:", "line break");
    /* Nesting is bounded: 300 '(' in a row. */
    char deep[700] = "root ::= ";
    for (int i = 0; i < 300; i++) strcat(deep, "(");
    expect_error(deep, "1:", "nested");
    /* err may be NULL or tiny. */
    CHECK(grammar_parse("root ::= x", 10, NULL, 0) == NULL);
    char tiny[4];
    CHECK(grammar_parse("root ::= x", 10, tiny, sizeof tiny) == NULL && strlen(tiny) < sizeof tiny);
}

/* ------------------------------------------------------------ matching --- */

static void test_literals_and_classes(void) {
    expect("root ::= \"abc\"", INPUTS("abc", "ab", "abcd", "", "abd"), "ynnnn");
    expect("root ::= \"a\" | \"bc\" | \"\"", INPUTS("a", "bc", "", "b", "abc"), "yyynn");
    expect("root ::= [a-c0-9_]+", INPUTS("a", "abc019_", "", "d", "a-b"), "yynnn");
    expect("root ::= [^\"\\\\]*", INPUTS("", "abc", "a\"", "\\", "é€😀"), "yynny");
    expect("root ::= [\\]\\-\\^x]", INPUTS("]", "-", "^", "x", "y"), "yyyyn");
    expect("root ::= [-a]+ [b-]", INPUTS("-a-b", "a-", "ab", "b"), "yyyn");
    expect("root ::= [^]", INPUTS("a", "😀", ""), "yyn");
    expect("root ::= . .", INPUTS("ab", "é😀", "\n\n", "a", "abc"), "yyynn");
    expect("root ::= \"\\n\\t\\r\\\\\\\"\\x41\\u00e9\\U0001F600\"", INPUTS("\n\t\r\\\"Aé😀", "x"), "yn");
    expect("root ::= [\\u0400-\\u04FF]+", INPUTS("привет", "hello", "приvет"), "ynn");
    expect("root ::= \"é\" | \"€\" | [😀-😂]", INPUTS("é", "€", "😁", "😃", "e"), "yyynn");
    /* Comments, line breaks in groups, after ::= and after |. */
    expect("# a comment\nroot ::= # here too\n  ( \"a\"   # and here\n    \"b\" ) |\n  \"c\"\n",
           INPUTS("ab", "c", "a"), "yyn");
    expect("root ::= x x\nx ::= \"1\"\r\n", INPUTS("11", "1"), "yn");
    /* As in llama.cpp, a line break outside parentheses ends the rule: a
     * next line starting with | is not a continuation. */
    expect_error("root ::= \"a\"\n  | \"b\"", "2:3:", "expected a rule name");
}

static void test_repetition(void) {
    expect("root ::= \"a\"*", INPUTS("", "a", "aaaaaaaaaa", "b"), "yyyn");
    expect("root ::= \"ab\"+", INPUTS("", "ab", "ababab", "aba"), "nyyn");
    expect("root ::= \"a\"? \"b\"", INPUTS("b", "ab", "aab"), "yyn");
    expect("root ::= [0-9]{3}", INPUTS("12", "123", "1234"), "nyn");
    expect("root ::= [0-9]{2,}", INPUTS("1", "12", "12345678"), "nyy");
    expect("root ::= [0-9]{1,3}", INPUTS("", "1", "123", "1234"), "nyyn");
    expect("root ::= [0-9]{0,2} \"x\"", INPUTS("x", "1x", "12x", "123x"), "yyyn");
    expect("root ::= (\"ab\" | \"c\"){2}", INPUTS("abc", "cc", "abab", "c", "ccc"), "yyynn");
    expect("root ::= \"a\"{0}", INPUTS("", "a"), "yn");
    expect("root ::= (\"a\"*)?", INPUTS("", "aaa"), "yy");
    expect("root ::= \"\"* \"x\"", INPUTS("x"), "y");
}

static void test_recursion(void) {
    const char *parens = "root ::= (\"(\" root \")\")*";
    expect(parens, INPUTS("", "()", "(())()", "((()))", "(()", "())", ")("), "yyyynnn");
    /* Deep nesting: 2000 levels. */
    struct grammar *g = parse(parens);
    if (g) {
        char buf[4001];
        memset(buf, '(', 2000);
        memset(buf + 2000, ')', 2000);
        buf[4000] = 0;
        CHECK(matches(g, buf, 4000));
        CHECK(!matches(g, buf, 3999));
        grammar_free(g);
    }
    /* Arithmetic, right-recursive. */
    const char *expr = "root ::= expr\nexpr ::= term (\"+\" term)*\nterm ::= num | \"(\" expr \")\"\n"
                       "num ::= [0-9]+";
    expect(expr, INPUTS("1", "1+2", "(1+2)+3", "((4))", "1+", "(1", "+1"), "yyyynnn");
}

static void test_utf8_split(void) {
    struct grammar *g = parse("root ::= [é€😀] \"x\" | \"abc\"");
    if (!g) return;
    const char *euro = "\xE2\x82\xAC";   /* € */
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, euro, 1) == 0);
    CHECK(!grammar_matcher_can_end(m) && !grammar_matcher_must_end(m));
    CHECK(grammar_matcher_accept(m, euro + 1, 1) == 0);
    CHECK(grammar_matcher_accept(m, "\x80", 1) == -1 && !grammar_matcher_error(m));   /* wrong last byte */
    CHECK(grammar_matcher_accept(m, "\xAC" "x", 2) == 0);
    CHECK(grammar_matcher_can_end(m) && grammar_matcher_must_end(m));
    grammar_matcher_free(m);
    /* A prefix no allowed character has is refused at once. */
    m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, "\xE2\x80", 2) == -1);   /* U+2000..U+203F: none allowed */
    CHECK(grammar_matcher_accept(m, "\xF0\x9F", 2) == 0);          /* could still be 😀 */
    CHECK(grammar_matcher_accept(m, "\x98", 1) == 0);
    CHECK(grammar_matcher_accept(m, "\x81", 1) == -1);             /* 😁 is not in the class */
    CHECK(grammar_matcher_accept(m, "\x80", 1) == 0);
    CHECK(grammar_matcher_accept(m, "x", 1) == 0 && grammar_matcher_must_end(m));
    /* Ill-formed bytes are refused even when the class would allow any code point. */
    grammar_matcher_free(m);
    grammar_free(g);
    g = parse("root ::= .*");
    if (!g) return;
    m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, "\xC0\x80", 2) == -1);   /* overlong */
    CHECK(grammar_matcher_accept(m, "\xED\xA0\x80", 3) == -1);     /* surrogate */
    CHECK(grammar_matcher_accept(m, "\xF4\x90", 2) == -1);         /* above U+10FFFF */
    CHECK(grammar_matcher_accept(m, "\x80", 1) == -1);             /* stray continuation */
    CHECK(grammar_matcher_accept(m, "\xF4\x8F\xBF", 3) == 0 && !grammar_matcher_can_end(m));
    CHECK(grammar_matcher_accept(m, "\xBF", 1) == 0 && grammar_matcher_can_end(m));
    CHECK(!grammar_matcher_must_end(m));
    grammar_matcher_free(m);
    grammar_free(g);
}

static void test_end_and_clone(void) {
    struct grammar *g = parse("root ::= \"ab\" \"c\"?");
    if (!g) return;
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m && !grammar_matcher_can_end(m) && !grammar_matcher_must_end(m));
    CHECK(grammar_matcher_accept(m, "ab", 2) == 0 && grammar_matcher_can_end(m) && !grammar_matcher_must_end(m));
    struct grammar_matcher *c = grammar_matcher_clone(m);
    CHECK(c != NULL);
    if (c) {
        CHECK(grammar_matcher_accept(c, "c", 1) == 0 && grammar_matcher_must_end(c));
        CHECK(!grammar_matcher_must_end(m));   /* the original did not move */
        CHECK(grammar_matcher_accept(m, "d", 1) == -1 && grammar_matcher_can_end(m));
        CHECK(grammar_matcher_accept(c, "c", 1) == -1);
        grammar_matcher_free(c);
    }
    /* A refused call leaves the state exactly as it was, even partway. */
    CHECK(grammar_matcher_accept(m, "cc", 2) == -1);
    CHECK(grammar_matcher_accept(m, "c", 1) == 0 && grammar_matcher_must_end(m));
    CHECK(grammar_matcher_accept(m, "", 0) == 0);
    grammar_matcher_free(m);
    grammar_free(g);
}

static void test_stack_limit(void) {
    /* After n "x" the pending closers are any of 2^n strings of 1s and 2s:
     * that many distinct stacks, past GRAMMAR_MAX_STACKS by n = 12. */
    struct grammar *g = parse("root ::= s\ns ::= \"x\" ( s \"1\" | s \"2\" | \"\" )");
    if (!g) return;
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, "xxxx", 4) == 0 && !grammar_matcher_error(m));
    int refused_at = 0;
    for (int i = 5; i <= 16 && m && !refused_at; i++)
        if (grammar_matcher_accept(m, "x", 1)) refused_at = i;
    CHECK_MSG(refused_at >= 12 && refused_at <= 14, "refused at %d", refused_at);
    CHECK(m && grammar_matcher_error(m));
    /* The state before the refusal is intact and still usable. */
    CHECK(m && grammar_matcher_accept(m, "12", 2) == 0 && !grammar_matcher_error(m));
    grammar_matcher_free(m);
    grammar_free(g);
}

/* ---------------------------------------------------------------- mask --- */

struct test_vocab {
    int n;
    char **piece;
    size_t *len;
    uint8_t *end, *special;
};

static const char *tv_piece(void *ud, int32_t id, size_t *len) {
    struct test_vocab *v = ud;
    *len = v->len[id];
    return v->piece[id];
}
static int tv_end(void *ud, int32_t id) { return ((struct test_vocab *)ud)->end[id]; }
static int tv_special(void *ud, int32_t id) { return ((struct test_vocab *)ud)->special[id]; }

static void tv_add(struct test_vocab *v, const char *s, size_t len, int end, int special) {
    v->piece[v->n] = malloc(len + 1);
    if (!v->piece[v->n]) { CHECK(0); return; }
    memcpy(v->piece[v->n], s, len);
    v->len[v->n] = len;
    v->end[v->n] = (uint8_t)end;
    v->special[v->n] = (uint8_t)special;
    v->n++;
}

/* A few hundred pieces: ASCII words and fragments, JSON punctuation, whole
 * and cut multibyte characters, duplicates, empty, special and end tokens. */
static void tv_build(struct test_vocab *v) {
    enum { CAP = 1024 };
    v->n = 0;
    v->piece = calloc(CAP, sizeof *v->piece);
    v->len = calloc(CAP, sizeof *v->len);
    v->end = calloc(CAP, 1);
    v->special = calloc(CAP, 1);
    if (!v->piece || !v->len || !v->end || !v->special) { CHECK(0); return; }
    for (int c = 0; c < 256; c++) { char b = (char)c; tv_add(v, &b, 1, 0, 0); }
    static const char *words[] = {
        "{", "}", "[", "]", "\"", ",", ":", " ", "  ", "\n", "\n  ", "{\"", "\":", "\",", "\"}", "\"]",
        "true", "false", "null", "tru", "nul", "0", "00", "12", "-1", ".5", "e+", "1e5", "-0.",
        "name", "age", "\"name", "\"age\":", "hello", " world", "ab", "abc", "aab", "ba", "(", ")", "()",
        "((", "))", "\\", "\\n", "\\\"", "\\u", "\\u00", "00e9", "é", "€", "😀", "é\"", "x€y", "привет",
        "\xE2\x82", "\xAC", "\xF0\x9F", "\x98\x80", "\xF0\x9F\x98", "\x80\x80", "a\xC3", "\xA9z",
        "abc", "ab", "\"\"", "{}", "[]", "[1", ",\"", "\t", "\r\n", "12345", "3.14", "E-", "+", "-",
    };
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) tv_add(v, words[i], strlen(words[i]), 0, 0);
    tv_add(v, "", 0, 0, 0);
    tv_add(v, "", 0, 0, 0);
    tv_add(v, "<|im_start|>", 12, 0, 1);
    tv_add(v, "<|im_end|>", 10, 1, 1);
    tv_add(v, "</s>", 4, 1, 0);
    tv_add(v, "<special>", 9, 0, 1);
}

static void tv_free(struct test_vocab *v) {
    for (int i = 0; i < v->n; i++) free(v->piece[i]);
    free(v->piece);
    free(v->len);
    free(v->end);
    free(v->special);
}

/* Brute force: each token allowed iff a clone accepts its bytes (end tokens
 * iff can_end; empty or special never). Compares with grammar_mask and
 * grammar_token_allowed. Returns the mask's count. */
static int compare_mask(const struct grammar_matcher *m, const struct grammar_vocab *gv, int n,
                        const char *(*piece)(void *, int32_t, size_t *), int (*is_end)(void *, int32_t),
                        int (*is_special)(void *, int32_t), void *ud, const char *what) {
    uint8_t *mask = malloc((size_t)n);
    if (!mask) { CHECK(0); return -1; }
    int count = grammar_mask(m, gv, mask), want_count = 0, bad = 0;
    for (int32_t id = 0; id < n; id++) {
        size_t len;
        const char *p = piece(ud, id, &len);
        int want;
        if (is_end(ud, id)) want = grammar_matcher_can_end(m);
        else if (!p || !len || is_special(ud, id)) want = 0;
        else {
            struct grammar_matcher *c = grammar_matcher_clone(m);
            want = c && grammar_matcher_accept(c, p, len) == 0;
            grammar_matcher_free(c);
        }
        want_count += want;
        if (mask[id] != want || grammar_token_allowed(m, gv, id) != want) {
            if (bad++ < 5)
                fprintf(stderr, "%s: token %d '%.*s': mask %d, one-token %d, brute force %d\n", what, id,
                        (int)len, p ? p : "", mask[id], grammar_token_allowed(m, gv, id), want);
        }
    }
    CHECK_MSG(bad == 0 && count == want_count, "%s: %d tokens differ, count %d vs %d", what, bad, count,
              want_count);
    free(mask);
    return count;
}

/* Walks text through the grammar one byte at a time, comparing the mask in
 * every state (partial characters included). */
static void mask_walk(const char *grammar, const char *text, struct test_vocab *tv,
                      const struct grammar_vocab *gv) {
    struct grammar *g = parse(grammar);
    if (!g) return;
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m != NULL);
    char what[96];
    size_t n = strlen(text);
    for (size_t i = 0; m && i <= n; i++) {
        snprintf(what, sizeof what, "grammar %.40s after %zu bytes", grammar, i);
        compare_mask(m, gv, tv->n, tv_piece, tv_end, tv_special, tv, what);
        if (i < n) CHECK_MSG(grammar_matcher_accept(m, text + i, 1) == 0, "%s: byte %zu refused", grammar, i);
    }
    grammar_matcher_free(m);
    grammar_free(g);
}

static const char *JSON_GRAMMAR =
    "root ::= object\n"
    "value ::= object | array | string | number | \"true\" | \"false\" | \"null\"\n"
    "object ::= \"{\" ws ( string ws \":\" ws value ws ( \",\" ws string ws \":\" ws value ws )* )? \"}\"\n"
    "array ::= \"[\" ws ( value ws ( \",\" ws value ws )* )? \"]\"\n"
    "string ::= \"\\\"\" char* \"\\\"\"\n"
    "char ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4} )\n"
    "number ::= \"-\"? ( \"0\" | [1-9] [0-9]* ) ( \".\" [0-9]+ )? ( [eE] [-+]? [0-9]+ )?\n"
    "ws ::= ( \" \" | \"\\n\" [ \\t]{0,20} )?\n";

static void test_mask_synthetic(void) {
    struct test_vocab tv;
    tv_build(&tv);
    struct grammar_vocab *gv = grammar_vocab_new(tv.n, tv_piece, tv_end, tv_special, &tv);
    CHECK(gv != NULL && grammar_vocab_size(gv) == tv.n);
    if (gv) {
        mask_walk(JSON_GRAMMAR, "{\"name\": \"h\\u00e9llo €😀\", \"age\": [-1.5e+3, true, null, {}]}", &tv, gv);
        mask_walk("root ::= (\"(\" root \")\")*", "(()(()))", &tv, gv);
        mask_walk("root ::= [é€😀]+ \"x\"", "é😀€x", &tv, gv);
        mask_walk("root ::= \"abc\" | \"ab\" \"c\"? \"d\"{0,2}", "abdd", &tv, gv);
        mask_walk("root ::= [^a]*", "b€\n", &tv, gv);
        /* Out-of-range ids are never allowed. */
        struct grammar *g = parse("root ::= .*");
        struct grammar_matcher *m = g ? grammar_matcher_new(g) : NULL;
        if (m) {
            CHECK(grammar_token_allowed(m, gv, -1) == 0 && grammar_token_allowed(m, gv, tv.n) == 0);
            grammar_matcher_free(m);
        }
        grammar_free(g);
    }
    grammar_vocab_free(gv);
    tv_free(&tv);
    /* An empty vocabulary works. */
    struct grammar_vocab *empty = grammar_vocab_new(0, tv_piece, NULL, NULL, NULL);
    CHECK(empty != NULL);
    grammar_vocab_free(empty);
}

/* ---------------------------------------------------------- real model --- */

static const char *tok_piece(void *ud, int32_t id, size_t *len) { return tokenizer_piece(ud, id, len); }
static int tok_end(void *ud, int32_t id) {
    const struct ebb_tokenizer *t = ud;
    return id == tokenizer_eos(t) || id == tokenizer_find(t, "<|im_end|>");
}
static int tok_special(void *ud, int32_t id) { return tokenizer_is_control(ud, id); }

static void time_mask(const char *name, const struct grammar *g, const char *prefix,
                      const struct grammar_vocab *gv, struct ebb_tokenizer *t) {
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, prefix, strlen(prefix)) == 0);
    if (!m) return;
    int n = tokenizer_n_vocab(t);
    uint8_t *mask = malloc((size_t)n);
    if (!mask) { CHECK(0); grammar_matcher_free(m); return; }
    int count = grammar_mask(m, gv, mask);   /* warm-up */
    enum { RUNS = 20 };
    double t0 = now_s();
    for (int i = 0; i < RUNS; i++) count = grammar_mask(m, gv, mask);
    double ms = (now_s() - t0) * 1e3 / RUNS;
    t0 = now_s();
    int one = 0;
    for (int i = 0; i < 1000; i++) one += grammar_token_allowed(m, gv, 12345 + i % 64);
    double us = (now_s() - t0) * 1e6 / 1000;
    printf("test_grammar: mask %-28s %6.3f ms, %5d tokens allowed; one token %.2f us\n", name, ms, count, us);
    char what[96];
    snprintf(what, sizeof what, "real vocabulary, %s", name);
    compare_mask(m, gv, n, tok_piece, tok_end, tok_special, t, what);
    free(mask);
    grammar_matcher_free(m);
}

static void test_real_vocab(const char *path) {
    char err[512];
    struct gguf_file f;
    if (gguf_open(&f, path, err, sizeof err)) { CHECK_MSG(0, "%s", err); return; }
    struct ebb_tokenizer *t = tokenizer_load(&f, err, sizeof err);
    gguf_close(&f);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    double t0 = now_s();
    struct grammar_vocab *gv = grammar_vocab_new(tokenizer_n_vocab(t), tok_piece, tok_end, tok_special, t);
    printf("test_grammar: grammar_vocab_new %.1f ms\n", (now_s() - t0) * 1e3);
    struct grammar *g = parse(JSON_GRAMMAR);
    if (gv && g) {
        time_mask("start of object", g, "", gv, t);
        time_mask("after '{'", g, "{", gv, t);
        time_mask("inside a key string", g, "{\"na", gv, t);
        time_mask("inside a value string", g, "{\"name\": \"Hello wor", gv, t);
        time_mask("after a value", g, "{\"name\": \"x\"", gv, t);
        time_mask("inside a number", g, "{\"age\": 12", gv, t);
        time_mask("after ':' (any value)", g, "{\"a\": [1, {\"b\":", gv, t);
        time_mask("complete", g, "{}", gv, t);
    }
    /* A string of bounded length (a schema's maxLength): every character
     * moves to a new state, so the walk cannot reuse rows within a token. */
    struct grammar *bounded = parse("root ::= \"\\\"\" [^\"\\\\]{0,200} \"\\\"\"");
    if (gv && bounded) time_mask("in a {0,200} string", bounded, "\"abc", gv, t);
    grammar_free(bounded);
    grammar_free(g);
    grammar_vocab_free(gv);
    tokenizer_free(t);
}

int main(void) {
    test_parse_errors();
    test_literals_and_classes();
    test_repetition();
    test_recursion();
    test_utf8_split();
    test_end_and_clone();
    test_stack_limit();
    test_mask_synthetic();
    char path[1024];
    if (check_model_path(path, sizeof path)) return check_report_skipped("test_grammar", path);
    test_real_vocab(path);
    return check_report("test_grammar");
}
