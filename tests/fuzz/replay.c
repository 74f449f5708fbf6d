/* Runs a fuzz target's harness without libFuzzer: over every regular file
 * named on the command line or found (not recursively, in name order) in a
 * directory named there. The regression test of each target
 * (ctest fuzz_<target>_replay) points it at tests/fuzz/<target>/, so seeds
 * and every crash reproducer ever added are replayed by the ordinary build,
 * under ASan+UBSan in the sanitizer build.
 *
 * A harness fails by aborting (FUZZ_ASSERT, a sanitizer report); finding no
 * input at all is a failure too (a misnamed corpus folder would otherwise
 * pass without testing anything). */
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "tests/fuzz/fuzz.h"

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "replay: %s: %s\n", path, strerror(errno)); return -1; }
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    for (size_t n; buf && (n = fread(buf + len, 1, cap - len, f)) > 0;) {
        len += n;
        if (len == cap) {
            uint8_t *grown = realloc(buf, cap *= 2);
            if (!grown) { free(buf); buf = NULL; }
            buf = grown;
        }
    }
    int bad = ferror(f) || !buf;
    fclose(f);
    if (bad) { fprintf(stderr, "replay: %s: cannot read\n", path); free(buf); return -1; }
    /* An exact-size copy, so ASan sees a read one past the input's end. */
    uint8_t *exact = malloc(len ? len : 1);
    if (!exact) { free(buf); return -1; }
    memcpy(exact, buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

int main(int argc, char **argv) {
    LLVMFuzzerInitialize(&argc, &argv);
    int files = 0, failed = 0;
    for (int i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb)) { fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno)); failed++; continue; }
        if (!S_ISDIR(sb.st_mode)) {
            failed += run_file(argv[i]) != 0;
            files++;
            continue;
        }
        struct dirent **names;
        int n = scandir(argv[i], &names, NULL, by_name);
        if (n < 0) { fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno)); failed++; continue; }
        for (int k = 0; k < n; k++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[i], names[k]->d_name);
            if (names[k]->d_name[0] != '.' && !stat(path, &sb) && S_ISREG(sb.st_mode)) {
                failed += run_file(path) != 0;
                files++;
            }
            free(names[k]);
        }
        free(names);
    }
    printf("replay: %d inputs, %d unreadable\n", files, failed);
    return files == 0 || failed ? 1 : 0;
}
