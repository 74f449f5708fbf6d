/* Structured log lines on stderr, one event per line, logfmt style:
 *
 *   ts=2024-05-01T12:00:00.123Z level=info msg="listening" addr=127.0.0.1 port=8080
 *
 * The message is quoted and escaped by the logger; the key=value tail is a
 * printf format written by the caller. Values that come from outside (paths,
 * client text) must go through log_quote() so that a hostile value cannot
 * forge extra keys or lines. Each line is formatted in a local buffer and
 * written with one write(2), so lines from the loop and engine threads never
 * interleave. The level filter is a process-wide setting (an atomic int). */
#ifndef EBB_SERVER_LOG_H
#define EBB_SERVER_LOG_H
#include <stddef.h>

enum log_level { LOG_LVL_DEBUG = 0, LOG_LVL_INFO, LOG_LVL_WARN, LOG_LVL_ERROR };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* "debug", "info", "warn" (or "warning"), "error"; 0 on success, -1 otherwise. */
int log_parse_level(const char *name, enum log_level *out);

/* Writes one line if `level` passes the filter. `kv_fmt` may be NULL or "". */
void log_write(enum log_level level, const char *msg, const char *kv_fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(...) log_write(LOG_LVL_DEBUG, __VA_ARGS__)
#define log_info(...) log_write(LOG_LVL_INFO, __VA_ARGS__)
#define log_warn(...) log_write(LOG_LVL_WARN, __VA_ARGS__)
#define log_error(...) log_write(LOG_LVL_ERROR, __VA_ARGS__)

/* Quotes `s` for a log value ("..." with \" \\ \n \t and control bytes as
 * \xHH), truncated to fit `size`; returns `buf`. */
const char *log_quote(char *buf, size_t size, const char *s);
#endif
