/* Minimal assertion helpers shared by the C unit tests.
 * Each test binary is one ctest case; a failed CHECK prints where and why and
 * counts a failure, so one run reports every broken assertion, not only the first. */
#ifndef EBB_TEST_CHECK_H
#define EBB_TEST_CHECK_H
#include <stdio.h>
#include <math.h>

static int check_failures;
static int check_count;

#define CHECK(cond) do { check_count++; if (!(cond)) { check_failures++; \
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); } } while (0)

#define CHECK_MSG(cond, ...) do { check_count++; if (!(cond)) { check_failures++; \
    fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

#define CHECK_NEAR(a, b, tol) do { double a_ = (a), b_ = (b); check_count++; \
    if (!(fabs(a_ - b_) <= (tol))) { check_failures++; \
    fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s=%g %s=%g tol=%g\n", __FILE__, __LINE__, \
            #a, a_, #b, b_, (double)(tol)); } } while (0)

/* Ends main(): prints a ctest-friendly summary and the exit status. */
static inline int check_report(const char *name) {
    printf("%s: %d checks, %d failed\n", name, check_count, check_failures);
    return check_failures ? 1 : 0;
}
#endif
