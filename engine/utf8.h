/* UTF-8, judged once for the whole tree: the tokenizer (which refuses
 * ill-formed prompts and decodes byte tokens), the detokenizer and stop
 * matcher (which must not cut a character), and the server's JSON output.
 *
 * "Well-formed" is RFC 3629 / Unicode's Table 3-7: overlong forms, the
 * surrogates U+D800..U+DFFF and code points above U+10FFFF are ill-formed,
 * so the bytes C0, C1 and F5..FF never lead a sequence. */
#ifndef EBB_ENGINE_UTF8_H
#define EBB_ENGINE_UTF8_H
#include <stddef.h>
#include <stdint.h>

/* Bytes of the sequence that lead starts (1 for ASCII, 2 to 4), or 0 when
 * lead cannot start one (a continuation byte, C0, C1, F5..FF). *lo and *hi
 * get the allowed range of the second byte: narrower than 80..BF after E0,
 * ED, F0 and F4, which is what excludes overlongs, surrogates and > U+10FFFF. */
int utf8_lead(uint8_t lead, uint8_t *lo, uint8_t *hi);

/* Bytes of the well-formed character at s (n bytes there), or 0 when the
 * bytes there do not make one, including a character cut short by n. */
size_t utf8_seq_len(const void *s, size_t n);

/* 1 when all n bytes at s are well-formed UTF-8, else 0. */
int utf8_valid(const void *s, size_t n);

/* At a place where utf8_seq_len is 0: the bytes that one U+FFFD replaces,
 * the longest prefix of a well-formed sequence and at least 1 (Unicode's
 * "maximal subpart", what Python's errors="replace" and browsers do), so a
 * cut "\xE2\x82" is one replacement and "\xC0\x80" is two. */
size_t utf8_invalid_span(const void *s, size_t n);
#endif
