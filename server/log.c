/* Structured logger: see log.h. Kept deliberately tiny: no allocation, no
 * lock (one write(2) per line is atomic enough for stderr lines of this
 * size), the timestamp in UTC with milliseconds so lines sort and diff well. */
#include "server/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static atomic_int log_level_now = LOG_LVL_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void log_set_level(enum log_level level) { atomic_store(&log_level_now, (int)level); }

enum log_level log_get_level(void) { return (enum log_level)atomic_load(&log_level_now); }

int log_parse_level(const char *name, enum log_level *out) {
    for (int i = 0; i < 4; i++)
        if (!strcasecmp(name, level_names[i])) { *out = (enum log_level)i; return 0; }
    if (!strcasecmp(name, "warning")) { *out = LOG_LVL_WARN; return 0; }
    return -1;
}

const char *log_quote(char *buf, size_t size, const char *s) {
    size_t n = 0;
    if (size < 3) { if (size) buf[0] = '\0'; return buf; }
    buf[n++] = '"';
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[5];
        size_t k;
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; k = 2; }
        else if (c == '\n') { memcpy(esc, "\\n", 2); k = 2; }
        else if (c == '\t') { memcpy(esc, "\\t", 2); k = 2; }
        else if (c < 0x20 || c == 0x7f) { snprintf(esc, sizeof esc, "\\x%02x", c); k = 4; }
        else { esc[0] = (char)c; k = 1; }
        if (n + k + 2 > size) break;   /* keep room for the closing quote and NUL */
        memcpy(buf + n, esc, k);
        n += k;
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return buf;
}

void log_write(enum log_level level, const char *msg, const char *kv_fmt, ...) {
    if ((int)level < atomic_load(&log_level_now)) return;
    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(line, sizeof line, "ts=%Y-%m-%dT%H:%M:%S", &tm);
    char qmsg[512];
    n += (size_t)snprintf(line + n, sizeof line - n, ".%03ldZ level=%s msg=%s", ts.tv_nsec / 1000000L,
                          level_names[level < 0 || level > 3 ? 3 : level], log_quote(qmsg, sizeof qmsg, msg));
    if (kv_fmt && *kv_fmt && n < sizeof line - 2) {
        line[n++] = ' ';
        va_list ap;
        va_start(ap, kv_fmt);
        int k = vsnprintf(line + n, sizeof line - n, kv_fmt, ap);
        va_end(ap);
        if (k > 0) n += (size_t)k;
    }
    if (n > sizeof line - 2) n = sizeof line - 2;   /* truncated: still one line */
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;   /* nowhere better to report a failing stderr */
}
