/* Catalog tests.
 *
 * Every test works in its own temporary directory. The catalog is checked
 * through its API and, independently, through a raw SQLite connection (what
 * tables exist, which journal mode and version the file has, whether rows
 * really went away), so a bug in the API cannot hide itself. GGUF inputs are
 * tiny files written here byte by byte, plus the real default model when it
 * is present.
 *
 * Concurrency: two threads with their own handles write at the same time
 * while a third connection holds the write lock for a while; every write must
 * succeed (that is what the busy timeout and BEGIN IMMEDIATE are for).
 */
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "storage/catalog.h"
#include "storage/sha256.h"

static char tmpdir[256];
static char err[1024];

static void path_in(char *buf, size_t len, const char *name) { snprintf(buf, len, "%s/%s", tmpdir, name); }

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f)) {
        perror(path);
        exit(2);
    }
}

/* A minimal valid GGUF v3: one string key (general.architecture unless
 * with_arch is 0) and one F32 tensor of n_elems elements. Returns its size. */
static size_t write_tiny_gguf(const char *path, int with_arch, uint64_t n_elems) {
    uint8_t buf[4096];
    size_t n = 0;
#define PUT(src, len) do { memcpy(buf + n, (src), (len)); n += (len); } while (0)
#define PUT32(v) do { uint32_t v_ = (v); PUT(&v_, 4); } while (0)
#define PUT64(v) do { uint64_t v_ = (v); PUT(&v_, 8); } while (0)
#define PUTSTR(s) do { PUT64(strlen(s)); PUT((s), strlen(s)); } while (0)
    PUT("GGUF", 4);
    PUT32(3);
    PUT64(1);             /* tensors */
    PUT64(1);             /* key/value pairs */
    PUTSTR(with_arch ? "general.architecture" : "general.name");
    PUT32(8);             /* GGUF_STRING */
    PUTSTR("llama");
    PUTSTR("w");
    PUT32(1);             /* n_dims */
    PUT64(n_elems);
    PUT32(0);             /* F32 */
    PUT64(0);             /* offset in the data section */
    while (n % 32) buf[n++] = 0;
    for (uint64_t i = 0; i < n_elems; i++) {
        float x = (float)i;
        PUT(&x, 4);
    }
#undef PUT
#undef PUT32
#undef PUT64
#undef PUTSTR
    write_file(path, buf, n);
    return n;
}

/* Raw SQLite access, independent of catalog.c. */
static sqlite3 *raw_open(const char *path) {
    sqlite3 *db;
    if (sqlite3_open(path, &db) != SQLITE_OK) {
        fprintf(stderr, "raw open %s failed\n", path);
        exit(2);
    }
    sqlite3_busy_timeout(db, 10000);
    return db;
}

static int64_t raw_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st;
    int64_t v = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    else
        fprintf(stderr, "raw query failed: %s: %s\n", sql, sqlite3_errmsg(db));
    sqlite3_finalize(st);
    return v;
}

static void raw_text(sqlite3 *db, const char *sql, char *out, size_t len) {
    sqlite3_stmt *st;
    out[0] = 0;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_text(st, 0))
        snprintf(out, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
}

static void raw_exec(sqlite3 *db, const char *sql) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        fprintf(stderr, "raw exec failed: %s: %s\n", sql, msg);
        sqlite3_free(msg);
        exit(2);
    }
}

static void test_fresh_catalog_schema(void) {
    char path[512];
    path_in(path, sizeof path, "nested/dirs/catalog.db"); /* parents do not exist yet */
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    CHECK(catalog_schema_version(cat) == CATALOG_SCHEMA_VERSION);
    catalog_close(cat);

    sqlite3 *db = raw_open(path);
    char mode[32];
    raw_text(db, "PRAGMA journal_mode", mode, sizeof mode);
    CHECK_MSG(!strcmp(mode, "wal"), "journal mode %s", mode);
    CHECK(raw_int(db, "PRAGMA user_version") == CATALOG_SCHEMA_VERSION);
    CHECK(raw_int(db, "PRAGMA application_id") == 0x65626231);
    const char *tables[] = {"models", "variants", "bitstack_blocks", "settings"};
    for (int i = 0; i < 4; i++) {
        char sql[128];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '%s'",
                 tables[i]);
        CHECK_MSG(raw_int(db, sql) == 1, "table %s missing", tables[i]);
    }
    /* The bitstack directory's columns (level: migration 2). */
    const char *cols[] = {"variant_id", "ord", "layer", "tensor", "level", "offset", "bytes", "cumulative_bytes",
                          "ppl_at_checkpoint"};
    for (int i = 0; i < 9; i++) {
        char sql[160];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM pragma_table_info('bitstack_blocks') WHERE name = '%s'",
                 cols[i]);
        CHECK_MSG(raw_int(db, sql) == 1, "bitstack_blocks.%s missing", cols[i]);
    }
    sqlite3_close(db);

    /* An existing empty SQLite file (version 0, no tables) is migrated too. */
    char empty[512];
    path_in(empty, sizeof empty, "empty.db");
    db = raw_open(empty);
    raw_exec(db, "PRAGMA user_version = 0");
    sqlite3_close(db);
    CHECK_MSG(catalog_open(empty, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (cat) CHECK(catalog_schema_version(cat) == CATALOG_SCHEMA_VERSION);
    catalog_close(cat);

    /* A version 2 catalog (no variants.checkpoint_text), then a version 1
     * one (nor bitstack_blocks.level), are migrated in place. */
    for (int version = 2; version >= 1; version--) {
        db = raw_open(path);
        raw_exec(db, "ALTER TABLE variants DROP COLUMN checkpoint_text");
        if (version == 1) raw_exec(db, "ALTER TABLE bitstack_blocks DROP COLUMN level");
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", version);
        raw_exec(db, sql);
        sqlite3_close(db);
        CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
        if (cat) CHECK(catalog_schema_version(cat) == 3);
        catalog_close(cat);
        db = raw_open(path);
        CHECK(raw_int(db, "SELECT count(*) FROM pragma_table_info('bitstack_blocks') WHERE name = 'level'") == 1);
        CHECK(raw_int(db, "SELECT count(*) FROM pragma_table_info('variants') WHERE name = 'checkpoint_text'") == 1);
        sqlite3_close(db);
    }
}

static void test_models(void) {
    char path[512], gguf[512], gguf2[512], bad[512], noarch[512], missing[512];
    path_in(path, sizeof path, "models.db");
    path_in(gguf, sizeof gguf, "tiny.gguf");
    path_in(gguf2, sizeof gguf2, "other name.gguf");
    path_in(bad, sizeof bad, "corrupt.gguf");
    path_in(noarch, sizeof noarch, "noarch.gguf");
    path_in(missing, sizeof missing, "missing.gguf");
    size_t size = write_tiny_gguf(gguf, 1, 8);
    write_tiny_gguf(gguf2, 1, 4);
    write_tiny_gguf(noarch, 0, 4);
    write_file(bad, "GGUF\x03\0\0\0garbage", 15);

    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;

    struct catalog_model m;
    CHECK_MSG(catalog_model_add(cat, gguf, NULL, &m, err, sizeof err) == CATALOG_OK, "%s", err);
    CHECK(m.name && !strcmp(m.name, "tiny"));               /* basename without .gguf */
    CHECK(m.architecture && !strcmp(m.architecture, "llama"));
    CHECK(m.params == 8);
    CHECK(m.source_bytes == (int64_t)size);
    CHECK(m.source_path && m.source_path[0] == '/' && strstr(m.source_path, "tiny.gguf"));
    {   /* the checksum is of the file's exact bytes (sha256 is checked against FIPS vectors in test_sha256) */
        FILE *fp = fopen(gguf, "rb");
        char bytes[4096], hex[65] = "";
        size_t nb = fp ? fread(bytes, 1, sizeof bytes, fp) : 0;
        if (fp) fclose(fp);
        sha256_hex(bytes, nb, hex);
        CHECK(nb == size && m.source_sha256 && !strcmp(m.source_sha256, hex));
    }
    CHECK(m.id > 0);
    CHECK(llabs(m.created_at - (int64_t)time(NULL)) < 60);
    struct stat sb;
    CHECK(stat(gguf, &sb) == 0 && m.source_mtime_ns == (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec);
    catalog_model_free(&m);

    /* Duplicate names are refused, by default name and by explicit name. */
    CHECK(catalog_model_add(cat, gguf, NULL, NULL, err, sizeof err) == CATALOG_EXISTS);
    CHECK_MSG(strstr(err, "'tiny'") && strstr(err, "already"), "%s", err);
    CHECK(catalog_model_add(cat, gguf2, "tiny", NULL, err, sizeof err) == CATALOG_EXISTS);
    /* The same file under another name is fine. */
    CHECK_MSG(catalog_model_add(cat, gguf, "tiny-2", NULL, err, sizeof err) == CATALOG_OK, "%s", err);

    /* A file name that is not a valid model name needs --name. */
    CHECK(catalog_model_add(cat, gguf2, NULL, NULL, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "other name"), "%s", err);
    CHECK_MSG(catalog_model_add(cat, gguf2, "other", NULL, err, sizeof err) == CATALOG_OK, "%s", err);

    const char *bad_names[] = {"", "../x", "a b", "-x", "x/y", "q\"uote", "caf\xc3\xa9"};
    for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++)
        CHECK_MSG(catalog_model_add(cat, gguf, bad_names[i], NULL, err, sizeof err) == CATALOG_INVALID,
                  "name '%s' accepted", bad_names[i]);
    char long_name[CATALOG_NAME_MAX + 2];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = 0;
    CHECK(catalog_model_add(cat, gguf, long_name, NULL, err, sizeof err) == CATALOG_INVALID);
    long_name[CATALOG_NAME_MAX] = 0; /* exactly the maximum is fine */
    CHECK_MSG(catalog_model_add(cat, gguf, long_name, NULL, err, sizeof err) == CATALOG_OK, "%s", err);

    /* Corrupt, non-model and missing files are refused with the reason. */
    CHECK(catalog_model_add(cat, bad, "bad", NULL, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "corrupt.gguf"), "%s", err);
    CHECK(catalog_model_add(cat, noarch, "noarch", NULL, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "general.architecture"), "%s", err);
    CHECK(catalog_model_add(cat, missing, "missing", NULL, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "No such file"), "%s", err);
    CHECK(catalog_model_add(cat, tmpdir, "dir", NULL, err, sizeof err) == CATALOG_INVALID);

    /* The real model, when the checkout has it. */
    const char *src = getenv("EBB_SOURCE_DIR");
    char real[1024];
    snprintf(real, sizeof real, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", src ? src : ".");
    if (access(real, R_OK) == 0) {
        CHECK_MSG(catalog_model_add(cat, real, NULL, &m, err, sizeof err) == CATALOG_OK, "%s", err);
        CHECK(m.name && !strcmp(m.name, "SmolLM2-135M-Instruct.Q4_1"));
        CHECK(m.architecture && !strcmp(m.architecture, "llama"));
        /* Counted from the architecture: embeddings 49152*576, per layer
         * q,o 576*576, k,v 576*192, gate,up,down 576*1536, two norms of 576,
         * times 30 layers, plus the output norm (tied embeddings: no output
         * matrix) = 134,515,008, the figure published for SmolLM2-135M. */
        CHECK_MSG(m.params == 134515008, "params %lld", (long long)m.params);
        catalog_model_free(&m);
    } else {
        fprintf(stderr, "note: %s absent, real-model check skipped\n", real);
    }

    struct catalog_model *list;
    size_t n;
    CHECK_MSG(catalog_model_list(cat, &list, &n, err, sizeof err) == CATALOG_OK, "%s", err);
    size_t expect = access(real, R_OK) == 0 ? 5 : 4;
    CHECK_MSG(n == expect, "%zu models", n);
    for (size_t i = 1; i < n; i++) CHECK(strcmp(list[i - 1].name, list[i].name) < 0); /* sorted by name */
    catalog_model_list_free(list, n);

    CHECK(catalog_model_get(cat, "tiny-2", &m, err, sizeof err) == CATALOG_OK);
    CHECK(m.params == 8 && !strcmp(m.name, "tiny-2"));
    catalog_model_free(&m);
    CHECK(catalog_model_get(cat, "nope", &m, err, sizeof err) == CATALOG_NOT_FOUND);
    CHECK_MSG(strstr(err, "'nope'"), "%s", err);
    /* Names are bound as parameters: SQL in a name is just a missing name. */
    CHECK(catalog_model_get(cat, "x' OR '1'='1", &m, err, sizeof err) == CATALOG_NOT_FOUND);
    CHECK(catalog_model_remove(cat, "x' OR '1'='1", err, sizeof err) == CATALOG_NOT_FOUND);
    catalog_close(cat);
}

/* Variants and blocks go when their model goes; checked with raw SQL. */
static void test_variants_and_cascade(void) {
    char path[512], gguf[512];
    path_in(path, sizeof path, "cascade.db");
    path_in(gguf, sizeof gguf, "cascade.gguf");
    write_tiny_gguf(gguf, 1, 4);
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    struct catalog_model a, b;
    CHECK(catalog_model_add(cat, gguf, "a", &a, err, sizeof err) == CATALOG_OK);
    CHECK(catalog_model_add(cat, gguf, "b", &b, err, sizeof err) == CATALOG_OK);

    struct catalog_variant v = {.model_id = a.id, .kind = "f32", .path = "/x/a.f32.gguf", .bytes = 1000,
                                .bits_per_weight = 32};
    int64_t v1 = 0, v2 = 0, v3 = 0;
    CHECK_MSG(catalog_variant_add(cat, &v, &v1, err, sizeof err) == CATALOG_OK, "%s", err);
    struct catalog_variant w = {.model_id = a.id, .kind = "bitstack", .path = "/x/a.bs.gguf", .bytes = 400,
                                .bits_per_weight = 3.25, .has_perplexity = 1, .perplexity = 17.5,
                                .ppl_text = "wiki.test", .checksum = "abc123",
                                .checkpoint_text = "heldout.txt, 4 windows of 512"};
    CHECK_MSG(catalog_variant_add(cat, &w, &v2, err, sizeof err) == CATALOG_OK, "%s", err);
    struct catalog_variant x = {.model_id = b.id, .kind = "w4a4", .path = "/x/b.gguf", .bytes = 10,
                                .bits_per_weight = 4.5};
    CHECK_MSG(catalog_variant_add(cat, &x, &v3, err, sizeof err) == CATALOG_OK, "%s", err);
    CHECK(v1 > 0 && v2 > v1 && v3 > v2);

    /* Refusals: same variant twice, unknown model, nonsense fields. */
    CHECK(catalog_variant_add(cat, &v, NULL, err, sizeof err) == CATALOG_EXISTS);
    struct catalog_variant orphan = v;
    orphan.model_id = 999999;
    CHECK(catalog_variant_add(cat, &orphan, NULL, err, sizeof err) == CATALOG_NOT_FOUND);
    struct catalog_variant neg = v;
    neg.bytes = -1;
    CHECK(catalog_variant_add(cat, &neg, NULL, err, sizeof err) == CATALOG_INVALID);
    neg = v;
    neg.has_perplexity = 1;
    neg.perplexity = 0;
    CHECK(catalog_variant_add(cat, &neg, NULL, err, sizeof err) == CATALOG_INVALID);
    neg = v;
    neg.kind = "";
    CHECK(catalog_variant_add(cat, &neg, NULL, err, sizeof err) == CATALOG_INVALID);
    char long_text[257];
    memset(long_text, 'x', 256);
    long_text[256] = 0;
    const char *bad_texts[] = {"", long_text};
    for (int i = 0; i < 2; i++) {
        neg = v;
        neg.checkpoint_text = (char *)bad_texts[i];
        CHECK(catalog_variant_add(cat, &neg, NULL, err, sizeof err) == CATALOG_INVALID);
        CHECK_MSG(strstr(err, "checkpoint_text must be 1 to 255 bytes"), "%s", err);
    }

    struct catalog_variant *vs;
    size_t n;
    CHECK(catalog_variant_list(cat, a.id, &vs, &n, err, sizeof err) == CATALOG_OK);
    CHECK(n == 2);
    if (n == 2) {
        CHECK(vs[0].id == v1 && !strcmp(vs[0].kind, "f32") && !vs[0].has_perplexity && !vs[0].ppl_text &&
              !vs[0].checksum && vs[0].bytes == 1000 && vs[0].bits_per_weight == 32);
        CHECK(vs[1].id == v2 && !strcmp(vs[1].kind, "bitstack") && vs[1].has_perplexity &&
              vs[1].perplexity == 17.5 && !strcmp(vs[1].ppl_text, "wiki.test") &&
              !strcmp(vs[1].checksum, "abc123") && vs[1].bits_per_weight == 3.25 &&
              !strcmp(vs[1].checkpoint_text, "heldout.txt, 4 windows of 512"));
        CHECK(!vs[0].checkpoint_text);
    }
    catalog_variant_list_free(vs, n);

    /* A stack variant with its directory, in one transaction; a malformed
     * directory adds neither. */
    struct catalog_block dir[3];
    char names[3][32];
    for (int i = 0; i < 3; i++) {
        snprintf(names[i], sizeof names[i], "blk.%d.attn_q", i);
        dir[i] = (struct catalog_block){.ord = i, .layer = i, .level = i / 2, .tensor = names[i],
                                        .offset = 4096 + i * 100, .bytes = 100, .cumulative_bytes = (i + 1) * 100,
                                        .has_perplexity = i != 1, .perplexity = 50.0 - i};
    }
    struct catalog_variant st = {.model_id = a.id, .kind = "bitstack", .path = "/x/a.bs2.gguf", .bytes = 4400,
                                 .bits_per_weight = 2.5};
    dir[2].cumulative_bytes = 250;   /* does not add up */
    CHECK(catalog_variant_add_stack(cat, &st, dir, 3, NULL, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "block 2"), "%s", err);
    dir[2].cumulative_bytes = 300;
    int64_t v4 = 0;
    CHECK_MSG(catalog_variant_add_stack(cat, &st, dir, 3, &v4, err, sizeof err) == CATALOG_OK, "%s", err);
    struct catalog_block *got;
    size_t n_got;
    CHECK(catalog_variant_blocks(cat, v4, &got, &n_got, err, sizeof err) == CATALOG_OK);
    CHECK(n_got == 3);
    for (size_t i = 0; i < n_got && n_got == 3; i++)
        CHECK(got[i].ord == (int64_t)i && got[i].layer == (int)i && got[i].level == (int)i / 2 &&
              !strcmp(got[i].tensor, names[i]) && got[i].offset == 4096 + (int64_t)i * 100 && got[i].bytes == 100 &&
              got[i].cumulative_bytes == (int64_t)(i + 1) * 100 && got[i].has_perplexity == (i != 1) &&
              (i == 1 || got[i].perplexity == 50.0 - (double)i));
    catalog_blocks_free(got, n_got);
    CHECK(catalog_variant_blocks(cat, v1, &got, &n_got, err, sizeof err) == CATALOG_OK && n_got == 0 && !got);
    /* The same stack again: refused, and its directory is not doubled. */
    CHECK(catalog_variant_add_stack(cat, &st, dir, 3, NULL, err, sizeof err) == CATALOG_EXISTS);
    sqlite3 *db = raw_open(path);
    raw_exec(db, "PRAGMA foreign_keys = ON");
    char sql[256];
    CHECK(raw_int(db, "SELECT count(*) FROM bitstack_blocks") == 3);

    CHECK_MSG(catalog_model_remove(cat, "a", err, sizeof err) == CATALOG_OK, "%s", err);
    CHECK(raw_int(db, "SELECT count(*) FROM models WHERE name = 'a'") == 0);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM variants WHERE model_id = %lld", (long long)a.id);
    CHECK(raw_int(db, sql) == 0);
    CHECK(raw_int(db, "SELECT count(*) FROM bitstack_blocks") == 0);
    /* The other model and its variant are untouched. */
    CHECK(raw_int(db, "SELECT count(*) FROM variants") == 1);
    CHECK(raw_int(db, "SELECT count(*) FROM models WHERE name = 'b'") == 1);
    CHECK(catalog_model_remove(cat, "a", err, sizeof err) == CATALOG_NOT_FOUND);
    CHECK_MSG(strstr(err, "'a'"), "%s", err);
    CHECK(raw_int(db, "SELECT count(*) FROM pragma_foreign_key_check") == 0); /* no dangling references */
    sqlite3_close(db);
    catalog_model_free(&a);
    catalog_model_free(&b);
    catalog_close(cat);
}

static void test_settings_and_reopen(void) {
    char path[512], gguf[512];
    path_in(path, sizeof path, "settings.db");
    path_in(gguf, sizeof gguf, "keep.gguf");
    write_tiny_gguf(gguf, 1, 4);
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    char *value = (char *)1;
    CHECK(catalog_setting_get(cat, "memory_budget_bytes", &value, err, sizeof err) == CATALOG_NOT_FOUND);
    CHECK(value == NULL);
    uint64_t u = 0;
    CHECK(catalog_setting_get_u64(cat, "memory_budget_bytes", &u, err, sizeof err) == CATALOG_NOT_FOUND);
    CHECK(catalog_setting_set_u64(cat, "memory_budget_bytes", 3000000000ULL, err, sizeof err) == CATALOG_OK);
    CHECK(catalog_setting_get_u64(cat, "memory_budget_bytes", &u, err, sizeof err) == CATALOG_OK);
    CHECK(u == 3000000000ULL);
    CHECK(catalog_setting_set_u64(cat, "memory_budget_bytes", UINT64_MAX, err, sizeof err) == CATALOG_OK);
    CHECK(catalog_setting_get_u64(cat, "memory_budget_bytes", &u, err, sizeof err) == CATALOG_OK);
    CHECK(u == UINT64_MAX);
    CHECK(catalog_setting_set(cat, "greeting", "hello 'world'; DROP TABLE settings", err, sizeof err) == CATALOG_OK);
    CHECK(catalog_setting_set(cat, "empty", "", err, sizeof err) == CATALOG_OK);
    CHECK(catalog_setting_get(cat, "empty", &value, err, sizeof err) == CATALOG_OK && value && !value[0]);
    free(value);
    CHECK(catalog_setting_get_u64(cat, "greeting", &u, err, sizeof err) == CATALOG_ERROR);
    CHECK(catalog_setting_set(cat, "", "x", err, sizeof err) == CATALOG_INVALID);
    CHECK(catalog_model_add(cat, gguf, "kept", NULL, err, sizeof err) == CATALOG_OK);
    catalog_close(cat);

    /* Everything survives a reopen, and reopening does not re-migrate. */
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    CHECK(catalog_setting_get_u64(cat, "memory_budget_bytes", &u, err, sizeof err) == CATALOG_OK);
    CHECK(u == UINT64_MAX);
    CHECK(catalog_setting_get(cat, "greeting", &value, err, sizeof err) == CATALOG_OK);
    CHECK(value && !strcmp(value, "hello 'world'; DROP TABLE settings"));
    free(value);
    struct catalog_model m;
    CHECK(catalog_model_get(cat, "kept", &m, err, sizeof err) == CATALOG_OK);
    catalog_model_free(&m);
    CHECK(catalog_setting_set_u64(cat, "memory_budget_bytes", 42, err, sizeof err) == CATALOG_OK);
    catalog_close(cat);

    sqlite3 *db = raw_open(path);
    char text[64];
    raw_text(db, "SELECT value FROM settings WHERE key = 'memory_budget_bytes'", text, sizeof text);
    CHECK(!strcmp(text, "42"));
    CHECK(raw_int(db, "SELECT count(*) FROM settings") == 3);
    sqlite3_close(db);
}

/* Catalogs this build must not touch. */
static void test_refusals(void) {
    char path[512];
    struct catalog *cat;

    /* From the future: refused, and left at its version (no downgrade). */
    path_in(path, sizeof path, "future.db");
    CHECK(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK);
    catalog_close(cat);
    sqlite3 *db = raw_open(path);
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", CATALOG_SCHEMA_VERSION + 1);
    raw_exec(db, sql);
    sqlite3_close(db);
    cat = (struct catalog *)1;
    CHECK(catalog_open(path, &cat, err, sizeof err) == CATALOG_ERROR);
    CHECK(cat == NULL);
    CHECK_MSG(strstr(err, "newer") && strstr(err, "future.db"), "%s", err);
    db = raw_open(path);
    CHECK(raw_int(db, "PRAGMA user_version") == CATALOG_SCHEMA_VERSION + 1);
    sqlite3_close(db);

    /* Someone else's SQLite database. */
    path_in(path, sizeof path, "foreign.db");
    db = raw_open(path);
    raw_exec(db, "CREATE TABLE t (x)");
    sqlite3_close(db);
    CHECK(catalog_open(path, &cat, err, sizeof err) == CATALOG_ERROR);
    CHECK_MSG(strstr(err, "not an ebb catalog"), "%s", err);

    /* Not a database at all. */
    path_in(path, sizeof path, "garbage.db");
    char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (char)(i * 7 + 3);
    write_file(path, junk, sizeof junk);
    CHECK(catalog_open(path, &cat, err, sizeof err) == CATALOG_ERROR);
    CHECK_MSG(strstr(err, "garbage.db"), "%s", err);

    /* A directory where the file should be, and an empty path. */
    CHECK(catalog_open(tmpdir, &cat, err, sizeof err) == CATALOG_ERROR);
    CHECK(catalog_open("", &cat, err, sizeof err) == CATALOG_INVALID);
}

static void test_default_path(void) {
    char buf[512];
    const char *old_xdg = getenv("XDG_DATA_HOME"), *old_home = getenv("HOME");
    char *saved_xdg = old_xdg ? strdup(old_xdg) : NULL, *saved_home = old_home ? strdup(old_home) : NULL;
    setenv("XDG_DATA_HOME", "/srv/data", 1);
    setenv("HOME", "/home/u", 1);
    CHECK(catalog_default_path(buf, sizeof buf, err, sizeof err) == CATALOG_OK);
    CHECK_MSG(!strcmp(buf, "/srv/data/ebb/catalog.db"), "%s", buf);
    setenv("XDG_DATA_HOME", "relative/ignored", 1);
    CHECK(catalog_default_path(buf, sizeof buf, err, sizeof err) == CATALOG_OK);
    CHECK_MSG(!strcmp(buf, "/home/u/.local/share/ebb/catalog.db"), "%s", buf);
    unsetenv("XDG_DATA_HOME");
    unsetenv("HOME");
    CHECK(catalog_default_path(buf, sizeof buf, err, sizeof err) == CATALOG_ERROR);
    setenv("HOME", "/home/u", 1);
    CHECK(catalog_default_path(buf, 8, err, sizeof err) == CATALOG_ERROR); /* too long for the buffer */
    if (saved_xdg) setenv("XDG_DATA_HOME", saved_xdg, 1);
    if (saved_home) setenv("HOME", saved_home, 1);
    else unsetenv("HOME");
    free(saved_xdg);
    free(saved_home);
}

/* ---- concurrency -------------------------------------------------------- */

#define WRITES_PER_THREAD 40

struct writer {
    const char *path, *gguf;
    int index;
    int failures;
    char err[1024];
};

static void *writer_main(void *arg) {
    struct writer *w = arg;
    struct catalog *cat;
    if (catalog_open(w->path, &cat, w->err, sizeof w->err) != CATALOG_OK) {
        w->failures = WRITES_PER_THREAD;
        return NULL;
    }
    for (int i = 0; i < WRITES_PER_THREAD; i++) {
        char name[64], key[64];
        snprintf(name, sizeof name, "w%d-m%d", w->index, i);
        snprintf(key, sizeof key, "w%d-k%d", w->index, i);
        if (catalog_model_add(cat, w->gguf, name, NULL, w->err, sizeof w->err) != CATALOG_OK ||
            catalog_setting_set_u64(cat, key, (uint64_t)i, w->err, sizeof w->err) != CATALOG_OK)
            w->failures++;
    }
    catalog_close(cat);
    return NULL;
}

struct holder { const char *path; int hold_ms; };

/* Takes the write lock through a separate raw connection and sits on it. */
static void *holder_main(void *arg) {
    struct holder *h = arg;
    sqlite3 *db = raw_open(h->path);
    raw_exec(db, "BEGIN IMMEDIATE");
    raw_exec(db, "INSERT INTO settings (key, value, updated_at) VALUES ('holder', 'x', 0)");
    usleep((useconds_t)h->hold_ms * 1000);
    raw_exec(db, "COMMIT");
    sqlite3_close(db);
    return NULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void test_concurrent_writers(void) {
    char path[512], gguf[512];
    path_in(path, sizeof path, "concurrent.db");
    path_in(gguf, sizeof gguf, "conc.gguf");
    write_tiny_gguf(gguf, 1, 4);

    /* Several connections open a brand-new catalog at once: exactly one
     * migrates, the others wait and see the finished schema. */
    struct writer ws[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        ws[i] = (struct writer){.path = path, .gguf = gguf, .index = i};
        pthread_create(&th[i], NULL, writer_main, &ws[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_MSG(ws[i].failures == 0, "writer %d: %d failures, last: %s", i, ws[i].failures, ws[i].err);
    }
    sqlite3 *db = raw_open(path);
    CHECK(raw_int(db, "SELECT count(*) FROM models") == 4 * WRITES_PER_THREAD);
    CHECK(raw_int(db, "SELECT count(*) FROM settings") == 4 * WRITES_PER_THREAD);
    sqlite3_close(db);

    /* A writer that finds the lock held waits for it instead of failing. */
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    struct holder h = {path, 300};
    pthread_t ht;
    pthread_create(&ht, NULL, holder_main, &h);
    usleep(100 * 1000); /* let the holder take the lock */
    double t0 = now_s();
    CHECK_MSG(catalog_setting_set(cat, "waited", "yes", err, sizeof err) == CATALOG_OK, "%s", err);
    double waited = now_s() - t0;
    pthread_join(ht, NULL);
    CHECK_MSG(waited > 0.1, "the write did not wait for the lock (%.3f s): was the lock held?", waited);
    char *value;
    CHECK(catalog_setting_get(cat, "holder", &value, err, sizeof err) == CATALOG_OK);
    free(value);
    catalog_close(cat);

    db = raw_open(path);
    char ok[32];
    raw_text(db, "PRAGMA integrity_check", ok, sizeof ok);
    CHECK_MSG(!strcmp(ok, "ok"), "integrity_check: %s", ok);
    sqlite3_close(db);
}

struct set_job { struct catalog *cat; enum catalog_status status; char err[1024]; };

static void *set_main(void *arg) {
    struct set_job *j = arg;
    j->status = catalog_setting_set(j->cat, "behind-the-lock", "1", j->err, sizeof j->err);
    return NULL;
}

/* A write waiting for another process's lock must not hold up reads through
 * the same handle: the daemon's loop reads the catalog while a work-pool
 * thread writes (begin_write lets go of the handle between tries). */
static void test_reads_go_on_while_a_write_waits(void) {
    char path[512];
    path_in(path, sizeof path, "waiting.db");
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    CHECK(catalog_setting_set(cat, "before", "1", err, sizeof err) == CATALOG_OK);
    struct holder h = {path, 1500};
    pthread_t ht, wt;
    pthread_create(&ht, NULL, holder_main, &h);
    usleep(100 * 1000);                     /* the holder has the lock */
    struct set_job j = {cat, CATALOG_ERROR, ""};
    pthread_create(&wt, NULL, set_main, &j);
    usleep(100 * 1000);                     /* the write is waiting */
    double t0 = now_s();
    char *value = NULL;
    CHECK_MSG(catalog_setting_get(cat, "before", &value, err, sizeof err) == CATALOG_OK, "%s", err);
    const double read_s = now_s() - t0;
    CHECK_MSG(read_s < 0.5, "a read waited %.2f s behind a write waiting for the lock", read_s);
    free(value);
    pthread_join(wt, NULL);
    pthread_join(ht, NULL);
    CHECK_MSG(j.status == CATALOG_OK, "the waiting write failed: %s", j.err);
    catalog_close(cat);
}

/* catalog_model_check_file: which changes to a registered file each way sees. */
static void test_check_file(void) {
    char path[512], gguf[512];
    path_in(path, sizeof path, "check.db");
    path_in(gguf, sizeof gguf, "check.gguf");
    size_t size = write_tiny_gguf(gguf, 1, 64);
    struct catalog *cat;
    CHECK_MSG(catalog_open(path, &cat, err, sizeof err) == CATALOG_OK, "%s", err);
    if (!cat) return;
    struct catalog_model m;
    CHECK_MSG(catalog_model_add(cat, gguf, "check", &m, err, sizeof err) == CATALOG_OK, "%s", err);
    catalog_close(cat);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_SHA256, err, sizeof err) == CATALOG_OK);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_STAT, err, sizeof err) == CATALOG_OK);

    /* One bit of tensor data, size and time kept (bit rot): only the hash sees it. */
    struct stat sb;
    CHECK(stat(gguf, &sb) == 0);
    FILE *f = fopen(gguf, "r+b");
    CHECK(f && fseek(f, (long)size - 8, SEEK_SET) == 0);
    if (!f) return;
    int c = fgetc(f);
    fseek(f, (long)size - 8, SEEK_SET);
    fputc(c ^ 1, f);
    fclose(f);
    const struct timespec times[2] = {sb.st_atim, sb.st_mtim};
    CHECK(utimensat(AT_FDCWD, gguf, times, 0) == 0);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_SHA256, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, gguf) && strstr(err, "sha256") && strstr(err, "'check'"), "%s", err);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_STAT, err, sizeof err) == CATALOG_OK);

    /* The registered bytes back, with a new time: only the time differs. */
    write_tiny_gguf(gguf, 1, 64);
    const struct timespec later[2] = {sb.st_atim, {sb.st_mtim.tv_sec + 5, sb.st_mtim.tv_nsec}};
    CHECK(utimensat(AT_FDCWD, gguf, later, 0) == 0);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_SHA256, err, sizeof err) == CATALOG_OK);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_STAT, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, "modified"), "%s", err);

    /* Truncated, then gone: both ways refuse. */
    CHECK(truncate(gguf, (off_t)size - 4) == 0);
    for (int how = CATALOG_CHECK_SHA256; how <= CATALOG_CHECK_STAT; how++) {
        CHECK(catalog_model_check_file(&m, (enum catalog_check)how, err, sizeof err) == CATALOG_INVALID);
        CHECK_MSG(strstr(err, "bytes") && strstr(err, "truncated"), "%s", err);
    }
    unlink(gguf);
    CHECK(catalog_model_check_file(&m, CATALOG_CHECK_SHA256, err, sizeof err) == CATALOG_INVALID);
    CHECK_MSG(strstr(err, gguf) && strstr(err, "No such file"), "%s", err);
    catalog_model_free(&m);
}

static void remove_tree(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/ebb-test-catalog-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    test_fresh_catalog_schema();
    test_models();
    test_variants_and_cascade();
    test_settings_and_reopen();
    test_refusals();
    test_default_path();
    test_concurrent_writers();
    test_reads_go_on_while_a_write_waits();
    test_check_file();
    remove_tree(tmpdir);
    return check_report("test_catalog");
}
