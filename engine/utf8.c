/* UTF-8 well-formedness; see utf8.h. Everything derives from utf8_lead, the
 * one table of which bytes may follow which. */
#include "engine/utf8.h"

int utf8_lead(uint8_t lead, uint8_t *lo, uint8_t *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) return 2;
    if (lead >= 0xE0 && lead <= 0xEF) {
        if (lead == 0xE0) *lo = 0xA0;   /* overlong */
        if (lead == 0xED) *hi = 0x9F;   /* surrogates */
        return 3;
    }
    if (lead >= 0xF0 && lead <= 0xF4) {
        if (lead == 0xF0) *lo = 0x90;   /* overlong */
        if (lead == 0xF4) *hi = 0x8F;   /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* How many bytes at s (n of them) follow the table from the lead on; *need
 * gets the sequence's full length (0 for a byte that cannot lead). */
static size_t matching_prefix(const uint8_t *s, size_t n, size_t *need) {
    uint8_t lo, hi;
    *need = n ? (size_t)utf8_lead(s[0], &lo, &hi) : 0;
    if (!*need) return 0;
    size_t i = 1;
    for (; i < *need && i < n; i++) {
        if (i == 1 ? (s[i] < lo || s[i] > hi) : (s[i] & 0xC0) != 0x80) break;
    }
    return i;
}

size_t utf8_seq_len(const void *s, size_t n) {
    size_t need;
    return matching_prefix(s, n, &need) == need && need ? need : 0;
}

int utf8_valid(const void *s, size_t n) {
    const uint8_t *p = s;
    for (size_t i = 0; i < n;) {
        if (p[i] < 0x80) { i++; continue; }
        size_t l = utf8_seq_len(p + i, n - i);
        if (!l) return 0;
        i += l;
    }
    return 1;
}

size_t utf8_invalid_span(const void *s, size_t n) {
    size_t need, k = matching_prefix(s, n, &need);
    return k ? k : 1;
}
