/* Fuzz target: the catalog's import of a foreign file (catalog_model_add,
 * what `ebb models add` and POST /admin/models run). Each input is the
 * file's bytes, written to <scratch>/import.gguf; the catalog lives in the
 * same scratch folder (under /dev/shm when it exists, so SQLite's syncs
 * cost little), made once per process.
 *
 * Checked: the file is registered exactly when the GGUF reader accepts it
 * and it names an architecture (1..64 bytes, no NUL), and never otherwise;
 * the row says what the file is (size, sha256 of these bytes, element
 * count, the name derived from the file name); adding it again is
 * CATALOG_EXISTS; get and list find it; remove leaves the catalog empty. */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage/catalog.h"
#include "storage/gguf.h"
#include "storage/sha256.h"
#include "tests/fuzz/fuzz.h"

static char dir[256], file_path[320];
static struct catalog *cat;

static void cleanup(void) {
    char path[400];
    if (cat) catalog_close(cat);
    static const char *const names[] = {"import.gguf", "catalog.db", "catalog.db-wal", "catalog.db-shm"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    struct stat sb;
    const char *tmp = !stat("/dev/shm", &sb) && S_ISDIR(sb.st_mode) && !access("/dev/shm", W_OK) ? "/dev/shm"
                      : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(dir, sizeof dir, "%s/ebb-fuzz-catalog-XXXXXX", tmp);
    if (!mkdtemp(dir)) { perror("fuzz_catalog: mkdtemp"); exit(1); }
    snprintf(file_path, sizeof file_path, "%s/import.gguf", dir);
    char db[320], err[512];
    snprintf(db, sizeof db, "%s/catalog.db", dir);
    if (catalog_open(db, &cat, err, sizeof err) != CATALOG_OK) { fprintf(stderr, "fuzz_catalog: %s\n", err); exit(1); }
    atexit(cleanup);
    return 0;
}

/* What the catalog should conclude about these bytes, from the reader. */
static int acceptable(const uint8_t *data, size_t size, uint64_t *params) {
    if (size == 0) return 0;
    struct gguf_file f;
    char err[512];
    uint8_t *copy = malloc(size);
    FUZZ_ASSERT(copy);
    memcpy(copy, data, size);
    int ok = gguf_open_buffer(&f, copy, size, "x", err, sizeof err) == 0;
    if (ok) {
        struct gguf_str arch;
        ok = !gguf_get_str(&f, "general.architecture", &arch) && arch.len > 0 && arch.len <= 64 &&
             !memchr(arch.ptr, 0, arch.len);
        *params = 0;
        for (uint64_t i = 0; i < f.n_tensors; i++) *params += f.tensors[i].n_elems;
        gguf_close(&f);
    }
    free(copy);
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FILE *f = fopen(file_path, "wb");
    FUZZ_ASSERT(f);
    FUZZ_ASSERT(fwrite(data, 1, size, f) == size || size == 0);
    FUZZ_ASSERT(fclose(f) == 0);

    uint64_t params = 0;
    const int expect = acceptable(data, size, &params);
    struct catalog_model m;
    char err[512];
    enum catalog_status st = catalog_model_add(cat, file_path, NULL, &m, err, sizeof err);
    if (!expect) {
        if (st == CATALOG_OK) fprintf(stderr, "registered a file the reader refuses\n");
        FUZZ_ASSERT(st == CATALOG_INVALID);
        FUZZ_ASSERT(err[0]);
        return 0;
    }
    if (st != CATALOG_OK) fprintf(stderr, "refused a valid file: %s\n", err);
    FUZZ_ASSERT(st == CATALOG_OK);
    FUZZ_ASSERT(!strcmp(m.name, "import"));
    FUZZ_ASSERT(m.source_bytes == (int64_t)size);
    FUZZ_ASSERT(m.params == (params > INT64_MAX ? INT64_MAX : (int64_t)params));
    FUZZ_ASSERT(m.architecture && *m.architecture);
    char hex[65];
    sha256_hex(data, size, hex);
    FUZZ_ASSERT(m.source_sha256 && !strcmp(m.source_sha256, hex));

    struct catalog_model again;
    FUZZ_ASSERT(catalog_model_add(cat, file_path, NULL, &again, err, sizeof err) == CATALOG_EXISTS);
    catalog_model_free(&again);
    struct catalog_model got;
    FUZZ_ASSERT(catalog_model_get(cat, "import", &got, err, sizeof err) == CATALOG_OK);
    FUZZ_ASSERT(got.id == m.id && !strcmp(got.architecture, m.architecture));
    catalog_model_free(&got);
    struct catalog_model *list;
    size_t n;
    FUZZ_ASSERT(catalog_model_list(cat, &list, &n, err, sizeof err) == CATALOG_OK && n == 1);
    catalog_model_list_free(list, n);
    FUZZ_ASSERT(catalog_model_remove(cat, "import", err, sizeof err) == CATALOG_OK);
    FUZZ_ASSERT(catalog_model_list(cat, &list, &n, err, sizeof err) == CATALOG_OK && n == 0);
    catalog_model_list_free(list, n);
    catalog_model_free(&m);
    return 0;
}
