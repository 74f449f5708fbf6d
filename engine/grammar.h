/* Grammar-constrained generation: GBNF grammars, a per-sequence matcher and
 * the per-step token mask.
 *
 * The grammar language is llama.cpp's GBNF dialect:
 *
 *   # a comment runs to the end of the line
 *   root  ::= "{" ws pair ("," ws pair)* "}"
 *   pair  ::= [a-z]+ ":" ws ( [0-9]{1,3} | "\"" [^"\\]* "\"" )
 *   ws    ::= [ \t\n]?
 *
 * Rule names are [a-zA-Z0-9-]+; the start rule is `root`. Elements: string
 * literals "..." and character classes [...] / [^...] (escapes \n \t \r \\
 * \" \[ \] \- \^ \xHH \uHHHH \UHHHHHHHH), `.` (any character), rule
 * references, ( ... ) groups, alternatives with |, and the postfix operators
 * * + ? {m} {m,} {m,n}. A rule ends at the end of its line unless the line
 * break is inside parentheses or right after `::=` or `|`. Grammars are
 * matched over Unicode code points; input arrives as UTF-8 bytes.
 *
 * grammar_parse refuses what the matcher cannot run: left recursion (a rule
 * that can reach itself without consuming input, e.g. a ::= a "x", or ("x"?)*),
 * undefined rules, a missing root, ill-formed UTF-8, and grammars over
 * GRAMMAR_MAX_ELEMENTS compiled elements (a {m,n} costs O(n) elements).
 * A compiled grammar is immutable: share it freely between threads.
 *
 * A matcher is one sequence's position in the grammar (not thread-safe; one
 * per sequence). The mask asks, for every token of a vocabulary, whether its
 * whole byte string is a valid continuation; a vocabulary is built once per
 * model and is immutable and shareable too.
 */
#ifndef EBB_ENGINE_GRAMMAR_H
#define EBB_ENGINE_GRAMMAR_H
#include <stddef.h>
#include <stdint.h>

/* Limits. Elements: compiled grammar size (a literal character, a class, a
 * rule reference, an alternative's end each count one). Stacks: how many
 * parse positions a matcher may track at once; an ambiguous grammar that
 * needs more makes the input that needs them rejected, with
 * grammar_matcher_error set, instead of using unbounded time and memory. */
#define GRAMMAR_MAX_ELEMENTS 65536
#define GRAMMAR_MAX_STACKS 4096

struct grammar;
struct grammar_matcher;
struct grammar_vocab;

/* Compiles len bytes of GBNF text. NULL with one line in err ("LINE:COL:
 * what is wrong") on any error, including out of memory. */
struct grammar *grammar_parse(const char *text, size_t len, char *err, size_t errlen);
void grammar_free(struct grammar *g);

/* A matcher at the start of g's root rule; g must outlive it. NULL when out
 * of memory (or when the start alone needs over GRAMMAR_MAX_STACKS stacks). */
struct grammar_matcher *grammar_matcher_new(const struct grammar *g);
struct grammar_matcher *grammar_matcher_clone(const struct grammar_matcher *m);
void grammar_matcher_free(struct grammar_matcher *m);

/* Feeds n bytes. 0 and the state advanced when they are a valid
 * continuation; -1 and the state unchanged otherwise. A byte string may end
 * inside a UTF-8 character: the prefix is accepted when some completion of it
 * is allowed, and the rest is expected first by the next call. */
int grammar_matcher_accept(struct grammar_matcher *m, const char *bytes, size_t n);
/* 1 when the text so far is a complete sentence of root (so an end token is
 * allowed now). */
int grammar_matcher_can_end(const struct grammar_matcher *m);
/* 1 when the text so far is complete and no further byte is acceptable. */
int grammar_matcher_must_end(const struct grammar_matcher *m);
/* 1 when the last refusal came from a limit (GRAMMAR_MAX_STACKS, memory)
 * rather than from the grammar; cleared by the next successful accept. */
int grammar_matcher_error(const struct grammar_matcher *m);

/* A model's vocabulary seen by the grammar. piece(ud, id, &len) gives the
 * raw bytes of token id (possibly empty, possibly part of a UTF-8
 * character; NULL counts as empty); is_end: the ids that end generation
 * (EOS, end of turn); is_special: control tokens, never allowed under a
 * grammar unless they are end tokens. is_end / is_special may be NULL (no
 * such tokens). The pieces are copied. NULL when out of memory. */
struct grammar_vocab *grammar_vocab_new(int n_vocab,
                                        const char *(*piece)(void *ud, int32_t id, size_t *len),
                                        int (*is_end)(void *ud, int32_t id),
                                        int (*is_special)(void *ud, int32_t id), void *ud);
void grammar_vocab_free(struct grammar_vocab *v);
int grammar_vocab_size(const struct grammar_vocab *v);

/* Fills allowed[0..n_vocab) with 1 for each token the grammar allows next
 * and 0 for the rest: a token is allowed when its whole byte string is a
 * valid continuation; an end token when grammar_matcher_can_end; an empty
 * or special token never. Returns how many are allowed (0: the grammar is
 * stuck, the caller ends the sequence), or -1 when out of memory. The work
 * of one call is bounded: a grammar so ambiguous that the bound is reached
 * gets a mask that allows fewer tokens than it could, never an invalid one. */
int grammar_mask(const struct grammar_matcher *m, const struct grammar_vocab *v, uint8_t *allowed);
/* The same test for one token (1 allowed, 0 not): the fast path for a
 * decoder that checks its choice first and masks only when it is refused. */
int grammar_token_allowed(const struct grammar_matcher *m, const struct grammar_vocab *v,
                          int32_t id);
#endif
