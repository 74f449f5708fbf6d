/* Tests for server/json_schema.c: schemas compiled to GBNF, then run through
 * the grammar matcher (engine/grammar.c) on JSON texts known to be valid or
 * invalid under them, and every unsupported keyword refused by name and
 * path.
 *
 * A valid text must be accepted whole and leave the matcher able to end; an
 * invalid one must be refused at some byte or left incomplete. Valid texts
 * are written in the form json_schema.h promises to accept (members in
 * schema order, bounded whitespace).
 */
#include "engine/grammar.h"
#include "server/json_schema.h"
#include "tests/unit/check.h"

#include <jansson.h>
#include <string.h>

static struct grammar *compile_text(const char *schema_text) {
    json_error_t jerr;
    json_t *schema = json_loads(schema_text, JSON_DECODE_ANY, &jerr);
    CHECK_MSG(schema != NULL, "bad test schema: %s: %s", jerr.text, schema_text);
    if (!schema) return NULL;
    char err[256], path[256];
    char *gbnf = json_schema_to_gbnf(schema, err, sizeof err, path, sizeof path);
    json_decref(schema);
    CHECK_MSG(gbnf != NULL, "schema refused: %s at '%s': %s", err, path, schema_text);
    if (!gbnf) return NULL;
    struct grammar *g = grammar_parse(gbnf, strlen(gbnf), err, sizeof err);
    CHECK_MSG(g != NULL, "grammar refused: %s\n%s", err, gbnf);
    free(gbnf);
    return g;
}

static int matches(const struct grammar *g, const char *text) {
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m != NULL);
    if (!m) return 0;
    int ok = grammar_matcher_accept(m, text, strlen(text)) == 0 && grammar_matcher_can_end(m);
    grammar_matcher_free(m);
    return ok;
}

#define TEXTS(...) ((const char *const[]){__VA_ARGS__, NULL})

static void expect(const char *schema, const char *const *valid, const char *const *invalid) {
    struct grammar *g = compile_text(schema);
    if (!g) return;
    for (int i = 0; valid[i]; i++)
        CHECK_MSG(matches(g, valid[i]), "schema %s: should accept %s", schema, valid[i]);
    for (int i = 0; invalid[i]; i++)
        CHECK_MSG(!matches(g, invalid[i]), "schema %s: should refuse %s", schema, invalid[i]);
    grammar_free(g);
}

static void expect_refused(const char *schema_text, const char *what, const char *where) {
    json_error_t jerr;
    json_t *schema = json_loads(schema_text, JSON_DECODE_ANY, &jerr);
    CHECK_MSG(schema != NULL, "bad test schema: %s", schema_text);
    if (!schema) return;
    char err[256], path[256];
    char *gbnf = json_schema_to_gbnf(schema, err, sizeof err, path, sizeof path);
    json_decref(schema);
    CHECK_MSG(gbnf == NULL, "schema should be refused: %s", schema_text);
    free(gbnf);
    if (gbnf) return;
    CHECK_MSG(strstr(err, what) != NULL, "schema %s: error '%s' should mention '%s'", schema_text, err, what);
    CHECK_MSG(!strcmp(path, where), "schema %s: path '%s' should be '%s'", schema_text, path, where);
}

static void test_scalars(void) {
    /* Digit runs are bounded (json_schema.h): 19 integer digits, 16 after
     * the point, 3 in the exponent. */
    expect("{\"type\":\"integer\"}", TEXTS("0", "-7", "1234567890123456789"),
           TEXTS("", "01", "-", "1.5", "1e3", "+1", " 1", "\"1\"", "12345678901234567890"));
    expect("{\"type\":\"number\"}", TEXTS("0", "-0.5", "1e10", "2.5E-3", "10", "0.1234567890123456", "1e-308"),
           TEXTS("00", ".5", "1.", "1e", "--1", "1.2.3", "NaN", "0.12345678901234567", "1e1000"));
    expect("{\"type\":\"boolean\"}", TEXTS("true", "false"), TEXTS("True", "1", "null"));
    expect("{\"type\":\"null\"}", TEXTS("null"), TEXTS("nul", "\"null\""));
    expect("{\"type\":\"string\"}",
           TEXTS("\"\"", "\"abc\"", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\u00e9\\uD83D\\uDE00\"", "\"é€😀\""),
           TEXTS("\"abc", "abc", "\"\\x41\"", "\"\\u00g0\"", "\"a\nb\"", "\"\t\"", "'a'"));
    expect("{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}", TEXTS("\"ab\"", "\"abc\"", "\"é\\n\""),
           TEXTS("\"a\"", "\"abcd\"", "\"\""));
    expect("{\"type\":[\"string\",\"null\"]}", TEXTS("\"x\"", "null"), TEXTS("1", "true"));
    expect("{}", TEXTS("1", "{\"a\":[true,null]}", "\"s\"", "[ ]"), TEXTS("{", "tru"));
    expect("true", TEXTS("[1,2]"), TEXTS("[1,"));
}

static void test_formats(void) {
    expect("{\"type\":\"string\",\"format\":\"date\"}", TEXTS("\"2024-02-29\""),
           TEXTS("\"2024-13-01\"", "\"24-01-01\"", "\"x\""));
    expect("{\"type\":\"string\",\"format\":\"date-time\"}",
           TEXTS("\"2024-02-29T12:34:56Z\"", "\"2024-02-29T23:59:59.123+05:30\""),
           TEXTS("\"2024-02-29 12:34:56Z\"", "\"2024-02-29T24:00:00Z\""));
    expect("{\"type\":\"string\",\"format\":\"uuid\"}", TEXTS("\"123e4567-e89b-12d3-a456-426614174000\""),
           TEXTS("\"123e4567e89b12d3a456426614174000\""));
}

static void test_enum_const(void) {
    expect("{\"enum\":[\"red\",\"a \\\"quoted\\\" \\\\ word\",\"é😀\",\"\\u0001\",1,2.5,null,true,[1,\"x\"],{\"k\":1}]}",
           TEXTS("\"red\"", "\"a \\\"quoted\\\" \\\\ word\"", "\"é😀\"", "\"\\u0001\"", "1", "2.5", "null", "true",
                 "[1,\"x\"]", "{\"k\":1}"),
           TEXTS("\"blue\"", "\"re\"", "2", "false", "\"\\u00e9😀\""));
    expect("{\"type\":\"string\",\"enum\":[\"a\",1,\"b\"]}", TEXTS("\"a\"", "\"b\""), TEXTS("1"));
    expect("{\"const\":\"fixed\"}", TEXTS("\"fixed\""), TEXTS("\"other\""));
    expect("{\"const\":0.1}", TEXTS("0.1"), TEXTS("0.10000000000000001"));
}

static void test_objects(void) {
    const char *person = "{\"type\":\"object\",\"properties\":{"
                         "\"name\":{\"type\":\"string\"},"
                         "\"age\":{\"type\":\"integer\"},"
                         "\"email\":{\"type\":\"string\"},"
                         "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\"}}},"
                         "\"required\":[\"name\",\"tags\"],\"additionalProperties\":false}";
    expect(person,
           TEXTS("{\"name\":\"Bo\",\"tags\":[]}", "{\"name\":\"Bo\",\"age\":3,\"tags\":[\"x\"]}",
                 "{\"name\":\"Bo\",\"age\":3,\"email\":\"e\",\"tags\":[\"x\",\"y\"]}",
                 "{\"name\":\"Bo\",\"email\":\"e\",\"tags\":[]}",
                 "{\n  \"name\": \"Bo\",\n  \"tags\": [ \"x\" ]\n}"),
           TEXTS("{\"tags\":[]}", "{\"name\":\"Bo\"}", "{\"name\":\"Bo\",\"tags\":[],\"extra\":1}",
                 "{\"name\":1,\"tags\":[]}", "{\"name\":\"Bo\",\"tags\":[1]}", "{\"name\":\"Bo\",,\"tags\":[]}",
                 "{\"name\":\"Bo\",\"tags\":[],}", "{\"name\":\"Bo\",\"age\":03,\"tags\":[]}",
                 "{\"name\":\"Bo\"  ,\"tags\":[]}", "{\"name\":\"Bo\",\"tags\":[]}\n"));
    /* All optional: any in-order subset, the empty object included. */
    const char *opt = "{\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"integer\"},"
                      "\"c\":{\"type\":\"integer\"}}}";
    expect(opt, TEXTS("{}", "{ }", "{\"a\":1}", "{\"b\":1}", "{\"c\":1}", "{\"a\":1,\"c\":3}", "{\"b\":2,\"c\":3}",
                      "{\"a\":1,\"b\":2,\"c\":3}"),
           TEXTS("{,}", "{\"b\":1,\"a\":1}", "{\"a\":1,}", "{,\"a\":1}", "{\"d\":1}"));
    /* Many optional members stay small (no subset explosion). */
    char big[8192] = "{\"type\":\"object\",\"properties\":{";
    for (int i = 0; i < 200; i++) {
        char one[64];
        snprintf(one, sizeof one, "%s\"p%d\":{\"type\":\"boolean\"}", i ? "," : "", i);
        strcat(big, one);
    }
    strcat(big, "}}");
    expect(big, TEXTS("{}", "{\"p3\":true,\"p150\":false}"), TEXTS("{\"p150\":false,\"p3\":true}"));
    /* Maps. */
    expect("{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
           TEXTS("{}", "{\"x\":1,\"y\":2}"), TEXTS("{\"x\":\"1\"}"));
    expect("{\"type\":\"object\"}", TEXTS("{}", "{\"x\":[1,{\"y\":null}]}"), TEXTS("[]", "{\"x\"}"));
    expect("{\"type\":\"object\",\"additionalProperties\":false}", TEXTS("{}"), TEXTS("{\"x\":1}"));
    /* Keys with escapes and non-ASCII. */
    expect("{\"properties\":{\"a\\\"b\":{\"const\":1},\"ключ\":{\"const\":2}},\"required\":[\"a\\\"b\",\"ключ\"]}",
           TEXTS("{\"a\\\"b\":1,\"ключ\":2}"), TEXTS("{\"ab\":1,\"ключ\":2}"));
}

static void test_arrays(void) {
    expect("{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":1,\"maxItems\":3}",
           TEXTS("[1]", "[1,2]", "[1, 2, 3]", "[ 1 ]"), TEXTS("[]", "[1,2,3,4]", "[1,]", "[,1]", "[\"a\"]"));
    expect("{\"type\":\"array\",\"maxItems\":2}", TEXTS("[]", "[1,\"x\"]"), TEXTS("[1,2,3]"));
    expect("{\"type\":\"array\",\"minItems\":2}", TEXTS("[1,2]", "[1,2,3,4,5]"), TEXTS("[1]", "[]"));
    expect("{\"type\":\"array\",\"items\":false}", TEXTS("[]"), TEXTS("[1]"));
    expect("{\"type\":\"array\",\"maxItems\":0}", TEXTS("[]", "[ ]"), TEXTS("[1]"));
    expect("{\"type\":\"array\",\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"integer\"}]}",
           TEXTS("[\"a\",1]", "[ \"a\" , 1 ]"), TEXTS("[\"a\"]", "[1,\"a\"]", "[\"a\",1,2]"));
}

static void test_combinators_and_refs(void) {
    expect("{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"string\",\"maxLength\":1}]}", TEXTS("5", "\"x\""),
           TEXTS("\"xy\"", "true"));
    expect("{\"oneOf\":[{\"const\":1},{\"const\":2}]}", TEXTS("1", "2"), TEXTS("3"));
    expect("{\"allOf\":[{\"type\":\"boolean\"}],\"description\":\"d\"}", TEXTS("true"), TEXTS("1"));
    /* Recursion through $defs: a tree. */
    const char *tree = "{\"$ref\":\"#/$defs/node\",\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{"
                       "\"v\":{\"type\":\"integer\"},\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},"
                       "\"required\":[\"v\"],\"additionalProperties\":false}}}";
    expect(tree, TEXTS("{\"v\":1}", "{\"v\":1,\"kids\":[{\"v\":2},{\"v\":3,\"kids\":[{\"v\":4,\"kids\":[]}]}]}"),
           TEXTS("{\"kids\":[]}", "{\"v\":1,\"kids\":[{}]}"));
    /* definitions, and the root "#". */
    expect("{\"definitions\":{\"a b/c\":{\"type\":\"null\"}},\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/a b~1c\"}}",
           TEXTS("[null]"), TEXTS("[1]"));
    expect("{\"type\":\"array\",\"items\":{\"anyOf\":[{\"type\":\"integer\"},{\"$ref\":\"#\"}]}}",
           TEXTS("[]", "[1,[2,[]]]"), TEXTS("[[\"x\"]]"));
    /* Pydantic's usual shape: Optional[int] with a default and a title. */
    expect("{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"null\"}],\"default\":null,\"title\":\"X\"}",
           TEXTS("1", "null"), TEXTS("\"1\""));
}

static void test_refusals(void) {
    expect_refused("{\"type\":\"string\",\"pattern\":\"^a\"}", "pattern", "pattern");
    expect_refused("{\"properties\":{\"age\":{\"type\":\"integer\",\"minimum\":0}}}", "minimum",
                   "properties.age.minimum");
    expect_refused("{\"$ref\":\"#/$defs/Foo\",\"$defs\":{\"Foo\":{\"type\":\"object\",\"patternProperties\":{}}}}",
                   "patternProperties", "$defs.Foo.patternProperties");
    expect_refused("{\"type\":\"number\",\"multipleOf\":2}", "multipleOf", "multipleOf");
    expect_refused("{\"not\":{}}", "not", "not");
    expect_refused("{\"if\":{},\"then\":{}}", "if", "if");
    expect_refused("{\"type\":\"array\",\"uniqueItems\":true}", "uniqueItems", "uniqueItems");
    expect_refused("{\"type\":\"array\",\"contains\":{}}", "contains", "contains");
    expect_refused("{\"type\":\"object\",\"dependentRequired\":{}}", "dependentRequired", "dependentRequired");
    expect_refused("{\"type\":\"string\",\"format\":\"email\"}", "email", "format");
    expect_refused("{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"string\",\"pattern\":\"x\"}]}", "pattern",
                   "anyOf.1.pattern");
    expect_refused("{\"allOf\":[{},{}]}", "allOf", "allOf");
    expect_refused("{\"$ref\":\"#/$defs/Missing\"}", "no such definition", "$ref");
    expect_refused("{\"$ref\":\"http://x/y\"}", "supported", "$ref");
    expect_refused("{\"$ref\":\"#/$defs/A\",\"type\":\"object\",\"$defs\":{\"A\":{}}}", "beside '$ref'", "type");
    expect_refused("{\"type\":\"strin\"}", "not a JSON Schema type", "type");
    expect_refused("{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"]}", "'b'", "required");
    expect_refused("{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", "below", "maxItems");
    expect_refused("{\"type\":\"array\",\"maxItems\":100000}", "above the supported", "maxItems");
    expect_refused("{\"type\":\"string\",\"minLength\":-1}", "non-negative", "minLength");
    expect_refused("{\"type\":\"array\",\"items\":[{}]}", "prefixItems", "items");
    expect_refused("{\"enum\":[]}", "non-empty", "enum");
    expect_refused("{\"type\":\"integer\",\"enum\":[\"a\"]}", "no 'enum' value", "enum");
    expect_refused("{\"properties\":{\"x\":false}}", "matches nothing", "properties.x");
    expect_refused("[1]", "object or a boolean", "");
    expect_refused("{\"$ref\":\"#/$defs/A\",\"$defs\":{\"A\":{\"anyOf\":[{\"$ref\":\"#/$defs/A\"},{\"type\":\"null\"}]}}}",
                   "consumes no input", "");
    /* Nesting depth. */
    char deep[2048] = "";
    for (int i = 0; i < 100; i++) strcat(deep, "{\"items\":");
    strcat(deep, "{}");
    for (int i = 0; i < 100; i++) strcat(deep, "}");
    json_t *s = json_loads(deep, 0, NULL);
    char err[256], path[1024];
    char *gbnf = s ? json_schema_to_gbnf(s, err, sizeof err, path, sizeof path) : NULL;
    CHECK(s && !gbnf && strstr(err, "nested"));
    free(gbnf);
    json_decref(s);
    /* err and err_path may be NULL. */
    s = json_loads("{\"pattern\":\"x\"}", 0, NULL);
    CHECK(s && json_schema_to_gbnf(s, NULL, 0, NULL, 0) == NULL);
    json_decref(s);
}

static void test_any_object(void) {
    const char *text = json_schema_any_object_gbnf();
    char err[256];
    struct grammar *g = grammar_parse(text, strlen(text), err, sizeof err);
    CHECK_MSG(g != NULL, "%s", err);
    if (!g) return;
    const char *good[] = {"{}", "{\"a\":1}", "{\"a\": [1, 2.5e3, \"x\", true, false, null, {\"b\": {}}]}",
                          "{\n  \"a\": 1,\n  \"b\": \"\\u00e9\"\n}"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) CHECK_MSG(matches(g, good[i]), "%s", good[i]);
    const char *bad[] = {"[]", "1", "{\"a\":1,}", "{a:1}", "{\"a\":01}", "{   }", "{\n\n}", " {}"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) CHECK_MSG(!matches(g, bad[i]), "%s", bad[i]);
    /* Whitespace is bounded: 21 spaces after a line break are refused. */
    CHECK(matches(g, "{\n                    }"));
    CHECK(!matches(g, "{\n                     }"));
    /* And the document ends at its closing brace. */
    struct grammar_matcher *m = grammar_matcher_new(g);
    CHECK(m && grammar_matcher_accept(m, "{\"a\":1}", 7) == 0 && grammar_matcher_must_end(m));
    grammar_matcher_free(m);
    grammar_free(g);
}

int main(void) {
    test_scalars();
    test_formats();
    test_enum_const();
    test_objects();
    test_arrays();
    test_combinators_and_refs();
    test_refusals();
    test_any_object();
    return check_report("test_json_schema");
}
