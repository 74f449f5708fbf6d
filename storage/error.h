/* The error convention of every layer. A function that can fail takes
 * (char *err, size_t errlen) and, when it fails, leaves one line there that
 * says where and what: "PATH: what is wrong". errf is the one way to write it.
 *
 * It lives in storage/, the lowest layer that reports errors (kernels/ has
 * none to report), so storage, engine, server and tools all call the same one. */
#ifndef EBB_STORAGE_ERROR_H
#define EBB_STORAGE_ERROR_H
#include <stddef.h>

/* Formats the message printf-style into err. Guarantees: nothing is written
 * when err is NULL or errlen is 0; otherwise err is always NUL-terminated,
 * the message cut at errlen - 1 bytes if longer. Returns -1, so a failing
 * function can end with `return errf(err, errlen, ...)`. */
int errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#endif
