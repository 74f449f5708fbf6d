/* GBNF grammars, the matcher and the token mask; see grammar.h.
 *
 * Compiled form. Every rule is a run of elements in one array: its
 * alternatives one after another, each closed by ALT, the last by END. An
 * element is a literal code point (CHAR), a set of code point ranges
 * (CLASS, sorted and merged at compile time, negation already applied), or a
 * reference to a rule (REF). Groups and repetitions become generated rules,
 * as in llama.cpp: x* is R ::= x R | (empty), x+ is x R, x? is R ::= x |
 * (empty), x{m,n} is m copies of x then n-m nested optionals. A {m,n}
 * therefore costs O(n) elements, which GRAMMAR_MAX_ELEMENTS bounds.
 *
 * Matching. The parse state is a set of stacks (llama.cpp's scheme): each
 * stack is the list of places still to visit, its top always a CHAR or
 * CLASS element; an empty stack means root is complete. A code point
 * advances every stack whose top matches it, and the element after the top
 * is then expanded (rule references pushed, finished alternatives popped)
 * until every stack again tops on a character element. Tail positions are
 * not pushed, so x* over a long input does not grow a stack. Left recursion
 * would make the expansion loop, which is why grammar_parse refuses it.
 *
 * The work of a call happens in a struct work whose stack cells are
 * hash-consed: a stack is a node (position, parent node) and equal stacks
 * are the same node id, so a set of stacks is a sorted array of ids and two
 * sets compare by memcmp. Sets are interned too ("states"), with the partial
 * UTF-8 character, if any, as part of the state. That turns the mask into a
 * lazily built DFA: each state gets a 256-entry transition row, filled on
 * first use. The vocabulary is kept as a byte trie laid out in preorder
 * (each node knows where its subtree ends), so a mask is one linear scan
 * that skips a refused subtree in one jump, and each step is a row lookup
 * once the row is filled. Inside a JSON string almost every byte maps the
 * state to itself and the whole 49K vocabulary costs one row lookup per trie
 * node; in a restrictive state the scan skips nearly everything at depth 1.
 *
 * A matcher keeps its state between calls in flat form (each stack as its
 * positions, bottom first), owned by it alone; each call rebuilds the
 * hash-consed form in a fresh work. This costs a few allocations per call
 * and makes the matcher trivially clonable and the const calls thread-safe.
 *
 * A character split across calls: the state holds the bits received and the
 * range the next byte must be in (utf8_lead's table, so overlongs,
 * surrogates and > U+10FFFF never pass). A prefix is accepted when some
 * stack top allows a code point in the range of its well-formed
 * completions, which is contiguous.
 */
#include "engine/grammar.h"
#include "engine/utf8.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NONE UINT32_MAX
#define MAX_CP 0x10FFFFu
#define MAX_NESTING 256          /* ( ... ) depth in the text: bounds recursion */
#define MAX_REPEAT 65535         /* the m and n of {m,n} */
#define MAX_EXPAND 8192          /* expansion steps per code point (exponential ambiguity);
                                    JSON schemas' grammars take tens */
#define MAX_WORK_NODES (1u << 22) /* stack cells one call may create (48 MiB) */
#define MAX_ROWS 4096            /* cached transition rows per call (4 MiB) */
/* Expansion steps one call may take in all. MAX_EXPAND bounds one code
 * point, but a mask steps through up to one code point per trie node, so a
 * very ambiguous grammar (x*{100}: every repetition may take each
 * character) could otherwise hold the engine thread for seconds per token.
 * Past this a mask stops allowing more tokens: it stays sound (nothing it
 * allows is invalid) and only narrows the choice; a few tens of ms here. */
#define MAX_CALL_WORK (1u << 20)

enum { EL_END, EL_ALT, EL_REF, EL_CHAR, EL_CLASS };

struct gel {
    uint32_t type;
    uint32_t a, b;   /* CHAR: a code point; CLASS: first range, count; REF: a rule */
};

struct grammar {
    struct gel *el;
    uint32_t n_el;
    uint32_t *ranges;      /* lo, hi pairs */
    uint32_t n_ranges;
    uint32_t *alt_start;   /* element where each alternative starts */
    uint32_t *rule_alt;    /* rule r's alternatives: alt_start[rule_alt[r] .. rule_alt[r+1]) */
    uint32_t n_rules;
    uint32_t root;
};

/* Grows *p (elsize bytes each, *cap of them) to hold need; 0 or -1. */
static int grow(void *pp, uint32_t *cap, size_t need, size_t elsize) {
    void **p = pp;
    if (need <= *cap) return 0;
    if (need > UINT32_MAX / 2) return -1;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elsize);
    if (!q) return -1;
    *p = q;
    *cap = (uint32_t)c;
    return 0;
}

/* ================================================================ parser === */

enum { RULE_NAMED, RULE_GROUP, RULE_REPEAT };

struct prule {
    const char *name;       /* into the text; NULL for generated rules */
    size_t name_len;
    struct gel *el;         /* body: alternatives separated by ALT, no END */
    uint32_t n, cap;
    int defined;
    int kind;               /* RULE_NAMED, RULE_GROUP, RULE_REPEAT */
    size_t at;              /* text offset: definition, first reference, or origin */
    uint32_t owner;         /* generated: the named rule it belongs to */
};

struct parser {
    const char *s;
    size_t len, pos;
    struct prule *rules;
    uint32_t n_rules, cap_rules;
    uint32_t *ranges;
    uint32_t n_ranges, cap_ranges;
    uint32_t *names;        /* open addressing over named rules, NONE empty */
    uint32_t cap_names;
    uint32_t *tmp;          /* a class's ranges before normalising */
    uint32_t n_tmp, cap_tmp;
    size_t n_el;            /* elements in all rules so far */
    uint32_t any_range;     /* the range index of `.`, NONE until first used */
    uint32_t cur;           /* the named rule being parsed */
    int depth;
    int failed;
    char *err;
    size_t errlen;
};

/* Line and column (in characters) of text offset at. */
static void line_col(const char *s, size_t at, int *line, int *col) {
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < at; i++) {
        if (s[i] == '\n') { (*line)++; *col = 1; }
        else if (((uint8_t)s[i] & 0xC0) != 0x80) (*col)++;
    }
}

static void perr(struct parser *p, size_t at, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = 1;
    if (!p->err || !p->errlen) return;
    int line, col;
    line_col(p->s, at, &line, &col);
    int k = snprintf(p->err, p->errlen, "%d:%d: ", line, col);
    if (k < 0 || (size_t)k >= p->errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + k, p->errlen - (size_t)k, fmt, ap);
    va_end(ap);
}

static void perr_oom(struct parser *p) { perr(p, p->pos, "out of memory"); }

static int peek(const struct parser *p) { return p->pos < p->len ? (uint8_t)p->s[p->pos] : -1; }

static int is_name_char(int c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

/* Blanks and comments; line breaks too when newline_ok. */
static void skip_space(struct parser *p, int newline_ok) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c == ' ' || c == '\t' || c == '\r') p->pos++;
        else if (c == '\n' && newline_ok) p->pos++;
        else if (c == '#') {
            while (p->pos < p->len && p->s[p->pos] != '\n') p->pos++;
        } else break;
    }
}

static uint32_t new_rule(struct parser *p, const char *name, size_t name_len, int kind, size_t at) {
    if (grow(&p->rules, &p->cap_rules, (size_t)p->n_rules + 1, sizeof *p->rules)) {
        perr_oom(p);
        return NONE;
    }
    struct prule *r = &p->rules[p->n_rules];
    memset(r, 0, sizeof *r);
    r->name = name;
    r->name_len = name_len;
    r->kind = kind;
    r->at = at;
    r->owner = kind == RULE_NAMED ? p->n_rules : p->cur;
    r->defined = kind != RULE_NAMED;
    return p->n_rules++;
}

static uint32_t name_hash(const char *s, size_t len) {
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* The named rule called name, added (undefined) when new. */
static uint32_t find_or_add_rule(struct parser *p, const char *name, size_t len, size_t at) {
    uint32_t mask = p->cap_names - 1, h = name_hash(name, len) & mask;
    for (uint32_t id; p->cap_names && (id = p->names[h]) != NONE; h = (h + 1) & mask)
        if (p->rules[id].name_len == len && !memcmp(p->rules[id].name, name, len)) return id;
    if (2 * ((size_t)p->n_rules + 1) > p->cap_names) {   /* rules bound the named ones */
        uint32_t cap = p->cap_names ? 2 * p->cap_names : 64, *t = malloc(cap * sizeof *t);
        if (!t) { perr_oom(p); return NONE; }
        memset(t, 0xFF, cap * sizeof *t);
        for (uint32_t i = 0; i < p->cap_names; i++) {
            uint32_t id = p->names[i];
            if (id == NONE) continue;
            uint32_t k = name_hash(p->rules[id].name, p->rules[id].name_len) & (cap - 1);
            while (t[k] != NONE) k = (k + 1) & (cap - 1);
            t[k] = id;
        }
        free(p->names);
        p->names = t;
        p->cap_names = cap;
        mask = cap - 1;
        for (h = name_hash(name, len) & mask; t[h] != NONE; h = (h + 1) & mask) {}
    }
    uint32_t id = new_rule(p, name, len, RULE_NAMED, at);
    if (id != NONE) p->names[h] = id;
    return id;
}

static int emit(struct parser *p, uint32_t rule, uint32_t type, uint32_t a, uint32_t b) {
    if (p->n_el >= GRAMMAR_MAX_ELEMENTS) {
        perr(p, p->pos, "grammar too large (over %d elements; a {m,n} costs n)", GRAMMAR_MAX_ELEMENTS);
        return -1;
    }
    struct prule *r = &p->rules[rule];
    if (grow(&r->el, &r->cap, (size_t)r->n + 1, sizeof *r->el)) {
        perr_oom(p);
        return -1;
    }
    r->el[r->n++] = (struct gel){type, a, b};
    p->n_el++;
    return 0;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One character of a literal or class at p->pos (raw UTF-8 or an escape);
 * NONE after an error. The text was checked to be well-formed UTF-8. */
static uint32_t parse_char(struct parser *p) {
    size_t at = p->pos;
    uint8_t c = (uint8_t)p->s[p->pos];
    if (c != '\\') {
        size_t n = utf8_seq_len(p->s + p->pos, p->len - p->pos);
        uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1Fu : n == 3 ? c & 0x0Fu : c & 0x07u;
        for (size_t i = 1; i < n; i++) cp = cp << 6 | ((uint8_t)p->s[p->pos + i] & 0x3Fu);
        p->pos += n ? n : 1;
        return cp;
    }
    p->pos++;
    int e = peek(p);
    if (e < 0) { perr(p, at, "escape at end of input"); return NONE; }
    p->pos++;
    int digits = 0;
    switch (e) {
    case 'n': return '\n';
    case 't': return '\t';
    case 'r': return '\r';
    case '\\': case '"': case '[': case ']': case '-': case '^': case '/': return (uint32_t)e;
    case 'x': digits = 2; break;
    case 'u': digits = 4; break;
    case 'U': digits = 8; break;
    default:
        perr(p, at, "unknown escape '\\%c'", e >= 0x20 && e < 0x7F ? e : '?');
        return NONE;
    }
    uint64_t v = 0;
    for (int i = 0; i < digits; i++) {
        int h = hexval(peek(p));
        if (h < 0) { perr(p, at, "\\%c needs %d hex digits", e, digits); return NONE; }
        v = v << 4 | (uint64_t)h;
        p->pos++;
    }
    if (v > MAX_CP) { perr(p, at, "code point above U+10FFFF"); return NONE; }
    return (uint32_t)v;
}

static int cmp_range(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* p->tmp's pairs sorted, merged and, when negate, complemented, appended to
 * the range table; *count gets how many. Returns the first index or NONE. */
static uint32_t store_class(struct parser *p, int negate, uint32_t *count) {
    uint32_t n = p->n_tmp / 2;
    if (n > 1) qsort(p->tmp, n, 2 * sizeof *p->tmp, cmp_range);
    uint32_t m = 0;   /* merged in place */
    for (uint32_t i = 0; i < n; i++) {
        uint32_t lo = p->tmp[2 * i], hi = p->tmp[2 * i + 1];
        if (m && lo <= p->tmp[2 * m - 1] + 1) {
            if (hi > p->tmp[2 * m - 1]) p->tmp[2 * m - 1] = hi;
        } else {
            p->tmp[2 * m] = lo;
            p->tmp[2 * m + 1] = hi;
            m++;
        }
    }
    /* Worst case after negation: m + 1 ranges. */
    if (grow(&p->ranges, &p->cap_ranges, (size_t)p->n_ranges + 2 * (m + 1), sizeof *p->ranges)) {
        perr_oom(p);
        return NONE;
    }
    uint32_t first = p->n_ranges / 2, *out = p->ranges + p->n_ranges, k = 0;
    if (!negate) {
        if (m) memcpy(out, p->tmp, 2 * m * sizeof *out);
        k = m;
    } else {
        uint32_t next = 0;   /* lowest code point not yet covered */
        for (uint32_t i = 0; i < m; i++) {
            if (p->tmp[2 * i] > next) { out[2 * k] = next; out[2 * k + 1] = p->tmp[2 * i] - 1; k++; }
            next = p->tmp[2 * i + 1] + 1;
        }
        if (next <= MAX_CP) { out[2 * k] = next; out[2 * k + 1] = MAX_CP; k++; }
    }
    p->n_ranges += 2 * k;
    *count = k;
    return first;
}

static int parse_class(struct parser *p, uint32_t rule) {
    size_t at = p->pos;
    p->pos++;   /* [ */
    int negate = peek(p) == '^';
    if (negate) p->pos++;
    p->n_tmp = 0;
    while (peek(p) != ']') {
        if (peek(p) < 0 || peek(p) == '\n') { perr(p, at, "unterminated character class"); return -1; }
        uint32_t lo = parse_char(p), hi = lo;
        if (lo == NONE) return -1;
        if (peek(p) == '-' && p->pos + 1 < p->len && p->s[p->pos + 1] != ']') {
            p->pos++;
            size_t hat = p->pos;
            if (peek(p) == '\n') { perr(p, at, "unterminated character class"); return -1; }
            hi = parse_char(p);
            if (hi == NONE) return -1;
            if (hi < lo) { perr(p, hat, "character range out of order"); return -1; }
        }
        if (grow(&p->tmp, &p->cap_tmp, (size_t)p->n_tmp + 2, sizeof *p->tmp)) { perr_oom(p); return -1; }
        p->tmp[p->n_tmp++] = lo;
        p->tmp[p->n_tmp++] = hi;
    }
    p->pos++;   /* ] */
    uint32_t count, first = store_class(p, negate, &count);
    if (first == NONE) return -1;
    if (!count) { perr(p, at, "character class matches nothing"); return -1; }
    if (count == 1 && p->ranges[2 * first] == p->ranges[2 * first + 1])
        return emit(p, rule, EL_CHAR, p->ranges[2 * first], 0);
    return emit(p, rule, EL_CLASS, first, count);
}

static int parse_literal(struct parser *p, uint32_t rule) {
    size_t at = p->pos;
    p->pos++;   /* " */
    while (peek(p) != '"') {
        if (peek(p) < 0) { perr(p, at, "unterminated string literal"); return -1; }
        if (peek(p) == '\n') { perr(p, p->pos, "line break inside a string literal (write \\n)"); return -1; }
        uint32_t cp = parse_char(p);
        if (cp == NONE || emit(p, rule, EL_CHAR, cp, 0)) return -1;
    }
    p->pos++;
    return 0;
}

/* Moves rule's elements [from, end) into a new generated rule; returns it. */
static uint32_t split_off(struct parser *p, uint32_t rule, uint32_t from, int kind, size_t at) {
    uint32_t r = new_rule(p, NULL, 0, kind, at);
    if (r == NONE) return NONE;
    struct prule *src = &p->rules[rule], *dst = &p->rules[r];
    uint32_t n = src->n - from;
    if (grow(&dst->el, &dst->cap, n, sizeof *dst->el)) { perr_oom(p); return NONE; }
    memcpy(dst->el, src->el + from, n * sizeof *dst->el);
    dst->n = n;
    src->n = from;
    return r;
}

/* A generated rule whose body is x R | (empty) when star (R itself), else
 * x tail | (empty) (tail NONE: just x | (empty)). */
static uint32_t repeat_rule(struct parser *p, struct gel x, int star, uint32_t tail, size_t at) {
    uint32_t r = new_rule(p, NULL, 0, RULE_REPEAT, at);
    if (r == NONE || emit(p, r, x.type, x.a, x.b)) return NONE;
    if (star ? emit(p, r, EL_REF, r, 0) : tail != NONE ? emit(p, r, EL_REF, tail, 0) : 0) return NONE;
    if (emit(p, r, EL_ALT, 0, 0)) return NONE;
    return r;
}

static int parse_count(struct parser *p, uint32_t *v) {
    size_t at = p->pos;
    if (peek(p) < '0' || peek(p) > '9') { perr(p, at, "expected a number"); return -1; }
    uint64_t x = 0;
    while (peek(p) >= '0' && peek(p) <= '9') {
        x = x * 10 + (uint64_t)(peek(p) - '0');
        if (x > MAX_REPEAT) { perr(p, at, "repetition count above %d", MAX_REPEAT); return -1; }
        p->pos++;
    }
    *v = (uint32_t)x;
    return 0;
}

/* The postfix at p->pos applied to rule's last item, elements [item, end). */
static int parse_postfix(struct parser *p, uint32_t rule, uint32_t item) {
    size_t at = p->pos;
    int op = peek(p);
    uint32_t m = 0, n = NONE;   /* NONE: unbounded */
    p->pos++;
    if (op == '+') m = 1;
    else if (op == '?') n = 1;
    else if (op == '{') {
        skip_space(p, 0);
        if (parse_count(p, &m)) return -1;
        skip_space(p, 0);
        n = m;
        if (peek(p) == ',') {
            p->pos++;
            skip_space(p, 0);
            n = NONE;
            if (peek(p) != '}' && parse_count(p, &n)) return -1;
            skip_space(p, 0);
        }
        if (peek(p) != '}') { perr(p, p->pos, "expected '}'"); return -1; }
        p->pos++;
        if (n < m) { perr(p, at, "repetition {%u,%u}: the maximum is below the minimum", m, n); return -1; }
    }
    struct prule *r = &p->rules[rule];
    if (r->n == item) return 0;   /* "" repeated: still nothing */
    struct gel x;
    if (r->n - item == 1) {
        x = r->el[item];
        r->n = item;
        p->n_el--;   /* re-emitted below as often as the repetition needs */
    } else {
        uint32_t s = split_off(p, rule, item, RULE_GROUP, at);
        if (s == NONE) return -1;
        x = (struct gel){EL_REF, s, 0};
    }
    for (uint32_t i = 0; i < m; i++)
        if (emit(p, rule, x.type, x.a, x.b)) return -1;
    if (n == NONE) {
        uint32_t star = repeat_rule(p, x, 1, NONE, at);
        return star == NONE ? -1 : emit(p, rule, EL_REF, star, 0);
    }
    uint32_t opt = NONE;   /* nested optionals: opt_k ::= x opt_{k-1} | (empty) */
    for (uint32_t k = m; k < n; k++)
        if ((opt = repeat_rule(p, x, 0, opt, at)) == NONE) return -1;
    return opt == NONE ? 0 : emit(p, rule, EL_REF, opt, 0);
}

static int parse_alternatives(struct parser *p, uint32_t rule, int nested);

static int parse_sequence(struct parser *p, uint32_t rule, int nested) {
    uint32_t item = NONE;   /* where the last item starts, for a postfix */
    for (;;) {
        int c = peek(p);
        uint32_t start = p->rules[rule].n;
        size_t at = p->pos;
        if (c == '"') {
            if (parse_literal(p, rule)) return -1;
        } else if (c == '[') {
            if (parse_class(p, rule)) return -1;
        } else if (c == '.') {
            p->pos++;
            if (p->any_range == NONE) {
                if (grow(&p->ranges, &p->cap_ranges, (size_t)p->n_ranges + 2, sizeof *p->ranges)) {
                    perr_oom(p);
                    return -1;
                }
                p->any_range = p->n_ranges / 2;
                p->ranges[p->n_ranges++] = 0;
                p->ranges[p->n_ranges++] = MAX_CP;
            }
            if (emit(p, rule, EL_CLASS, p->any_range, 1)) return -1;
        } else if (c >= 0 && is_name_char(c)) {
            while (is_name_char(peek(p))) p->pos++;
            uint32_t ref = find_or_add_rule(p, p->s + at, p->pos - at, at);
            if (ref == NONE || emit(p, rule, EL_REF, ref, 0)) return -1;
        } else if (c == '(') {
            if (++p->depth > MAX_NESTING) { perr(p, at, "parentheses nested over %d deep", MAX_NESTING); return -1; }
            p->pos++;
            skip_space(p, 1);
            uint32_t g = new_rule(p, NULL, 0, RULE_GROUP, at);
            if (g == NONE || parse_alternatives(p, g, 1)) return -1;
            if (peek(p) != ')') {
                int line, col;
                line_col(p->s, at, &line, &col);
                perr(p, p->pos, "expected ')' to close the '(' at %d:%d", line, col);
                return -1;
            }
            p->pos++;
            p->depth--;
            if (emit(p, rule, EL_REF, g, 0)) return -1;
        } else if (c == '*' || c == '+' || c == '?' || c == '{') {
            if (item == NONE) { perr(p, at, "'%c' has nothing to repeat", c); return -1; }
            if (parse_postfix(p, rule, item)) return -1;
            start = item;   /* x*? applies ? to x* */
        } else {
            return 0;
        }
        item = start;
        skip_space(p, nested);
    }
}

static int parse_alternatives(struct parser *p, uint32_t rule, int nested) {
    if (parse_sequence(p, rule, nested)) return -1;
    while (peek(p) == '|') {
        p->pos++;
        if (emit(p, rule, EL_ALT, 0, 0)) return -1;
        skip_space(p, 1);
        if (parse_sequence(p, rule, nested)) return -1;
    }
    return 0;
}

static int parse_rule(struct parser *p) {
    size_t at = p->pos;
    while (is_name_char(peek(p))) p->pos++;
    if (p->pos == at) { perr(p, at, "expected a rule name"); return -1; }
    uint32_t r = find_or_add_rule(p, p->s + at, p->pos - at, at);
    if (r == NONE) return -1;
    if (p->rules[r].defined) {
        perr(p, at, "rule '%.*s' defined twice", (int)(p->pos - at), p->s + at);
        return -1;
    }
    p->rules[r].defined = 1;
    p->rules[r].at = at;
    p->cur = r;
    skip_space(p, 0);
    if (p->pos + 3 > p->len || memcmp(p->s + p->pos, "::=", 3)) {
        perr(p, p->pos, "expected '::=' after the rule name");
        return -1;
    }
    p->pos += 3;
    skip_space(p, 1);
    if (parse_alternatives(p, r, 0)) return -1;
    if (peek(p) >= 0 && peek(p) != '\n') {
        int c = peek(p);
        if (c == ')') perr(p, p->pos, "unbalanced ')'");
        else if (c >= 0x20 && c < 0x7F) perr(p, p->pos, "unexpected '%c'", c);
        else perr(p, p->pos, "unexpected character");
        return -1;
    }
    return 0;
}

/* ======================================================= compiled form === */

void grammar_free(struct grammar *g) {
    if (!g) return;
    free(g->el);
    free(g->ranges);
    free(g->alt_start);
    free(g->rule_alt);
    free(g);
}

/* Concatenates the parsed rules into g's arrays. */
static struct grammar *assemble(struct parser *p, uint32_t root) {
    struct grammar *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    uint32_t n_el = 0, n_alt = 0;
    for (uint32_t r = 0; r < p->n_rules; r++) {
        n_el += p->rules[r].n + 1;
        n_alt += 1;
        for (uint32_t i = 0; i < p->rules[r].n; i++) n_alt += p->rules[r].el[i].type == EL_ALT;
    }
    g->el = malloc(n_el * sizeof *g->el);
    g->alt_start = malloc(n_alt * sizeof *g->alt_start);
    g->rule_alt = malloc(((size_t)p->n_rules + 1) * sizeof *g->rule_alt);
    g->ranges = malloc((p->n_ranges ? p->n_ranges : 1) * sizeof *g->ranges);
    if (!g->el || !g->alt_start || !g->rule_alt || !g->ranges) {
        grammar_free(g);
        return NULL;
    }
    if (p->n_ranges) memcpy(g->ranges, p->ranges, p->n_ranges * sizeof *g->ranges);
    g->n_ranges = p->n_ranges / 2;
    uint32_t e = 0, a = 0;
    for (uint32_t r = 0; r < p->n_rules; r++) {
        g->rule_alt[r] = a;
        g->alt_start[a++] = e;
        for (uint32_t i = 0; i < p->rules[r].n; i++) {
            g->el[e++] = p->rules[r].el[i];
            if (p->rules[r].el[i].type == EL_ALT) g->alt_start[a++] = e;
        }
        g->el[e++] = (struct gel){EL_END, 0, 0};
    }
    g->rule_alt[p->n_rules] = a;
    g->n_el = e;
    g->n_rules = p->n_rules;
    g->root = root;
    return g;
}

/* Refuses left recursion: a rule that reaches itself through references
 * each preceded, within its alternative, only by what may match nothing.
 * Nullable rules by a linear worklist; then a depth-first search for a
 * cycle in the "may start with" graph. 0, or -1 with the error set. */
static int check_left_recursion(struct parser *p, const struct grammar *g) {
    uint32_t nr = g->n_rules, na = g->rule_alt[nr];
    int rc = -1;
    uint8_t *nullable = calloc(nr, 1), *color = calloc(nr, 1);
    uint32_t *alt_rule = malloc(na * sizeof *alt_rule), *pending = malloc(na * sizeof *pending);
    uint32_t *occ_off = calloc((size_t)nr + 1, sizeof *occ_off), *occ = malloc(g->n_el * sizeof *occ);
    uint32_t *queue = malloc(nr * sizeof *queue), *edge_off = calloc((size_t)nr + 1, sizeof *edge_off);
    uint32_t *edges = malloc(g->n_el * sizeof *edges), *dfs = malloc(2 * (size_t)nr * sizeof *dfs);
    if (!nullable || !color || !alt_rule || !pending || !occ_off || !occ || !queue || !edge_off ||
        !edges || !dfs) {
        perr_oom(p);
        goto done;
    }
    /* Each alternative: how many elements are not known to be nullable. */
    uint32_t nq = 0;
    for (uint32_t r = 0; r < nr; r++)
        for (uint32_t a = g->rule_alt[r]; a < g->rule_alt[r + 1]; a++) {
            alt_rule[a] = r;
            pending[a] = 0;
            for (uint32_t i = g->alt_start[a]; g->el[i].type > EL_ALT; i++) {
                if (g->el[i].type == EL_REF) { pending[a]++; occ_off[g->el[i].a]++; }
                else pending[a] = NONE / 2;   /* a character: never nullable */
            }
            if (pending[a] == 0 && !nullable[r]) { nullable[r] = 1; queue[nq++] = r; }
        }
    for (uint32_t r = 0, sum = 0; r <= nr; r++) { uint32_t c = occ_off[r]; occ_off[r] = sum; sum += c; }
    for (uint32_t a = 0; a < na; a++)
        for (uint32_t i = g->alt_start[a]; g->el[i].type > EL_ALT; i++)
            if (g->el[i].type == EL_REF) occ[occ_off[g->el[i].a]++] = a;
    for (uint32_t r = nr; r > 0; r--) occ_off[r] = occ_off[r - 1];   /* back to starts */
    occ_off[0] = 0;
    for (uint32_t qi = 0; qi < nq; qi++) {
        uint32_t s = queue[qi];
        for (uint32_t k = occ_off[s]; k < occ_off[s + 1]; k++) {
            uint32_t a = occ[k];
            if (--pending[a] == 0 && !nullable[alt_rule[a]]) {
                nullable[alt_rule[a]] = 1;
                queue[nq++] = alt_rule[a];
            }
        }
    }
    /* Edges r -> s: s referenced with only nullable elements before it. */
    uint32_t ne = 0;
    for (uint32_t r = 0; r < nr; r++) {
        edge_off[r] = ne;
        for (uint32_t a = g->rule_alt[r]; a < g->rule_alt[r + 1]; a++)
            for (uint32_t i = g->alt_start[a]; g->el[i].type == EL_REF; i++) {
                edges[ne++] = g->el[i].a;
                if (!nullable[g->el[i].a]) break;
            }
    }
    edge_off[nr] = ne;
    /* Iterative DFS; color 1 = on the path, 2 = done. */
    for (uint32_t start = 0; start < nr; start++) {
        if (color[start]) continue;
        uint32_t sp = 0;
        dfs[0] = start;
        dfs[1] = edge_off[start];
        color[start] = 1;
        sp = 1;
        while (sp) {
            uint32_t r = dfs[2 * (sp - 1)], *next = &dfs[2 * (sp - 1) + 1];
            if (*next == edge_off[r + 1]) { color[r] = 2; sp--; continue; }
            uint32_t s = edges[(*next)++];
            if (color[s] == 1) {
                const struct prule *pr = &p->rules[s], *owner = &p->rules[pr->owner];
                if (pr->kind == RULE_NAMED)
                    perr(p, pr->at, "rule '%.*s' can reach itself without consuming input "
                         "(left recursion)", (int)pr->name_len, pr->name);
                else
                    perr(p, pr->at, "in rule '%.*s': this %s can reach itself without consuming "
                         "input (left recursion%s)", (int)owner->name_len, owner->name,
                         pr->kind == RULE_REPEAT ? "repetition" : "group",
                         pr->kind == RULE_REPEAT ? ", or repeating what may match nothing" : "");
                goto done;
            }
            if (!color[s]) {
                color[s] = 1;
                dfs[2 * sp] = s;
                dfs[2 * sp + 1] = edge_off[s];
                sp++;
            }
        }
    }
    rc = 0;
done:
    free(nullable); free(color); free(alt_rule); free(pending); free(occ_off); free(occ);
    free(queue); free(edge_off); free(edges); free(dfs);
    return rc;
}

static void parser_free(struct parser *p) {
    for (uint32_t i = 0; i < p->n_rules; i++) free(p->rules[i].el);
    free(p->rules);
    free(p->names);
    free(p->ranges);
    free(p->tmp);
}

struct grammar *grammar_parse(const char *text, size_t len, char *err, size_t errlen) {
    struct parser p = {.s = text, .len = len, .any_range = NONE, .err = err, .errlen = errlen};
    if (err && errlen) err[0] = '\0';
    for (size_t i = 0; i < len;) {   /* ill-formed UTF-8, named where it is */
        size_t n = (uint8_t)text[i] < 0x80 ? 1 : utf8_seq_len(text + i, len - i);
        if (!n) { perr(&p, i, "ill-formed UTF-8"); return NULL; }
        i += n;
    }
    for (;;) {
        skip_space(&p, 1);
        if (p.pos >= p.len) break;
        if (parse_rule(&p)) { parser_free(&p); return NULL; }
    }
    uint32_t root = NONE;
    for (uint32_t i = 0; i < p.n_rules; i++) {
        const struct prule *r = &p.rules[i];
        if (!r->defined) {
            perr(&p, r->at, "undefined rule '%.*s'", (int)r->name_len, r->name);
            parser_free(&p);
            return NULL;
        }
        if (r->name && r->name_len == 4 && !memcmp(r->name, "root", 4)) root = i;
    }
    if (root == NONE) {
        perr(&p, len, "no 'root' rule");
        parser_free(&p);
        return NULL;
    }
    struct grammar *g = assemble(&p, root);
    if (!g) perr_oom(&p);
    else if (check_left_recursion(&p, g)) { grammar_free(g); g = NULL; }
    parser_free(&p);
    return g;
}

/* ============================================================ matching === */

static int el_match(const struct grammar *g, uint32_t pos, uint32_t cp) {
    const struct gel *e = &g->el[pos];
    if (e->type == EL_CHAR) return e->a == cp;
    const uint32_t *r = g->ranges + 2 * (size_t)e->a;
    uint32_t lo = 0, hi = e->b;   /* first range with hi >= cp */
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (r[2 * mid + 1] < cp) lo = mid + 1; else hi = mid;
    }
    return lo < e->b && r[2 * lo] <= cp;
}

/* Whether element pos allows some code point in [lo, hi]. */
static int el_meets(const struct grammar *g, uint32_t pos, uint32_t lo, uint32_t hi) {
    const struct gel *e = &g->el[pos];
    if (e->type == EL_CHAR) return e->a >= lo && e->a <= hi;
    const uint32_t *r = g->ranges + 2 * (size_t)e->a;
    for (uint32_t i = 0; i < e->b; i++)
        if (r[2 * i] <= hi && r[2 * i + 1] >= lo) return 1;
    return 0;
}

struct gnode { uint32_t pos, parent; };

struct gstate {
    uint32_t off, n;       /* top nodes: pool[off .. off+n), sorted, distinct */
    uint32_t hash;
    uint32_t acc;          /* a partial UTF-8 character's bits */
    uint8_t need, lo, hi;  /* continuation bytes still due (0: none), the next one's range */
    uint32_t row;          /* transition row or NONE */
};

struct work {
    const struct grammar *g;
    struct gnode *nodes;    /* node 0: the empty stack */
    uint32_t n_nodes, cap_nodes;
    uint32_t *node_tab;     /* open addressing, NONE empty */
    uint32_t node_tab_cap;
    struct gstate *states;
    uint32_t n_states, cap_states;
    uint32_t *state_tab;
    uint32_t state_tab_cap;
    uint32_t *pool;
    uint32_t n_pool, cap_pool;
    uint32_t *rows;         /* 256 entries each: 0 unknown, 1 dead, else state + 2 */
    uint32_t n_rows, cap_rows;
    uint32_t *tmp;          /* tops emitted by an expansion */
    uint32_t n_tmp, cap_tmp;
    uint32_t *todo;         /* (parent, position) pairs still to expand */
    uint32_t n_todo, cap_todo;
    uint32_t budget;        /* expansion work left for this code point */
    uint32_t call_left;     /* and for the whole call (MAX_CALL_WORK) */
    int failed;             /* out of memory */
    int overflow;           /* a limit was hit */
};

static uint32_t hash2(uint32_t a, uint32_t b) {
    uint64_t h = ((uint64_t)a << 32 | b) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) ^ (uint32_t)h;
}

static void work_free(struct work *w) {
    free(w->nodes); free(w->node_tab); free(w->states); free(w->state_tab);
    free(w->pool); free(w->rows); free(w->tmp); free(w->todo);
}

static int work_init(struct work *w, const struct grammar *g) {
    memset(w, 0, sizeof *w);
    w->g = g;
    w->call_left = MAX_CALL_WORK;
    w->node_tab_cap = 256;
    w->state_tab_cap = 64;
    w->node_tab = malloc(w->node_tab_cap * sizeof *w->node_tab);
    w->state_tab = malloc(w->state_tab_cap * sizeof *w->state_tab);
    if (!w->node_tab || !w->state_tab || grow(&w->nodes, &w->cap_nodes, 64, sizeof *w->nodes)) {
        work_free(w);
        return -1;
    }
    memset(w->node_tab, 0xFF, w->node_tab_cap * sizeof *w->node_tab);
    memset(w->state_tab, 0xFF, w->state_tab_cap * sizeof *w->state_tab);
    w->nodes[0] = (struct gnode){NONE, NONE};
    w->n_nodes = 1;
    return 0;
}

/* Doubles an open-addressing table of ids; key(id) gives each one's hash. */
static int rehash(uint32_t **tab, uint32_t *cap, const struct work *w,
                  uint32_t (*key)(const struct work *, uint32_t)) {
    uint32_t nc = *cap * 2, *t = malloc(nc * sizeof *t);
    if (!t) return -1;
    memset(t, 0xFF, nc * sizeof *t);
    for (uint32_t i = 0; i < *cap; i++) {
        uint32_t id = (*tab)[i];
        if (id == NONE) continue;
        uint32_t h = key(w, id) & (nc - 1);
        while (t[h] != NONE) h = (h + 1) & (nc - 1);
        t[h] = id;
    }
    free(*tab);
    *tab = t;
    *cap = nc;
    return 0;
}

static uint32_t node_key(const struct work *w, uint32_t id) {
    return hash2(w->nodes[id].pos, w->nodes[id].parent);
}

static uint32_t state_key(const struct work *w, uint32_t id) { return w->states[id].hash; }

/* The node (pos, parent), created when new; NONE on failure. */
static uint32_t node_get(struct work *w, uint32_t pos, uint32_t parent) {
    uint32_t mask = w->node_tab_cap - 1, h = hash2(pos, parent) & mask;
    for (uint32_t id; (id = w->node_tab[h]) != NONE; h = (h + 1) & mask)
        if (w->nodes[id].pos == pos && w->nodes[id].parent == parent) return id;
    if (w->n_nodes >= MAX_WORK_NODES) { w->overflow = 1; return NONE; }
    if (grow(&w->nodes, &w->cap_nodes, (size_t)w->n_nodes + 1, sizeof *w->nodes)) {
        w->failed = 1;
        return NONE;
    }
    if (2 * (w->n_nodes + 1) > w->node_tab_cap) {
        if (rehash(&w->node_tab, &w->node_tab_cap, w, node_key)) { w->failed = 1; return NONE; }
        mask = w->node_tab_cap - 1;
        for (h = hash2(pos, parent) & mask; w->node_tab[h] != NONE; h = (h + 1) & mask) {}
    }
    uint32_t id = w->n_nodes++;
    w->nodes[id] = (struct gnode){pos, parent};
    w->node_tab[h] = id;
    return id;
}

static int push_u32(struct work *w, uint32_t **a, uint32_t *n, uint32_t *cap, uint32_t v) {
    if (grow(a, cap, (size_t)*n + 1, sizeof **a)) { w->failed = 1; return -1; }
    (*a)[(*n)++] = v;
    return 0;
}

/* Appends to w->tmp the stacks that continue at element pos with parent
 * below: references expanded, finished alternatives popped, until each tops
 * on a character element (or is empty: root complete). 0 or -1. */
static int expand(struct work *w, uint32_t parent, uint32_t pos) {
    const struct grammar *g = w->g;
    w->n_todo = 0;
    if (push_u32(w, &w->todo, &w->n_todo, &w->cap_todo, parent) ||
        push_u32(w, &w->todo, &w->n_todo, &w->cap_todo, pos))
        return -1;
    while (w->n_todo) {
        uint32_t p = w->todo[--w->n_todo], par = w->todo[--w->n_todo];
        if (!w->budget || !w->call_left) { w->overflow = 1; return -1; }
        w->budget--;
        w->call_left--;
        for (;;) {
            const struct gel *e = &g->el[p];
            if (e->type == EL_END || e->type == EL_ALT) {
                if (par == 0) {
                    if (push_u32(w, &w->tmp, &w->n_tmp, &w->cap_tmp, 0)) return -1;
                    break;
                }
                p = w->nodes[par].pos;
                par = w->nodes[par].parent;
                continue;
            }
            if (e->type != EL_REF) {
                uint32_t id = node_get(w, p, par);
                if (id == NONE || push_u32(w, &w->tmp, &w->n_tmp, &w->cap_tmp, id)) return -1;
                break;
            }
            uint32_t next = g->el[p + 1].type <= EL_ALT ? par : node_get(w, p + 1, par);
            if (next == NONE) return -1;
            for (uint32_t a = g->rule_alt[e->a]; a < g->rule_alt[e->a + 1]; a++)
                if (push_u32(w, &w->todo, &w->n_todo, &w->cap_todo, next) ||
                    push_u32(w, &w->todo, &w->n_todo, &w->cap_todo, g->alt_start[a]))
                    return -1;
            break;
        }
    }
    return 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Sorts w->tmp and drops repeats; -1 when more than GRAMMAR_MAX_STACKS remain. */
static int tmp_unique(struct work *w) {
    uint32_t n = w->n_tmp, *t = w->tmp;
    if (n <= 16) {
        for (uint32_t i = 1; i < n; i++) {
            uint32_t v = t[i], j = i;
            for (; j > 0 && t[j - 1] > v; j--) t[j] = t[j - 1];
            t[j] = v;
        }
    } else {
        qsort(t, n, sizeof *t, cmp_u32);
    }
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!m || t[m - 1] != t[i]) t[m++] = t[i];
    w->n_tmp = m;
    if (m > GRAMMAR_MAX_STACKS) { w->overflow = 1; return -1; }
    return 0;
}

/* The state for the stacks in w->tmp (sorted, distinct) and the partial
 * character given; created when new. NONE on failure. */
static uint32_t state_get(struct work *w, uint32_t acc, uint8_t need, uint8_t lo, uint8_t hi) {
    uint32_t n = w->n_tmp, h = hash2(n, acc ^ (uint32_t)need << 24 ^ (uint32_t)lo << 16 ^ (uint32_t)hi << 8);
    for (uint32_t i = 0; i < n; i++) h = hash2(h, w->tmp[i]);
    uint32_t mask = w->state_tab_cap - 1, k = h & mask;
    for (uint32_t id; (id = w->state_tab[k]) != NONE; k = (k + 1) & mask) {
        const struct gstate *s = &w->states[id];
        if (s->hash == h && s->n == n && s->acc == acc && s->need == need && s->lo == lo &&
            s->hi == hi && !memcmp(w->pool + s->off, w->tmp, n * sizeof *w->tmp))
            return id;
    }
    if (grow(&w->states, &w->cap_states, (size_t)w->n_states + 1, sizeof *w->states) ||
        grow(&w->pool, &w->cap_pool, (size_t)w->n_pool + n, sizeof *w->pool)) {
        w->failed = 1;
        return NONE;
    }
    if (2 * (w->n_states + 1) > w->state_tab_cap) {
        if (rehash(&w->state_tab, &w->state_tab_cap, w, state_key)) { w->failed = 1; return NONE; }
        mask = w->state_tab_cap - 1;
        for (k = h & mask; w->state_tab[k] != NONE; k = (k + 1) & mask) {}
    }
    uint32_t id = w->n_states++;
    w->states[id] = (struct gstate){w->n_pool, n, h, acc, need, lo, hi, NONE};
    memcpy(w->pool + w->n_pool, w->tmp, n * sizeof *w->tmp);
    w->n_pool += n;
    w->state_tab[k] = id;
    return id;
}

/* The state after code point cp from state s (no partial character), or NONE. */
static uint32_t step_cp(struct work *w, uint32_t s, uint32_t cp) {
    uint32_t off = w->states[s].off, n = w->states[s].n;
    w->n_tmp = 0;
    w->budget = MAX_EXPAND;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t top = w->pool[off + i];
        if (top == 0) continue;
        if (el_match(w->g, w->nodes[top].pos, cp) &&
            expand(w, w->nodes[top].parent, w->nodes[top].pos + 1))
            return NONE;
    }
    if (!w->n_tmp || tmp_unique(w)) return NONE;
    return state_get(w, 0, 0, 0, 0);
}

/* State s's stacks waiting for `need` more bytes of a character whose bits
 * so far are acc, the next byte in [lo, hi]; NONE when no stack allows any
 * completion. The completions' code points form one range. */
static uint32_t step_partial(struct work *w, uint32_t s, uint32_t acc, uint8_t need,
                             uint8_t lo, uint8_t hi) {
    uint32_t cmin = acc << 6 | (lo & 0x3Fu), cmax = acc << 6 | (hi & 0x3Fu);
    for (uint8_t i = 1; i < need; i++) { cmin <<= 6; cmax = cmax << 6 | 0x3F; }
    uint32_t off = w->states[s].off, n = w->states[s].n;
    w->n_tmp = 0;
    int any = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t top = w->pool[off + i];
        if (push_u32(w, &w->tmp, &w->n_tmp, &w->cap_tmp, top)) return NONE;
        if (top && el_meets(w->g, w->nodes[top].pos, cmin, cmax)) any = 1;
    }
    return any ? state_get(w, acc, need, lo, hi) : NONE;
}

static uint32_t step_byte_slow(struct work *w, uint32_t s, uint8_t b) {
    const struct gstate *st = &w->states[s];
    if (st->need == 0) {
        if (b < 0x80) return step_cp(w, s, b);
        uint8_t lo, hi;
        int len = utf8_lead(b, &lo, &hi);
        if (!len) return NONE;
        uint32_t bits = len == 2 ? b & 0x1Fu : len == 3 ? b & 0x0Fu : b & 0x07u;
        return step_partial(w, s, bits, (uint8_t)(len - 1), lo, hi);
    }
    if (b < st->lo || b > st->hi) return NONE;
    uint32_t acc = st->acc << 6 | (b & 0x3Fu);
    uint8_t need = (uint8_t)(st->need - 1);
    return need ? step_partial(w, s, acc, need, 0x80, 0xBF) : step_cp(w, s, acc);
}

/* The state after byte b, or NONE; cached in s's row. */
static inline uint32_t step_byte(struct work *w, uint32_t s, uint8_t b) {
    uint32_t row = w->states[s].row;
    if (row != NONE) {
        uint32_t e = w->rows[(size_t)row * 256 + b];
        if (e) return e == 1 ? NONE : e - 2;
    }
    uint32_t t = step_byte_slow(w, s, b);
    if (w->failed) return NONE;
    row = w->states[s].row;
    if (row == NONE && w->n_rows < MAX_ROWS) {
        if (grow(&w->rows, &w->cap_rows, ((size_t)w->n_rows + 1) * 256, sizeof *w->rows)) return t;
        row = w->states[s].row = w->n_rows++;
        memset(w->rows + (size_t)row * 256, 0, 256 * sizeof *w->rows);
    }
    /* A refusal from a limit is not cached: it says nothing about the grammar. */
    if (row != NONE && !w->overflow) w->rows[(size_t)row * 256 + b] = t == NONE ? 1 : t + 2;
    return t;
}

/* ============================================================= matcher === */

struct grammar_matcher {
    const struct grammar *g;
    uint32_t *flat;        /* each stack: its depth, then positions bottom first */
    uint32_t n_flat;
    uint32_t n_stacks;
    uint32_t acc;
    uint8_t need, lo, hi;
    int can_end, must_end, error;
};

/* m's state in w; NONE on failure. */
static uint32_t load_state(struct work *w, const struct grammar_matcher *m) {
    w->n_tmp = 0;
    for (uint32_t i = 0, k = 0; i < m->n_stacks; i++) {
        uint32_t depth = m->flat[k++], node = 0;
        for (uint32_t d = 0; d < depth; d++)
            if ((node = node_get(w, m->flat[k++], node)) == NONE) return NONE;
        if (push_u32(w, &w->tmp, &w->n_tmp, &w->cap_tmp, node)) return NONE;
    }
    if (tmp_unique(w)) return NONE;
    return state_get(w, m->acc, m->need, m->lo, m->hi);
}

/* Makes state s of w m's state; -1 (m unchanged) when out of memory. */
static int store_state(struct work *w, uint32_t s, struct grammar_matcher *m) {
    const struct gstate *st = &w->states[s];
    size_t total = 0;
    for (uint32_t i = 0; i < st->n; i++)
        for (uint32_t t = w->pool[st->off + i]; ; t = w->nodes[t].parent) {
            total++;
            if (t == 0) break;
        }
    uint32_t *flat = total < UINT32_MAX ? malloc(total * sizeof *flat) : NULL;
    if (!flat) return -1;
    size_t k = 0;
    int has_empty = 0;
    for (uint32_t i = 0; i < st->n; i++) {
        uint32_t top = w->pool[st->off + i], depth = 0;
        for (uint32_t t = top; t; t = w->nodes[t].parent) depth++;
        flat[k] = depth;
        uint32_t d = depth;
        for (uint32_t t = top; t; t = w->nodes[t].parent) flat[k + d--] = w->nodes[t].pos;
        k += 1 + depth;
        has_empty |= top == 0;
    }
    free(m->flat);
    m->flat = flat;
    m->n_flat = (uint32_t)total;
    m->n_stacks = st->n;
    m->acc = st->acc;
    m->need = st->need;
    m->lo = st->lo;
    m->hi = st->hi;
    m->can_end = has_empty && st->need == 0;
    m->must_end = m->can_end && st->n == 1;
    return 0;
}

struct grammar_matcher *grammar_matcher_new(const struct grammar *g) {
    struct grammar_matcher *m = calloc(1, sizeof *m);
    struct work w;
    if (!m || work_init(&w, g)) { free(m); return NULL; }
    m->g = g;
    w.n_tmp = 0;
    w.budget = MAX_EXPAND;
    uint32_t s = NONE;
    for (uint32_t a = g->rule_alt[g->root]; a < g->rule_alt[g->root + 1]; a++)
        if (expand(&w, 0, g->alt_start[a])) goto fail;
    if (tmp_unique(&w)) goto fail;
    s = state_get(&w, 0, 0, 0, 0);
    if (s == NONE || store_state(&w, s, m)) goto fail;
    work_free(&w);
    return m;
fail:
    /* Only memory or the stack limit can fail here: the root's expansion
     * is bounded by the grammar's size. */
    work_free(&w);
    free(m->flat);
    free(m);
    return NULL;
}

struct grammar_matcher *grammar_matcher_clone(const struct grammar_matcher *m) {
    struct grammar_matcher *c = malloc(sizeof *c);
    if (!c) return NULL;
    *c = *m;
    c->flat = malloc((m->n_flat ? m->n_flat : 1) * sizeof *c->flat);
    if (!c->flat) { free(c); return NULL; }
    if (m->n_flat) memcpy(c->flat, m->flat, m->n_flat * sizeof *c->flat);
    return c;
}

void grammar_matcher_free(struct grammar_matcher *m) {
    if (!m) return;
    free(m->flat);
    free(m);
}

int grammar_matcher_accept(struct grammar_matcher *m, const char *bytes, size_t n) {
    struct work w;
    if (work_init(&w, m->g)) { m->error = 1; return -1; }
    uint32_t s = load_state(&w, m);
    for (size_t i = 0; i < n && s != NONE; i++) s = step_byte_slow(&w, s, (uint8_t)bytes[i]);
    int rc = s == NONE ? -1 : store_state(&w, s, m);
    m->error = rc ? (w.failed || w.overflow || s != NONE) : 0;
    work_free(&w);
    return rc;
}

int grammar_matcher_can_end(const struct grammar_matcher *m) { return m->can_end; }
int grammar_matcher_must_end(const struct grammar_matcher *m) { return m->must_end; }
int grammar_matcher_error(const struct grammar_matcher *m) { return m->error; }

/* ========================================================== vocabulary === */

enum { TOK_TEXT, TOK_END, TOK_NEVER };

/* A trie node in preorder: its subtree is [self, end). */
struct tnode {
    uint32_t end;
    uint32_t tok;      /* its tokens: order[tok .. tok + n_tok) */
    uint32_t n_tok;
    uint32_t depth;    /* bytes from the root */
    uint8_t byte;
};

struct grammar_vocab {
    int n_vocab;
    uint8_t *kind;
    char *bytes;       /* every piece, concatenated */
    size_t *off;       /* piece id: bytes[off[id] .. off[id+1]) */
    int32_t *order;    /* TOK_TEXT ids in byte order */
    int32_t *ends;     /* TOK_END ids */
    uint32_t n_ends;
    struct tnode *trie;
    uint32_t n_trie;
    uint32_t max_depth;
};

void grammar_vocab_free(struct grammar_vocab *v) {
    if (!v) return;
    free(v->kind);
    free(v->bytes);
    free(v->off);
    free(v->order);
    free(v->ends);
    free(v->trie);
    free(v);
}

int grammar_vocab_size(const struct grammar_vocab *v) { return v->n_vocab; }

struct piece_ref { const uint8_t *p; size_t len; int32_t id; };

static int cmp_piece(const void *a, const void *b) {
    const struct piece_ref *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->p, y->p, n);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The trie over the sorted pieces: each piece adds the nodes past its
 * common prefix with the one before; a node's subtree closes when a later
 * piece diverges above it. 0 or -1. */
static int build_trie(struct grammar_vocab *v, const struct piece_ref *refs, uint32_t n) {
    size_t total = 1;
    uint32_t max_len = 0;
    for (uint32_t i = 0; i < n; i++) {
        total += refs[i].len;
        if (refs[i].len > max_len) max_len = (uint32_t)refs[i].len;
    }
    if (total > UINT32_MAX / 2) return -1;
    uint32_t *path = malloc(((size_t)max_len + 1) * sizeof *path);
    v->trie = malloc(total * sizeof *v->trie);
    if (!path || !v->trie) { free(path); return -1; }
    v->trie[0] = (struct tnode){0, 0, 0, 0, 0};
    path[0] = 0;
    uint32_t nn = 1;
    size_t prev_len = 0;
    for (uint32_t i = 0; i < n; i++) {
        size_t l = 0;
        if (i)
            while (l < prev_len && l < refs[i].len && refs[i - 1].p[l] == refs[i].p[l]) l++;
        for (size_t d = prev_len; d > l; d--) v->trie[path[d]].end = nn;
        for (size_t d = l + 1; d <= refs[i].len; d++) {
            v->trie[nn] = (struct tnode){0, i, 0, (uint32_t)d, refs[i].p[d - 1]};
            path[d] = nn++;
        }
        struct tnode *t = &v->trie[path[refs[i].len]];
        if (!t->n_tok) t->tok = i;
        t->n_tok++;
        v->order[i] = refs[i].id;
        prev_len = refs[i].len;
    }
    for (size_t d = prev_len; d > 0; d--) v->trie[path[d]].end = nn;
    v->trie[0].end = nn;
    v->n_trie = nn;
    v->max_depth = max_len;
    free(path);
    return 0;
}

struct grammar_vocab *grammar_vocab_new(int n_vocab,
                                        const char *(*piece)(void *ud, int32_t id, size_t *len),
                                        int (*is_end)(void *ud, int32_t id),
                                        int (*is_special)(void *ud, int32_t id), void *ud) {
    if (n_vocab < 0) return NULL;
    struct grammar_vocab *v = calloc(1, sizeof *v);
    struct piece_ref *refs = NULL;
    if (!v) return NULL;
    v->n_vocab = n_vocab;
    size_t nv = (size_t)n_vocab, total = 0;
    v->kind = malloc(nv ? nv : 1);
    v->off = malloc((nv + 1) * sizeof *v->off);
    v->order = malloc((nv ? nv : 1) * sizeof *v->order);
    v->ends = malloc((nv ? nv : 1) * sizeof *v->ends);
    if (!v->kind || !v->off || !v->order || !v->ends) goto fail;
    for (size_t i = 0; i < nv; i++) {
        size_t len = 0;
        const char *p = piece(ud, (int32_t)i, &len);
        if (!p) len = 0;
        total += len;
    }
    v->bytes = malloc(total ? total : 1);
    if (!v->bytes) goto fail;
    size_t at = 0;
    uint32_t n_text = 0;
    for (size_t i = 0; i < nv; i++) {
        int32_t id = (int32_t)i;
        size_t len = 0;
        const char *p = piece(ud, id, &len);
        if (!p) len = 0;
        if (at + len > total) goto fail;   /* the callback changed its answer */
        if (len) memcpy(v->bytes + at, p, len);
        v->off[i] = at;
        at += len;
        if (is_end && is_end(ud, id)) { v->kind[i] = TOK_END; v->ends[v->n_ends++] = id; }
        else if (!len || (is_special && is_special(ud, id))) v->kind[i] = TOK_NEVER;
        else { v->kind[i] = TOK_TEXT; n_text++; }
    }
    v->off[nv] = at;
    refs = malloc((n_text ? n_text : 1) * sizeof *refs);
    if (!refs) goto fail;
    for (size_t i = 0, k = 0; i < nv; i++)
        if (v->kind[i] == TOK_TEXT)
            refs[k++] = (struct piece_ref){(const uint8_t *)v->bytes + v->off[i], v->off[i + 1] - v->off[i],
                                           (int32_t)i};
    qsort(refs, n_text, sizeof *refs, cmp_piece);
    if (build_trie(v, refs, n_text)) goto fail;
    free(refs);
    return v;
fail:
    free(refs);
    grammar_vocab_free(v);
    return NULL;
}

int grammar_token_allowed(const struct grammar_matcher *m, const struct grammar_vocab *v, int32_t id) {
    if (id < 0 || id >= v->n_vocab) return 0;
    if (v->kind[id] == TOK_END) return m->can_end;
    if (v->kind[id] != TOK_TEXT) return 0;
    struct work w;
    if (work_init(&w, m->g)) return 0;
    uint32_t s = load_state(&w, m);
    for (size_t i = v->off[id]; i < v->off[id + 1] && s != NONE; i++)
        s = step_byte_slow(&w, s, (uint8_t)v->bytes[i]);
    work_free(&w);
    return s != NONE;
}

int grammar_mask(const struct grammar_matcher *m, const struct grammar_vocab *v, uint8_t *allowed) {
    memset(allowed, 0, (size_t)v->n_vocab);
    struct work w;
    if (work_init(&w, m->g)) return -1;
    uint32_t *at = malloc(((size_t)v->max_depth + 1) * sizeof *at);   /* state per depth */
    uint32_t s0 = at ? load_state(&w, m) : NONE;
    if (s0 == NONE) {
        free(at);
        work_free(&w);
        return -1;
    }
    at[0] = s0;
    int count = 0;
    const struct tnode *trie = v->trie;
    for (uint32_t i = 1; i < v->n_trie;) {
        const struct tnode *t = &trie[i];
        uint32_t s = step_byte(&w, at[t->depth - 1], t->byte);
        if (s == NONE) {
            if (w.failed) break;
            i = t->end;
            continue;
        }
        at[t->depth] = s;
        for (uint32_t k = 0; k < t->n_tok; k++) allowed[v->order[t->tok + k]] = 1;
        count += (int)t->n_tok;
        i++;
    }
    if (m->can_end)
        for (uint32_t k = 0; k < v->n_ends; k++) { allowed[v->ends[k]] = 1; count++; }
    int failed = w.failed;
    free(at);
    work_free(&w);
    return failed ? -1 : count;
}
