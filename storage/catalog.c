/* The SQLite catalog; see catalog.h for the model (WAL, busy timeout,
 * BEGIN IMMEDIATE writes, versioned migrations).
 *
 * Layout of this file: small helpers around sqlite3 (prepare, bind, step,
 * copy a column out), opening and migrating, then one section per table.
 * Every statement is prepared with '?' parameters; no SQL text is ever built
 * from input. Statements are prepared per call rather than cached: the
 * catalog is touched a few times per admin action, not per token, and
 * per-call statements keep every function self-contained.
 *
 * Locking: each public function takes cat->mu for its whole duration, so
 * sqlite3_errmsg() still describes our own failure when we read it.
 */
#include "storage/catalog.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "storage/error.h"
#include "storage/gguf.h"
#include "storage/sha256.h"

/* 'ebb1': written to PRAGMA application_id so a stray SQLite file is not
 * mistaken for a catalog (and a catalog is recognisable with `file`). */
#define CATALOG_APPLICATION_ID 0x65626231

#define STR_(x) #x
#define STR(x) STR_(x)

struct catalog {
    sqlite3 *db;
    char *path;
    int version;
    pthread_mutex_t mu;
};

/* ---- small helpers ---------------------------------------------------- */

#ifndef NDEBUG
/* For asserts: whether cat->mu is held (by this thread, as far as a
 * non-recursive mutex can tell). */
static int held(struct catalog *cat) {
    if (pthread_mutex_trylock(&cat->mu)) return 1;
    pthread_mutex_unlock(&cat->mu);
    return 0;
}
#endif

/* What a person should know when SQLite gave up waiting for a lock: "database
 * is locked" alone reads like a bug in ebb. Empty for other results. */
static const char *busy_hint(int rc) {
    return (rc & 0xff) == SQLITE_BUSY
               ? " (another process has held the catalog locked for over " STR(CATALOG_BUSY_TIMEOUT_MS) " ms; "
                 "nothing was changed: retry when it lets go)"
               : "";
}

/* "catalog PATH: WHAT: sqlite's reason" -- always CATALOG_ERROR. */
static enum catalog_status db_fail(struct catalog *cat, const char *what, char *err, size_t errlen) {
    errf(err, errlen, "catalog %s: %s: %s%s", cat->path, what, sqlite3_errmsg(cat->db),
         busy_hint(sqlite3_extended_errcode(cat->db)));
    return CATALOG_ERROR;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int prepare(struct catalog *cat, const char *sql, sqlite3_stmt **st, char *err, size_t errlen) {
    if (sqlite3_prepare_v2(cat->db, sql, -1, st, NULL) != SQLITE_OK) {
        db_fail(cat, "preparing a statement", err, errlen);
        *st = NULL;
        return -1;
    }
    return 0;
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
    return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

/* Copies a TEXT column out (NULL stays NULL). -1 only when out of memory. */
static int column_dup(sqlite3_stmt *st, int i, char **out) {
    *out = NULL;
    if (sqlite3_column_type(st, i) == SQLITE_NULL) return 0;
    const unsigned char *t = sqlite3_column_text(st, i);
    if (!t) return -1;
    *out = dup_str((const char *)t);
    return *out ? 0 : -1;
}

/* Runs SQL without parameters or result rows (BEGIN, COMMIT, DDL). */
static int exec_sql(struct catalog *cat, const char *sql, char *err, size_t errlen) {
    char *msg = NULL;
    int rc = sqlite3_exec(cat->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        errf(err, errlen, "catalog %s: %s%s", cat->path, msg ? msg : sqlite3_errmsg(cat->db), busy_hint(rc));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

/* A single integer from a one-row query (PRAGMAs). */
/* The first n columns of the single row a query returns. */
static int query_ints(struct catalog *cat, const char *sql, int64_t *out, int n, char *err, size_t errlen) {
    sqlite3_stmt *st;
    if (prepare(cat, sql, &st, err, errlen)) return -1;
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        db_fail(cat, sql, err, errlen);
        sqlite3_finalize(st);
        return -1;
    }
    for (int i = 0; i < n; i++) out[i] = sqlite3_column_int64(st, i);
    sqlite3_finalize(st);
    return 0;
}

static int query_int(struct catalog *cat, const char *sql, int64_t *out, char *err, size_t errlen) {
    return query_ints(cat, sql, out, 1, err, errlen);
}

/* Write transactions take the write lock up front (IMMEDIATE): with WAL a
 * deferred transaction that reads first and then writes can fail with
 * SQLITE_BUSY_SNAPSHOT without ever consulting the busy handler.
 *
 * Waiting for another process's write lock is done here, not by SQLite's
 * busy handler: the handler would sleep holding cat->mu, and every other
 * call on the handle (the daemon's loop reads the catalog for GET
 * /admin/models) would wait behind it for the whole busy timeout. Here each
 * try is immediate and cat->mu is let go between tries, so reads, which WAL
 * never blocks, go on. The caller holds cat->mu and no transaction. */
static int begin_write(struct catalog *cat, char *err, size_t errlen) {
    assert(held(cat) && sqlite3_get_autocommit(cat->db));
    sqlite3_busy_timeout(cat->db, 0);
    int rc;
    for (int waited_ms = 0, step = 1;; waited_ms += step, step = step < 32 ? 2 * step : step) {
        rc = sqlite3_exec(cat->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if ((rc & 0xff) != SQLITE_BUSY || waited_ms >= CATALOG_BUSY_TIMEOUT_MS) break;
        pthread_mutex_unlock(&cat->mu);
        usleep((useconds_t)step * 1000);
        pthread_mutex_lock(&cat->mu);
    }
    sqlite3_busy_timeout(cat->db, CATALOG_BUSY_TIMEOUT_MS);
    if (rc == SQLITE_OK) return 0;
    errf(err, errlen, "catalog %s: %s%s", cat->path, sqlite3_errstr(rc), busy_hint(rc));
    return -1;
}

static int commit(struct catalog *cat, char *err, size_t errlen) {
    if (exec_sql(cat, "COMMIT", err, errlen)) {
        sqlite3_exec(cat->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return 0;
}

static void rollback(struct catalog *cat) {
    if (!sqlite3_get_autocommit(cat->db)) sqlite3_exec(cat->db, "ROLLBACK", NULL, NULL, NULL);
}

/* mkdir -p of the directory part of path; existing directories are fine. */
static int make_parent_dirs(const char *path, char *err, size_t errlen) {
    char *dir = dup_str(path);
    if (!dir) { errf(err, errlen, "out of memory"); return -1; }
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) { free(dir); return 0; }
    *slash = 0;
    for (char *p = dir + 1; ; p++) {
        if (*p != '/' && *p) continue;
        char saved = *p;
        *p = 0;
        if (mkdir(dir, 0755) && errno != EEXIST) {
            errf(err, errlen, "catalog %s: cannot create directory %s: %s", path, dir, strerror(errno));
            free(dir);
            return -1;
        }
        *p = saved;
        if (!saved) break;
    }
    free(dir);
    return 0;
}

/* ---- schema and migrations ---------------------------------------------
 * migrations[i] takes the catalog from version i to i + 1. Append only: a
 * released migration is never edited, because catalogs out there already ran
 * it. Each runs in its own transaction together with the user_version bump. */

static const char *const migrations[] = {
    /* 1: the initial schema. */
    "PRAGMA application_id = 1700946481;\n" /* CATALOG_APPLICATION_ID in decimal */
    "CREATE TABLE models (\n"
    "  id              INTEGER PRIMARY KEY,\n"
    "  name            TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),\n"
    "  architecture    TEXT NOT NULL,\n"
    "  source_path     TEXT NOT NULL,\n"
    "  source_sha256   TEXT CHECK (source_sha256 IS NULL OR length(source_sha256) = 64),\n"
    "  source_bytes    INTEGER NOT NULL CHECK (source_bytes >= 0),\n"
    "  source_mtime_ns INTEGER NOT NULL,\n"
    "  params          INTEGER NOT NULL CHECK (params >= 0),\n"
    "  created_at      INTEGER NOT NULL\n"
    ") STRICT;\n"
    "CREATE TABLE variants (\n"
    "  id              INTEGER PRIMARY KEY,\n"
    "  model_id        INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,\n"
    "  kind            TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 32),\n"
    "  path            TEXT NOT NULL CHECK (length(path) >= 1),\n"
    "  bytes           INTEGER NOT NULL CHECK (bytes >= 0),\n"
    "  bits_per_weight REAL NOT NULL CHECK (bits_per_weight >= 0),\n"
    "  perplexity      REAL CHECK (perplexity IS NULL OR perplexity > 0),\n"
    "  ppl_text        TEXT,\n"
    "  checksum        TEXT,\n"
    "  created_at      INTEGER NOT NULL,\n"
    "  UNIQUE (model_id, kind, path)\n"
    ") STRICT;\n"
    "CREATE TABLE bitstack_blocks (\n"
    "  id                INTEGER PRIMARY KEY,\n"
    "  variant_id        INTEGER NOT NULL REFERENCES variants(id) ON DELETE CASCADE,\n"
    "  ord               INTEGER NOT NULL CHECK (ord >= 0),\n"
    "  layer             INTEGER NOT NULL CHECK (layer >= 0),\n"
    "  tensor            TEXT NOT NULL,\n"
    "  offset            INTEGER NOT NULL CHECK (offset >= 0),\n"
    "  bytes             INTEGER NOT NULL CHECK (bytes >= 0),\n"
    "  cumulative_bytes  INTEGER NOT NULL CHECK (cumulative_bytes >= 0),\n"
    "  ppl_at_checkpoint REAL,\n"
    "  UNIQUE (variant_id, ord)\n"
    ") STRICT;\n"
    "CREATE TABLE settings (\n"
    "  key        TEXT PRIMARY KEY,\n"
    "  value      TEXT NOT NULL,\n"
    "  updated_at INTEGER NOT NULL\n"
    ") STRICT, WITHOUT ROWID;\n",
    /* 2: a block's level in its matrix (the directory names order, layer,
     * tensor, level, offset, bytes). */
    "ALTER TABLE bitstack_blocks ADD COLUMN level INTEGER NOT NULL DEFAULT 0 CHECK (level >= 0);\n",
    /* 3: what a stack's checkpoints scored (its file's
     * ebb.bitstack.checkpoint_text): without it the directory's perplexities
     * could be read as the variant's own, measured on other text. */
    ("ALTER TABLE variants ADD COLUMN checkpoint_text TEXT "
     "CHECK (checkpoint_text IS NULL OR length(CAST(checkpoint_text AS BLOB)) BETWEEN 1 AND 255);\n"),
};
#define N_MIGRATIONS ((int)(sizeof migrations / sizeof migrations[0]))
_Static_assert(N_MIGRATIONS == CATALOG_SCHEMA_VERSION, "one migration per schema version");
_Static_assert(CATALOG_APPLICATION_ID == 1700946481, "application_id literal in migration 1");

/* Reads user_version and application_id and refuses databases that are not
 * (or not yet understood as) ebb catalogs. */
static int check_identity(struct catalog *cat, int64_t *version, char *err, size_t errlen) {
    /* One statement, so one snapshot: read separately, the three could
     * straddle another connection's first migration (version 0 and no
     * application id read before it commits, its tables after) and a
     * fresh catalog being created next door would look like a foreign
     * database. */
    int64_t id[3];
    if (query_ints(cat,
                   "SELECT (SELECT user_version FROM pragma_user_version), "
                   "(SELECT application_id FROM pragma_application_id), (SELECT count(*) FROM sqlite_schema)",
                   id, 3, err, errlen))
        return -1;
    *version = id[0];
    const int64_t app_id = id[1], n_tables = id[2];
    if (*version > CATALOG_SCHEMA_VERSION) {
        errf(err, errlen,
             "catalog %s: schema version %lld is newer than this ebb understands (%d); "
             "use a newer ebb (catalogs are never downgraded)",
             cat->path, (long long)*version, CATALOG_SCHEMA_VERSION);
        return -1;
    }
    if (*version < 0 || (app_id != CATALOG_APPLICATION_ID && (app_id != 0 || *version != 0 || n_tables != 0))) {
        errf(err, errlen, "catalog %s: this SQLite database is not an ebb catalog (application_id %lld, "
             "user_version %lld)", cat->path, (long long)app_id, (long long)*version);
        return -1;
    }
    return 0;
}

static int migrate(struct catalog *cat, char *err, size_t errlen) {
    int64_t version;
    if (check_identity(cat, &version, err, errlen)) return -1;
    while (version < CATALOG_SCHEMA_VERSION) {
        if (begin_write(cat, err, errlen)) return -1;
        /* Re-read under the write lock: another process may have migrated
         * while we waited. */
        if (check_identity(cat, &version, err, errlen)) { rollback(cat); return -1; }
        if (version == CATALOG_SCHEMA_VERSION) { rollback(cat); break; }
        char bump[64];
        snprintf(bump, sizeof bump, "PRAGMA user_version = %d", (int)version + 1);
        char why[512];
        if (exec_sql(cat, migrations[version], why, sizeof why) || exec_sql(cat, bump, why, sizeof why)) {
            rollback(cat);
            errf(err, errlen, "migrating to schema version %d failed: %s", (int)version + 1, why);
            return -1;
        }
        if (commit(cat, err, errlen)) return -1;
        version++;
    }
    cat->version = (int)version;
    return 0;
}

/* WAL is persistent in the file; switching needs a brief exclusive lock, so
 * when several processes open a fresh catalog at once the switch can report
 * busy. Retry within the busy timeout. */
static int enable_wal(struct catalog *cat, char *err, size_t errlen) {
    for (int waited_ms = 0;; waited_ms += 5) {
        sqlite3_stmt *st;
        if (prepare(cat, "PRAGMA journal_mode = WAL", &st, err, errlen)) return -1;
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            const char *mode = (const char *)sqlite3_column_text(st, 0);
            int ok = mode && !strcmp(mode, "wal");
            if (!ok) errf(err, errlen, "catalog %s: cannot switch to WAL mode (journal mode is '%s')",
                          cat->path, mode ? mode : "?");
            sqlite3_finalize(st);
            return ok ? 0 : -1;
        }
        sqlite3_finalize(st);
        if ((rc & 0xff) != SQLITE_BUSY || waited_ms >= CATALOG_BUSY_TIMEOUT_MS) {
            db_fail(cat, "switching to WAL mode", err, errlen);
            return -1;
        }
        usleep(5000);
    }
}

enum catalog_status catalog_open(const char *path, struct catalog **out, char *err, size_t errlen) {
    *out = NULL;
    if (!path || !*path) {
        errf(err, errlen, "catalog: empty path");
        return CATALOG_INVALID;
    }
    if (make_parent_dirs(path, err, errlen)) return CATALOG_ERROR;
    struct catalog *cat = calloc(1, sizeof *cat);
    if (!cat || !(cat->path = dup_str(path))) {
        free(cat);
        errf(err, errlen, "out of memory");
        return CATALOG_ERROR;
    }
    if (pthread_mutex_init(&cat->mu, NULL)) {
        free(cat->path);
        free(cat);
        errf(err, errlen, "catalog %s: cannot create a mutex", path);
        return CATALOG_ERROR;
    }
    int rc = sqlite3_open_v2(path, &cat->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    if (rc != SQLITE_OK) {
        errf(err, errlen, "catalog %s: cannot open: %s", path,
             cat->db ? sqlite3_errmsg(cat->db) : sqlite3_errstr(rc));
        catalog_close(cat);
        return CATALOG_ERROR;
    }
    int64_t fk = 0;
    if (sqlite3_extended_result_codes(cat->db, 1) != SQLITE_OK ||
        sqlite3_busy_timeout(cat->db, CATALOG_BUSY_TIMEOUT_MS) != SQLITE_OK) {
        db_fail(cat, "configuring the connection", err, errlen);
        goto fail;
    }
    /* The first real read also tells a non-database file apart. */
    if (query_int(cat, "PRAGMA schema_version", &fk, err, errlen)) goto fail;
    if (enable_wal(cat, err, errlen)) goto fail;
    /* FULL: a commit is on disk when it returns; catalog writes are rare. */
    if (exec_sql(cat, "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON", err, errlen)) goto fail;
    if (query_int(cat, "PRAGMA foreign_keys", &fk, err, errlen)) goto fail;
    if (fk != 1) {
        errf(err, errlen, "catalog %s: this SQLite cannot enforce foreign keys", path);
        goto fail;
    }
    pthread_mutex_lock(&cat->mu);   /* begin_write lets go of it while it waits */
    int migrated = migrate(cat, err, errlen);
    pthread_mutex_unlock(&cat->mu);
    if (migrated) goto fail;
    *out = cat;
    return CATALOG_OK;
fail:
    catalog_close(cat);
    return CATALOG_ERROR;
}

void catalog_close(struct catalog *cat) {
    if (!cat) return;
    /* sqlite3_close fails only with unfinalized statements, which every path
     * here finalizes; close_v2 would hide such a leak, so use plain close. */
    if (cat->db && sqlite3_close(cat->db) != SQLITE_OK)
        fprintf(stderr, "catalog %s: close: %s\n", cat->path, sqlite3_errmsg(cat->db));
    pthread_mutex_destroy(&cat->mu);
    free(cat->path);
    free(cat);
}

int catalog_schema_version(const struct catalog *cat) { return cat->version; }

enum catalog_status catalog_default_path(char *buf, size_t len, char *err, size_t errlen) {
    const char *xdg = getenv("XDG_DATA_HOME"), *home = getenv("HOME");
    int n;
    /* The XDG spec says a relative XDG_DATA_HOME is invalid and to be ignored. */
    if (xdg && xdg[0] == '/') n = snprintf(buf, len, "%s/ebb/catalog.db", xdg);
    else if (home && home[0]) n = snprintf(buf, len, "%s/.local/share/ebb/catalog.db", home);
    else {
        errf(err, errlen, "no catalog path: set EBB_CATALOG, the config's \"catalog\", --catalog, "
             "or HOME / XDG_DATA_HOME");
        return CATALOG_ERROR;
    }
    if (n < 0 || (size_t)n >= len) {
        errf(err, errlen, "default catalog path is too long");
        return CATALOG_ERROR;
    }
    return CATALOG_OK;
}

/* ---- models ------------------------------------------------------------ */

#define MODEL_COLUMNS \
    "id, name, architecture, source_path, source_sha256, source_bytes, source_mtime_ns, params, created_at"

static int model_from_row(sqlite3_stmt *st, struct catalog_model *m) {
    memset(m, 0, sizeof *m);
    m->id = sqlite3_column_int64(st, 0);
    m->source_bytes = sqlite3_column_int64(st, 5);
    m->source_mtime_ns = sqlite3_column_int64(st, 6);
    m->params = sqlite3_column_int64(st, 7);
    m->created_at = sqlite3_column_int64(st, 8);
    if (column_dup(st, 1, &m->name) || column_dup(st, 2, &m->architecture) ||
        column_dup(st, 3, &m->source_path) || column_dup(st, 4, &m->source_sha256)) {
        catalog_model_free(m);
        return -1;
    }
    return 0;
}

void catalog_model_free(struct catalog_model *m) {
    if (!m) return;
    free(m->name);
    free(m->architecture);
    free(m->source_path);
    free(m->source_sha256);
    memset(m, 0, sizeof *m);
}

void catalog_model_list_free(struct catalog_model *models, size_t n) {
    for (size_t i = 0; i < n; i++) catalog_model_free(&models[i]);
    free(models);
}

int catalog_name_check(const char *name, char *err, size_t errlen) {
    size_t n = name ? strlen(name) : 0;
    if (n == 0) { errf(err, errlen, "model name is empty"); return -1; }
    if (n > CATALOG_NAME_MAX) {
        errf(err, errlen, "model name is %zu characters long; at most %d allowed", n, CATALOG_NAME_MAX);
        return -1;
    }
    /* Names appear in URLs (/admin/models/NAME) and JSON; keep them to a
     * set that needs no escaping anywhere. */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && !(i > 0 && (c == '.' || c == '_' || c == '-' || c == ':' || c == '+'))) {
            errf(err, errlen, "model name '%.*s' is invalid: use letters, digits and . _ - : + "
                 "(starting with a letter or digit)", CATALOG_NAME_MAX, name);
            return -1;
        }
    }
    return 0;
}

/* The basename of path without a trailing ".gguf"; malloc'd. */
static char *default_name(const char *path) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 5 && !strcmp(base + n - 5, ".gguf")) n -= 5;
    char *name = malloc(n + 1);
    if (!name) return NULL;
    memcpy(name, base, n);
    name[n] = 0;
    return name;
}

/* Everything registering a file needs to know about it, read before any
 * catalog lock is taken (validating a large GGUF takes a while). */
struct model_facts {
    char *abs_path;
    char *arch;
    char sha256[65];
    int64_t bytes, mtime_ns, params;
};

static void model_facts_free(struct model_facts *f) {
    free(f->abs_path);
    free(f->arch);
}

static enum catalog_status inspect_gguf(const char *path, struct model_facts *facts, char *err, size_t errlen) {
    memset(facts, 0, sizeof *facts);
    char *abs_path = realpath(path, NULL);
    if (!abs_path) {
        errf(err, errlen, "%s: %s", path, strerror(errno));
        return CATALOG_INVALID;
    }
    facts->abs_path = abs_path;
    struct stat sb;
    if (stat(abs_path, &sb)) {
        errf(err, errlen, "%s: %s", path, strerror(errno));
        goto invalid;
    }
    if (!S_ISREG(sb.st_mode)) {
        errf(err, errlen, "%s: not a regular file", path);
        goto invalid;
    }
    facts->bytes = (int64_t)sb.st_size;
    facts->mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;

    struct gguf_file f;
    if (gguf_open(&f, abs_path, err, errlen)) goto invalid;
    struct gguf_str arch;
    if (gguf_get_str(&f, "general.architecture", &arch) || arch.len == 0 || arch.len > 64) {
        errf(err, errlen, "%s: no usable general.architecture key; is this a model GGUF?", path);
        gguf_close(&f);
        goto invalid;
    }
    facts->arch = malloc(arch.len + 1);
    if (!facts->arch) {
        gguf_close(&f);
        errf(err, errlen, "out of memory");
        model_facts_free(facts);
        return CATALOG_ERROR;
    }
    memcpy(facts->arch, arch.ptr, arch.len);
    facts->arch[arch.len] = 0;
    uint64_t params = 0;
    for (uint64_t i = 0; i < f.n_tensors; i++) params += f.tensors[i].n_elems;
    facts->params = params > INT64_MAX ? INT64_MAX : (int64_t)params;
    /* The file is already mapped: hashing it here costs one sequential read
     * (about 0.3 s per 100 MB) and pins the exact bytes that were registered. */
    sha256_hex(f.map, f.size, facts->sha256);
    gguf_close(&f);
    if (strlen(facts->arch) != arch.len) {
        errf(err, errlen, "%s: general.architecture contains a NUL byte", path);
        goto invalid;
    }
    return CATALOG_OK;
invalid:
    model_facts_free(facts);
    memset(facts, 0, sizeof *facts);
    return CATALOG_INVALID;
}

/* Looks a model up by name or id (name NULL); caller holds the lock. */
static enum catalog_status model_lookup(struct catalog *cat, const char *name, int64_t id, struct catalog_model *out,
                                        char *err, size_t errlen) {
    assert(held(cat));
    sqlite3_stmt *st;
    const char *sql = name ? "SELECT " MODEL_COLUMNS " FROM models WHERE name = ?"
                           : "SELECT " MODEL_COLUMNS " FROM models WHERE id = ?";
    if (prepare(cat, sql, &st, err, errlen)) return CATALOG_ERROR;
    if ((name ? bind_text(st, 1, name) : sqlite3_bind_int64(st, 1, id)) != SQLITE_OK) {
        db_fail(cat, "binding a model name", err, errlen);
        sqlite3_finalize(st);
        return CATALOG_ERROR;
    }
    enum catalog_status status = CATALOG_OK;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        if (model_from_row(st, out)) {
            errf(err, errlen, "out of memory");
            status = CATALOG_ERROR;
        }
    } else if (rc == SQLITE_DONE) {
        if (name) errf(err, errlen, "no model named '%s' in the catalog", name);
        else errf(err, errlen, "no model with id %lld in the catalog", (long long)id);
        status = CATALOG_NOT_FOUND;
    } else {
        status = db_fail(cat, "reading a model", err, errlen);
    }
    sqlite3_finalize(st);
    return status;
}

static enum catalog_status model_insert(struct catalog *cat, const char *name, const struct model_facts *facts,
                                        int64_t *id, char *err, size_t errlen) {
    if (begin_write(cat, err, errlen)) return CATALOG_ERROR;
    sqlite3_stmt *st;
    if (prepare(cat, "INSERT INTO models (name, architecture, source_path, source_sha256, source_bytes, "
                     "source_mtime_ns, params, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                &st, err, errlen)) {
        rollback(cat);
        return CATALOG_ERROR;
    }
    enum catalog_status status = CATALOG_OK;
    if (bind_text(st, 1, name) != SQLITE_OK || bind_text(st, 2, facts->arch) != SQLITE_OK ||
        bind_text(st, 3, facts->abs_path) != SQLITE_OK || bind_text(st, 4, facts->sha256) != SQLITE_OK ||
        sqlite3_bind_int64(st, 5, facts->bytes) != SQLITE_OK ||
        sqlite3_bind_int64(st, 6, facts->mtime_ns) != SQLITE_OK ||
        sqlite3_bind_int64(st, 7, facts->params) != SQLITE_OK ||
        sqlite3_bind_int64(st, 8, (int64_t)time(NULL)) != SQLITE_OK) {
        status = db_fail(cat, "binding a model", err, errlen);
    } else {
        int rc = sqlite3_step(st);
        if (rc == SQLITE_CONSTRAINT_UNIQUE) {
            errf(err, errlen, "a model named '%s' is already in the catalog", name);
            status = CATALOG_EXISTS;
        } else if (rc != SQLITE_DONE) {
            status = db_fail(cat, "adding a model", err, errlen);
        } else {
            *id = sqlite3_last_insert_rowid(cat->db);
        }
    }
    sqlite3_finalize(st);
    if (status != CATALOG_OK) {
        rollback(cat);
        return status;
    }
    return commit(cat, err, errlen) ? CATALOG_ERROR : CATALOG_OK;
}

enum catalog_status catalog_model_add(struct catalog *cat, const char *gguf_path, const char *name,
                                      struct catalog_model *out, char *err, size_t errlen) {
    if (out) memset(out, 0, sizeof *out);
    if (!gguf_path || !*gguf_path) {
        errf(err, errlen, "no model file given");
        return CATALOG_INVALID;
    }
    char *owned_name = NULL;
    if (!name) {
        if (!(owned_name = default_name(gguf_path))) {
            errf(err, errlen, "out of memory");
            return CATALOG_ERROR;
        }
        name = owned_name;
    }
    char why[512];
    if (catalog_name_check(name, why, sizeof why)) {
        if (owned_name) errf(err, errlen, "%s (derived from the file name; choose one with a name)", why);
        else errf(err, errlen, "%s", why);
        free(owned_name);
        return CATALOG_INVALID;
    }
    struct model_facts facts;
    enum catalog_status status = inspect_gguf(gguf_path, &facts, err, errlen);
    if (status != CATALOG_OK) {
        free(owned_name);
        return status;
    }
    int64_t id = 0;
    pthread_mutex_lock(&cat->mu);
    status = model_insert(cat, name, &facts, &id, err, errlen);
    if (status == CATALOG_OK && out) status = model_lookup(cat, NULL, id, out, err, errlen);
    pthread_mutex_unlock(&cat->mu);
    model_facts_free(&facts);
    free(owned_name);
    return status;
}

enum catalog_status catalog_model_get(struct catalog *cat, const char *name, struct catalog_model *out,
                                      char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (!name) {
        errf(err, errlen, "no model name given");
        return CATALOG_INVALID;
    }
    pthread_mutex_lock(&cat->mu);
    enum catalog_status status = model_lookup(cat, name, 0, out, err, errlen);
    pthread_mutex_unlock(&cat->mu);
    return status;
}

enum catalog_status catalog_model_check_file(const struct catalog_model *m, enum catalog_check how, char *err,
                                             size_t errlen) {
    assert(m && m->source_path && m->name);
    const char *path = m->source_path;
    struct stat sb;
    if (stat(path, &sb)) {
        errf(err, errlen, "%s: %s (registered as model '%s')", path, strerror(errno), m->name);
        return CATALOG_INVALID;
    }
    if (!S_ISREG(sb.st_mode)) {
        errf(err, errlen, "%s: not a regular file (registered as model '%s')", path, m->name);
        return CATALOG_INVALID;
    }
    /* The same advice for every difference: the file is not the one whose
     * facts (and perplexity) the catalog holds. */
    char redo[2 * CATALOG_NAME_MAX + PATH_MAX + 96];
    snprintf(redo, sizeof redo, "if the change is intended, register it again: ebb models rm %s && ebb models add %s "
             "--name %s", m->name, path, m->name);
    if ((int64_t)sb.st_size != m->source_bytes) {
        errf(err, errlen, "%s: is %lld bytes but was %lld when registered as model '%s': the file was changed or "
             "truncated after registration; %s", path, (long long)sb.st_size, (long long)m->source_bytes, m->name,
             redo);
        return CATALOG_INVALID;
    }
    if (how == CATALOG_CHECK_SHA256 && m->source_sha256) {
        char hex[65];
        if (sha256_file(path, hex)) {
            errf(err, errlen, "%s: cannot read it to check its sha256: %s", path, strerror(errno));
            return CATALOG_INVALID;
        }
        if (strcmp(hex, m->source_sha256)) {
            errf(err, errlen, "%s: sha256 %.16s... differs from the %.16s... registered for model '%s': the file "
                 "was changed or damaged after registration; %s", path, hex, m->source_sha256, m->name, redo);
            return CATALOG_INVALID;
        }
        return CATALOG_OK;
    }
    const int64_t mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
    if (mtime_ns != m->source_mtime_ns) {
        errf(err, errlen, "%s: modified after it was registered as model '%s' (same size, new modification "
             "time); %s", path, m->name, redo);
        return CATALOG_INVALID;
    }
    return CATALOG_OK;
}

enum catalog_status catalog_model_list(struct catalog *cat, struct catalog_model **models, size_t *n,
                                       char *err, size_t errlen) {
    *models = NULL;
    *n = 0;
    pthread_mutex_lock(&cat->mu);
    sqlite3_stmt *st;
    enum catalog_status status = CATALOG_OK;
    struct catalog_model *arr = NULL;
    size_t count = 0, cap = 0;
    if (prepare(cat, "SELECT " MODEL_COLUMNS " FROM models ORDER BY name", &st, err, errlen)) {
        pthread_mutex_unlock(&cat->mu);
        return CATALOG_ERROR;
    }
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (count == cap) {
            size_t grown_cap = cap ? cap * 2 : 8;
            struct catalog_model *grown = realloc(arr, grown_cap * sizeof *arr);
            if (!grown) break;
            arr = grown;
            cap = grown_cap;
        }
        if (model_from_row(st, &arr[count])) break;
        count++;
    }
    if (rc == SQLITE_ROW) {
        errf(err, errlen, "out of memory");
        status = CATALOG_ERROR;
    } else if (rc != SQLITE_DONE) {
        status = db_fail(cat, "listing models", err, errlen);
    }
    sqlite3_finalize(st);
    pthread_mutex_unlock(&cat->mu);
    if (status != CATALOG_OK) {
        catalog_model_list_free(arr, count);
        return status;
    }
    *models = arr;
    *n = count;
    return CATALOG_OK;
}

enum catalog_status catalog_model_remove(struct catalog *cat, const char *name, char *err, size_t errlen) {
    if (!name) {
        errf(err, errlen, "no model name given");
        return CATALOG_INVALID;
    }
    pthread_mutex_lock(&cat->mu);
    enum catalog_status status = CATALOG_OK;
    sqlite3_stmt *st = NULL;
    if (begin_write(cat, err, errlen)) {
        status = CATALOG_ERROR;
        goto out;
    }
    if (prepare(cat, "DELETE FROM models WHERE name = ?", &st, err, errlen)) {
        status = CATALOG_ERROR;
    } else if (bind_text(st, 1, name) != SQLITE_OK) {
        status = db_fail(cat, "binding a model name", err, errlen);
    } else if (sqlite3_step(st) != SQLITE_DONE) {
        status = db_fail(cat, "removing a model", err, errlen);
    } else if (sqlite3_changes(cat->db) == 0) {
        errf(err, errlen, "no model named '%s' in the catalog", name);
        status = CATALOG_NOT_FOUND;
    }
    sqlite3_finalize(st);
    if (status != CATALOG_OK) rollback(cat);
    else if (commit(cat, err, errlen)) status = CATALOG_ERROR;
out:
    pthread_mutex_unlock(&cat->mu);
    return status;
}

/* ---- variants ---------------------------------------------------------- */

#define VARIANT_COLUMNS \
    "id, model_id, kind, path, bytes, bits_per_weight, perplexity, ppl_text, checksum, created_at, checkpoint_text"

static int variant_from_row(sqlite3_stmt *st, struct catalog_variant *v) {
    memset(v, 0, sizeof *v);
    v->id = sqlite3_column_int64(st, 0);
    v->model_id = sqlite3_column_int64(st, 1);
    v->bytes = sqlite3_column_int64(st, 4);
    v->bits_per_weight = sqlite3_column_double(st, 5);
    v->has_perplexity = sqlite3_column_type(st, 6) != SQLITE_NULL;
    v->perplexity = v->has_perplexity ? sqlite3_column_double(st, 6) : 0;
    v->created_at = sqlite3_column_int64(st, 9);
    if (column_dup(st, 2, &v->kind) || column_dup(st, 3, &v->path) || column_dup(st, 7, &v->ppl_text) ||
        column_dup(st, 8, &v->checksum) || column_dup(st, 10, &v->checkpoint_text)) {
        free(v->kind);
        free(v->path);
        free(v->ppl_text);
        free(v->checksum);
        free(v->checkpoint_text);
        return -1;
    }
    return 0;
}

enum catalog_status catalog_variant_blocks(struct catalog *cat, int64_t variant_id, struct catalog_block **blocks,
                                           size_t *n, char *err, size_t errlen) {
    *blocks = NULL;
    *n = 0;
    pthread_mutex_lock(&cat->mu);
    sqlite3_stmt *st;
    if (prepare(cat, "SELECT ord, layer, level, tensor, offset, bytes, cumulative_bytes, ppl_at_checkpoint "
                     "FROM bitstack_blocks WHERE variant_id = ? ORDER BY ord", &st, err, errlen)) {
        pthread_mutex_unlock(&cat->mu);
        return CATALOG_ERROR;
    }
    enum catalog_status status = CATALOG_OK;
    struct catalog_block *arr = NULL;
    size_t count = 0, cap = 0;
    int rc = sqlite3_bind_int64(st, 1, variant_id);
    if (rc != SQLITE_OK) status = db_fail(cat, "binding a variant id", err, errlen);
    while (status == CATALOG_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (count == cap) {
            const size_t ncap = cap ? 2 * cap : 64;
            struct catalog_block *grown = realloc(arr, ncap * sizeof *grown);
            if (!grown) {
                errf(err, errlen, "out of memory reading a block directory");
                status = CATALOG_ERROR;
                break;
            }
            arr = grown;
            cap = ncap;
        }
        struct catalog_block *b = &arr[count];
        *b = (struct catalog_block){
            .ord = sqlite3_column_int64(st, 0), .layer = sqlite3_column_int(st, 1), .level = sqlite3_column_int(st, 2),
            .offset = sqlite3_column_int64(st, 4), .bytes = sqlite3_column_int64(st, 5),
            .cumulative_bytes = sqlite3_column_int64(st, 6),
            .has_perplexity = sqlite3_column_type(st, 7) != SQLITE_NULL,
            .perplexity = sqlite3_column_double(st, 7)};
        if (column_dup(st, 3, &b->tensor)) {
            errf(err, errlen, "out of memory reading a block directory");
            status = CATALOG_ERROR;
            break;
        }
        count++;
    }
    if (status == CATALOG_OK && rc != SQLITE_DONE) status = db_fail(cat, "reading a block directory", err, errlen);
    sqlite3_finalize(st);
    pthread_mutex_unlock(&cat->mu);
    if (status != CATALOG_OK) {
        catalog_blocks_free(arr, count);
        return status;
    }
    *blocks = arr;
    *n = count;
    return CATALOG_OK;
}

void catalog_blocks_free(struct catalog_block *blocks, size_t n) {
    for (size_t i = 0; i < n; i++) free(blocks[i].tensor);
    free(blocks);
}

void catalog_variant_list_free(struct catalog_variant *variants, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(variants[i].kind);
        free(variants[i].path);
        free(variants[i].ppl_text);
        free(variants[i].checksum);
        free(variants[i].checkpoint_text);
    }
    free(variants);
}

static int variant_check(const struct catalog_variant *v, char *err, size_t errlen) {
    if (!v->kind || !*v->kind || strlen(v->kind) > 32) {
        errf(err, errlen, "variant kind must be 1 to 32 characters");
        return -1;
    }
    if (!v->path || !*v->path) { errf(err, errlen, "variant path is empty"); return -1; }
    if (v->bytes < 0) { errf(err, errlen, "variant bytes is negative"); return -1; }
    if (!isfinite(v->bits_per_weight) || v->bits_per_weight < 0) {
        errf(err, errlen, "variant bits_per_weight must be a finite non-negative number");
        return -1;
    }
    if (v->has_perplexity && (!isfinite(v->perplexity) || v->perplexity <= 0)) {
        errf(err, errlen, "variant perplexity must be a finite positive number");
        return -1;
    }
    if (v->checkpoint_text && (!*v->checkpoint_text || strlen(v->checkpoint_text) > 255)) {
        errf(err, errlen, "variant checkpoint_text must be 1 to 255 bytes");
        return -1;
    }
    return 0;
}

static int blocks_check(const struct catalog_block *b, size_t n, char *err, size_t errlen) {
    int64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        total += b[i].bytes;
        if (b[i].ord != (int64_t)i || b[i].layer < 0 || b[i].level < 0 || !b[i].tensor || b[i].offset < 0 ||
            b[i].bytes < 0 || b[i].cumulative_bytes != total || (b[i].has_perplexity && !(b[i].perplexity > 0))) {
            errf(err, errlen, "block %zu of the directory is malformed", i);
            return -1;
        }
    }
    return 0;
}

/* The directory's rows for variant id (inside the caller's transaction). */
static enum catalog_status insert_blocks(struct catalog *cat, int64_t id, const struct catalog_block *b, size_t n,
                                         char *err, size_t errlen) {
    if (!n) return CATALOG_OK;
    sqlite3_stmt *st;
    if (prepare(cat, "INSERT INTO bitstack_blocks (variant_id, ord, layer, tensor, level, offset, bytes, "
                     "cumulative_bytes, ppl_at_checkpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", &st, err, errlen))
        return CATALOG_ERROR;
    enum catalog_status status = CATALOG_OK;
    for (size_t i = 0; i < n && status == CATALOG_OK; i++) {
        if (sqlite3_bind_int64(st, 1, id) != SQLITE_OK || sqlite3_bind_int64(st, 2, b[i].ord) != SQLITE_OK ||
            sqlite3_bind_int(st, 3, b[i].layer) != SQLITE_OK || bind_text(st, 4, b[i].tensor) != SQLITE_OK ||
            sqlite3_bind_int(st, 5, b[i].level) != SQLITE_OK || sqlite3_bind_int64(st, 6, b[i].offset) != SQLITE_OK ||
            sqlite3_bind_int64(st, 7, b[i].bytes) != SQLITE_OK ||
            sqlite3_bind_int64(st, 8, b[i].cumulative_bytes) != SQLITE_OK ||
            (b[i].has_perplexity ? sqlite3_bind_double(st, 9, b[i].perplexity) : sqlite3_bind_null(st, 9)) !=
                SQLITE_OK)
            status = db_fail(cat, "binding a block", err, errlen);
        else if (sqlite3_step(st) != SQLITE_DONE)
            status = db_fail(cat, "adding a block", err, errlen);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    return status;
}

enum catalog_status catalog_variant_add(struct catalog *cat, const struct catalog_variant *v, int64_t *id_out,
                                        char *err, size_t errlen) {
    return catalog_variant_add_stack(cat, v, NULL, 0, id_out, err, errlen);
}

enum catalog_status catalog_variant_add_stack(struct catalog *cat, const struct catalog_variant *v,
                                              const struct catalog_block *blocks, size_t n, int64_t *id_out,
                                              char *err, size_t errlen) {
    if (variant_check(v, err, errlen) || blocks_check(blocks, n, err, errlen)) return CATALOG_INVALID;
    pthread_mutex_lock(&cat->mu);
    enum catalog_status status = CATALOG_OK;
    sqlite3_stmt *st = NULL;
    if (begin_write(cat, err, errlen)) {
        status = CATALOG_ERROR;
        goto out;
    }
    if (prepare(cat, "INSERT INTO variants (model_id, kind, path, bytes, bits_per_weight, perplexity, ppl_text, "
                     "checksum, created_at, checkpoint_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", &st, err,
                errlen)) {
        status = CATALOG_ERROR;
    } else if (sqlite3_bind_int64(st, 1, v->model_id) != SQLITE_OK || bind_text(st, 2, v->kind) != SQLITE_OK ||
               bind_text(st, 3, v->path) != SQLITE_OK || sqlite3_bind_int64(st, 4, v->bytes) != SQLITE_OK ||
               sqlite3_bind_double(st, 5, v->bits_per_weight) != SQLITE_OK ||
               (v->has_perplexity ? sqlite3_bind_double(st, 6, v->perplexity) : sqlite3_bind_null(st, 6)) != SQLITE_OK ||
               bind_text(st, 7, v->has_perplexity ? v->ppl_text : NULL) != SQLITE_OK ||
               bind_text(st, 8, v->checksum) != SQLITE_OK ||
               sqlite3_bind_int64(st, 9, (int64_t)time(NULL)) != SQLITE_OK ||
               bind_text(st, 10, v->checkpoint_text) != SQLITE_OK) {
        status = db_fail(cat, "binding a variant", err, errlen);
    } else {
        int rc = sqlite3_step(st);
        if (rc == SQLITE_CONSTRAINT_FOREIGNKEY) {
            errf(err, errlen, "no model with id %lld in the catalog", (long long)v->model_id);
            status = CATALOG_NOT_FOUND;
        } else if (rc == SQLITE_CONSTRAINT_UNIQUE) {
            errf(err, errlen, "model %lld already has a '%s' variant at %s", (long long)v->model_id, v->kind,
                 v->path);
            status = CATALOG_EXISTS;
        } else if (rc != SQLITE_DONE) {
            status = db_fail(cat, "adding a variant", err, errlen);
        } else {
            const int64_t id = sqlite3_last_insert_rowid(cat->db);
            status = insert_blocks(cat, id, blocks, n, err, errlen);
            if (id_out) *id_out = id;
        }
    }
    sqlite3_finalize(st);
    if (status != CATALOG_OK) rollback(cat);
    else if (commit(cat, err, errlen)) status = CATALOG_ERROR;
out:
    pthread_mutex_unlock(&cat->mu);
    return status;
}

enum catalog_status catalog_variant_list(struct catalog *cat, int64_t model_id, struct catalog_variant **variants,
                                         size_t *n, char *err, size_t errlen) {
    *variants = NULL;
    *n = 0;
    pthread_mutex_lock(&cat->mu);
    sqlite3_stmt *st;
    enum catalog_status status = CATALOG_OK;
    struct catalog_variant *arr = NULL;
    size_t count = 0, cap = 0;
    if (prepare(cat, "SELECT " VARIANT_COLUMNS " FROM variants WHERE model_id = ? ORDER BY id", &st, err, errlen)) {
        pthread_mutex_unlock(&cat->mu);
        return CATALOG_ERROR;
    }
    int rc = sqlite3_bind_int64(st, 1, model_id);
    if (rc != SQLITE_OK) {
        status = db_fail(cat, "binding a model id", err, errlen);
    } else {
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            if (count == cap) {
                size_t grown_cap = cap ? cap * 2 : 4;
                struct catalog_variant *grown = realloc(arr, grown_cap * sizeof *arr);
                if (!grown) break;
                arr = grown;
                cap = grown_cap;
            }
            if (variant_from_row(st, &arr[count])) break;
            count++;
        }
        if (rc == SQLITE_ROW) {
            errf(err, errlen, "out of memory");
            status = CATALOG_ERROR;
        } else if (rc != SQLITE_DONE) {
            status = db_fail(cat, "listing variants", err, errlen);
        }
    }
    sqlite3_finalize(st);
    pthread_mutex_unlock(&cat->mu);
    if (status != CATALOG_OK) {
        catalog_variant_list_free(arr, count);
        return status;
    }
    *variants = arr;
    *n = count;
    return CATALOG_OK;
}

/* ---- settings ---------------------------------------------------------- */

static int setting_key_check(const char *key, char *err, size_t errlen) {
    if (!key || !*key || strlen(key) > 128) {
        errf(err, errlen, "setting key must be 1 to 128 characters");
        return -1;
    }
    return 0;
}

enum catalog_status catalog_setting_get(struct catalog *cat, const char *key, char **value, char *err,
                                        size_t errlen) {
    *value = NULL;
    if (setting_key_check(key, err, errlen)) return CATALOG_INVALID;
    pthread_mutex_lock(&cat->mu);
    sqlite3_stmt *st;
    enum catalog_status status = CATALOG_OK;
    if (prepare(cat, "SELECT value FROM settings WHERE key = ?", &st, err, errlen)) {
        pthread_mutex_unlock(&cat->mu);
        return CATALOG_ERROR;
    }
    if (bind_text(st, 1, key) != SQLITE_OK) {
        status = db_fail(cat, "binding a setting key", err, errlen);
    } else {
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            if (column_dup(st, 0, value) || !*value) {
                errf(err, errlen, "out of memory");
                status = CATALOG_ERROR;
            }
        } else if (rc == SQLITE_DONE) {
            errf(err, errlen, "setting '%s' is not set", key);
            status = CATALOG_NOT_FOUND;
        } else {
            status = db_fail(cat, "reading a setting", err, errlen);
        }
    }
    sqlite3_finalize(st);
    pthread_mutex_unlock(&cat->mu);
    return status;
}

enum catalog_status catalog_setting_set(struct catalog *cat, const char *key, const char *value, char *err,
                                        size_t errlen) {
    if (setting_key_check(key, err, errlen)) return CATALOG_INVALID;
    if (!value) {
        errf(err, errlen, "setting '%s': no value", key);
        return CATALOG_INVALID;
    }
    pthread_mutex_lock(&cat->mu);
    enum catalog_status status = CATALOG_OK;
    sqlite3_stmt *st = NULL;
    if (begin_write(cat, err, errlen)) {
        status = CATALOG_ERROR;
        goto out;
    }
    if (prepare(cat, "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                &st, err, errlen)) {
        status = CATALOG_ERROR;
    } else if (bind_text(st, 1, key) != SQLITE_OK || bind_text(st, 2, value) != SQLITE_OK ||
               sqlite3_bind_int64(st, 3, (int64_t)time(NULL)) != SQLITE_OK) {
        status = db_fail(cat, "binding a setting", err, errlen);
    } else if (sqlite3_step(st) != SQLITE_DONE) {
        status = db_fail(cat, "writing a setting", err, errlen);
    }
    sqlite3_finalize(st);
    if (status != CATALOG_OK) rollback(cat);
    else if (commit(cat, err, errlen)) status = CATALOG_ERROR;
out:
    pthread_mutex_unlock(&cat->mu);
    return status;
}

enum catalog_status catalog_setting_get_u64(struct catalog *cat, const char *key, uint64_t *value, char *err,
                                            size_t errlen) {
    char *text;
    enum catalog_status status = catalog_setting_get(cat, key, &text, err, errlen);
    if (status != CATALOG_OK) return status;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] < '0' || text[0] > '9') {
        errf(err, errlen, "catalog %s: setting '%s' is '%s', not a non-negative integer", cat->path, key, text);
        status = CATALOG_ERROR;
    } else {
        *value = v;
    }
    free(text);
    return status;
}

enum catalog_status catalog_setting_set_u64(struct catalog *cat, const char *key, uint64_t value, char *err,
                                            size_t errlen) {
    char text[32];
    snprintf(text, sizeof text, "%llu", (unsigned long long)value);
    return catalog_setting_set(cat, key, text, err, errlen);
}
