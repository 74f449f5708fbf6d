/* What every fuzz target here shares (tests/fuzz/README.md says how they run).
 *
 * A target is one file defining the two libFuzzer entry points. It is built
 * twice: with clang and -fsanitize=fuzzer (-DEBB_FUZZ=ON, tools/fuzz.sh), and
 * with the normal compiler against replay.c's main, which runs it over every
 * file in tests/fuzz/<target>/ (seeds and crash reproducers) as a ctest case.
 *
 * FUZZ_ASSERT is for properties the code under test promises (a response is
 * valid JSON, every dispatched request is reported once...): a violation
 * aborts, which libFuzzer records as a crash and the replay as a failure. */
#ifndef EBB_TESTS_FUZZ_H
#define EBB_TESTS_FUZZ_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_ASSERT(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); abort(); } } while (0)

/* Exit status of a target that cannot run here (the default model is
 * missing): ctest reads it as skipped (SKIP_RETURN_CODE). */
#define FUZZ_SKIPPED 77
#endif
