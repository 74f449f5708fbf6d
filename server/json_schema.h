/* JSON Schema to GBNF (engine/grammar.h), for structured output:
 * response_format {"type": "json_schema"} and {"type": "json_object"}.
 *
 * Soundness first: every text the grammar accepts is a JSON document valid
 * under the schema. The converse holds for documents in the form a grammar
 * can enumerate without blowing up, which is the form a model is steered
 * into:
 *   - object members appear in the schema's "properties" order; required
 *     ones must appear, optional ones may be left out (any subset, in
 *     order: O(properties) rules, no exponential expansion);
 *   - additionalProperties: false, absent or true all generate only the
 *     declared properties (OpenAI strict mode sends false; absent is
 *     treated as false for generation, as OpenAI does; a document without
 *     extra members is valid either way). An object schema with neither
 *     properties nor required is a map: any keys, values under
 *     additionalProperties (any JSON value unless it is a schema);
 *   - enum / const values are written as jansson writes them compactly
 *     (reals in their shortest round-trip form), so "é" but not "\u00e9";
 *   - whitespace between tokens is at most one space, or one line break
 *     followed by up to 20 spaces or tabs: enough for pretty-printed
 *     output, and a model can never loop on whitespace. No whitespace
 *     before or after the document, so the grammar ends at the closing
 *     brace (grammar_matcher_must_end) and generation stops there;
 *   - minLength / maxLength count characters, an escape counting one (an
 *     escaped surrogate pair counts two);
 *   - "integer" is written without fraction or exponent;
 *   - digit runs are bounded, so a model cannot loop on digits either: at
 *     most 19 integer digits, 16 after the point, 3 in an exponent, 9 in a
 *     time's fraction of a second (every such number is still valid);
 *   - format "date", "time", "date-time" (RFC 3339, upper-case T and Z) and
 *     "uuid" get their grammar; format is an annotation in JSON Schema
 *     2020-12, so constraining it is still sound. Other formats are refused.
 *
 * Supported: type (one or a list), enum, const, properties, required,
 * additionalProperties, items, prefixItems (exact tuples: without items,
 * minItems, maxItems), minItems, maxItems, minLength, maxLength, format,
 * anyOf, oneOf (as anyOf: the grammar cannot count matches), allOf with one
 * member, $ref to "#", "#/$defs/NAME" and "#/definitions/NAME" (recursive
 * references become recursive rules). Without "type", the type follows
 * from the keywords present (properties: object, items: array...), and a
 * schema with none of them is any JSON value. Annotations (title,
 * description, default, examples, $schema, $id, $comment, readOnly,
 * writeOnly, deprecated, and OpenAI's "strict") are ignored. Everything
 * else (pattern, minimum, multipleOf, patternProperties, not, if/then/else,
 * uniqueItems, contains, dependentRequired, ...) is refused by name:
 * ignoring a constraint would make the output invalid.
 *
 * Limits, so that a hostile schema costs bounded memory: nesting depth 64,
 * minItems/maxItems up to 1024, minLength/maxLength up to 4096, 1 MiB of
 * grammar text, and the compiled grammar within GRAMMAR_MAX_ELEMENTS (the
 * text is compiled once here, so what is returned always compiles).
 */
#ifndef EBB_SERVER_JSON_SCHEMA_H
#define EBB_SERVER_JSON_SCHEMA_H
#include <stddef.h>
#include <jansson.h>

/* GBNF text (malloc'd, NUL-terminated; the caller frees) whose root is the
 * schema's documents, or NULL with err saying what is wrong and err_path
 * where, as dotted keys from the schema's root ("properties.age.minimum",
 * "$defs.Foo.patternProperties", "anyOf.1.type"; "" for the root itself).
 * err / err_path may be NULL. */
char *json_schema_to_gbnf(const json_t *schema, char *err, size_t errlen, char *err_path,
                          size_t pathlen);

/* The same, with the caller's rules in place of "root ::= s0": the schema's
 * documents are rule s0, the primitives (string, value, ws...) are defined
 * too, and root_rules must define root (tool calls wrap documents in tags). */
char *json_schema_to_gbnf_under(const json_t *schema, const char *root_rules, char *err, size_t errlen,
                                char *err_path, size_t pathlen);

/* GBNF for any JSON object (response_format json_object), with the same
 * whitespace bounds. A static string. */
const char *json_schema_any_object_gbnf(void);
#endif
