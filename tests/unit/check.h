/* Minimal assertion helpers shared by the C unit tests.
 * Each test binary is one ctest case; a failed CHECK prints where and why and
 * counts a failure, so one run reports every broken assertion, not only the first. */
#ifndef EBB_TEST_CHECK_H
#define EBB_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>
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

/* The one skip policy: a test whose checks need the default model runs what
 * it can without it, then ends with CHECK_SKIPPED (77, ctest's
 * SKIP_RETURN_CODE) naming what did not run, so a missing model reads as
 * "skipped", never as "passed" or as a failure. */
#define CHECK_SKIPPED 77

/* The default model ($EBB_SOURCE_DIR/models/...) into path; 0 when it is
 * readable. */
static inline int check_model_path(char *path, size_t len) {
    const char *dir = getenv("EBB_SOURCE_DIR");
    snprintf(path, len, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", dir ? dir : ".");
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f ? 0 : -1;
}

/* check_report when the model-dependent part did not run. */
static inline int check_report_skipped(const char *name, const char *path) {
    printf("%s: %d checks, %d failed; the checks on the default model were skipped: %s not found "
           "(scripts/setup fetches it)\n", name, check_count, check_failures, path);
    return check_failures ? 1 : CHECK_SKIPPED;
}
#endif
