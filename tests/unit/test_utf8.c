/* engine/utf8: the edges of well-formedness (Unicode Table 3-7) and of the
 * maximal subparts one U+FFFD replaces. */
#include <string.h>

#include "check.h"
#include "engine/utf8.h"

static size_t len_of(const char *s) { return utf8_seq_len(s, strlen(s)); }
static size_t span_of(const char *s) { return utf8_invalid_span(s, strlen(s)); }

int main(void) {
    /* The smallest and largest character of each length. */
    CHECK(utf8_seq_len("\x00", 1) == 1 && len_of("\x7F") == 1);
    CHECK(len_of("\xC2\x80") == 2 && len_of("\xDF\xBF") == 2);
    CHECK(len_of("\xE0\xA0\x80") == 3 && len_of("\xEF\xBF\xBF") == 3);
    CHECK(len_of("\xED\x9F\xBF") == 3 && len_of("\xEE\x80\x80") == 3);   /* either side of the surrogates */
    CHECK(len_of("\xF0\x90\x80\x80") == 4 && len_of("\xF4\x8F\xBF\xBF") == 4);   /* U+10000, U+10FFFF */

    /* Overlong forms, surrogates, beyond U+10FFFF, bytes that never lead. */
    static const char *const bad[] = {"\xC0\x80", "\xC1\xBF", "\xE0\x80\x80", "\xE0\x9F\xBF", "\xED\xA0\x80",
                                      "\xED\xBF\xBF", "\xF0\x80\x80\x80", "\xF0\x8F\xBF\xBF", "\xF4\x90\x80\x80",
                                      "\xF5\x80\x80\x80", "\xF7\xBF\xBF\xBF", "\xFF", "\x80", "\xBF"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_MSG(len_of(bad[i]) == 0 && !utf8_valid(bad[i], strlen(bad[i])), "bad[%zu] accepted", i);
    }
    /* Cut short, or a continuation missing. */
    CHECK(len_of("\xE2\x82") == 0 && len_of("\xF0\x9F\x98") == 0 && len_of("\xC3") == 0);
    CHECK(len_of("\xE2\x28\xAC") == 0 && len_of("\xF0\x9F\x98\x28") == 0);
    CHECK(utf8_seq_len("\xE2\x82\xAC", 2) == 0 && utf8_seq_len("x", 0) == 0);

    const char *good = "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80";
    CHECK(utf8_valid("", 0) && utf8_valid(good, strlen(good)));
    CHECK(!utf8_valid("caf\xC3\xA9 \xE2\x82", 8) && !utf8_valid("a\xC0\xAF", 3));

    /* One replacement per maximal subpart. */
    CHECK(span_of("\xE2\x82") == 2 && span_of("\xF0\x9F\x98" "a") == 3);
    CHECK(span_of("\xC0\x80") == 1 && span_of("\xF5\x80") == 1 && span_of("\x80") == 1);
    CHECK(span_of("\xE0\x80\x80") == 1 && span_of("\xED\xA0\x80") == 1 && span_of("\xF4\x90\x80\x80") == 1);
    CHECK(span_of("\xE2\x28") == 1 && span_of("\xF0\x9F\x28") == 2);

    /* Leads and the second-byte ranges they allow. */
    uint8_t lo, hi;
    CHECK(utf8_lead('a', &lo, &hi) == 1);
    CHECK(utf8_lead(0x80, &lo, &hi) == 0 && utf8_lead(0xC1, &lo, &hi) == 0 && utf8_lead(0xF5, &lo, &hi) == 0);
    CHECK(utf8_lead(0xC2, &lo, &hi) == 2 && lo == 0x80 && hi == 0xBF);
    CHECK(utf8_lead(0xE0, &lo, &hi) == 3 && lo == 0xA0 && hi == 0xBF);
    CHECK(utf8_lead(0xED, &lo, &hi) == 3 && lo == 0x80 && hi == 0x9F);
    CHECK(utf8_lead(0xF0, &lo, &hi) == 4 && lo == 0x90 && hi == 0xBF);
    CHECK(utf8_lead(0xF4, &lo, &hi) == 4 && lo == 0x80 && hi == 0x8F);
    return check_report("test_utf8");
}
