/* The catalog: what models ebb knows, their packed variants, the BitStack
 * block directory, and settings that must survive a restart, in one SQLite
 * database.
 *
 * Who uses it: the daemon (GET /v1/models, the admin routes, the persisted
 * memory budget) and the command line (`ebb models ...`), often at the same
 * time, from different processes. So the database runs in WAL mode (readers
 * never block the writer), every connection sets a busy timeout (a writer
 * waits for the other writer instead of failing), and every write is one
 * short BEGIN IMMEDIATE transaction (the write lock is taken up front, so two
 * writers queue on the busy handler instead of deadlocking on a lock upgrade).
 * Foreign keys are on: removing a model removes its variants and their blocks.
 *
 * The schema is versioned by PRAGMA user_version. catalog.c holds an ordered
 * list of migrations; opening applies the missing ones, each in its own
 * transaction, so a crash leaves the catalog at a whole version. A catalog
 * written by a newer ebb (a version we do not know) is refused, never
 * downgraded.
 *
 * Ownership: catalog_open hands out a handle the caller closes. Rows come back
 * as structs whose strings are malloc'd; the caller releases them with the
 * matching *_free function (list functions return an array plus a count, also
 * freed by one call). A handle may be shared between threads: calls on it are
 * serialised by a mutex inside.
 *
 * Errors: every function returns an enum catalog_status; on anything but
 * CATALOG_OK, err holds a one-line message meant for a person (the CLI prints
 * it as is; the HTTP layer can map the status to 400/404/409/500).
 */
#ifndef EBB_STORAGE_CATALOG_H
#define EBB_STORAGE_CATALOG_H
#include <stddef.h>
#include <stdint.h>

/* The schema version this build writes and understands. */
#define CATALOG_SCHEMA_VERSION 3
/* Longest model name; names are [A-Za-z0-9._:+-] and start with a letter or digit. */
#define CATALOG_NAME_MAX 128
/* How long a connection waits for another process's write lock. */
#define CATALOG_BUSY_TIMEOUT_MS 10000

enum catalog_status {
    CATALOG_OK = 0,
    CATALOG_ERROR = -1,      /* I/O, SQLite, out of memory, unusable catalog */
    CATALOG_NOT_FOUND = 1,   /* no such model / setting */
    CATALOG_EXISTS = 2,      /* a model with that name is already registered */
    CATALOG_INVALID = 3,     /* bad input: corrupt GGUF, bad name, bad field */
};

struct catalog;

struct catalog_model {
    int64_t id;
    char *name;
    char *architecture;       /* general.architecture of the GGUF */
    char *source_path;        /* absolute path of the GGUF */
    char *source_sha256;      /* hex digest, or NULL when not computed */
    int64_t source_bytes;     /* file size when registered */
    int64_t source_mtime_ns;  /* modification time when registered (ns since epoch) */
    int64_t params;           /* total tensor elements in the file */
    int64_t created_at;       /* unix seconds */
};

struct catalog_variant {
    int64_t id;
    int64_t model_id;
    char *kind;               /* "f32", "w4a4", "bitstack", ... */
    char *path;
    int64_t bytes;
    double bits_per_weight;
    int has_perplexity;       /* perplexity and ppl_text are meaningful only if set */
    double perplexity;
    char *ppl_text;           /* which text the perplexity was measured on, or NULL */
    char *checksum;           /* or NULL */
    int64_t created_at;
    char *checkpoint_text;    /* a stack's: what its directory's checkpoint perplexities scored
                               * (1-255 bytes, docs/formats.md), or NULL */
};

/* Opens (creating if needed) the catalog at path, creating missing parent
 * directories, and migrates it to CATALOG_SCHEMA_VERSION. */
enum catalog_status catalog_open(const char *path, struct catalog **out, char *err, size_t errlen);
void catalog_close(struct catalog *cat);
/* PRAGMA user_version as read at open (after migrating). */
int catalog_schema_version(const struct catalog *cat);

/* The catalog path to use when neither a flag, EBB_CATALOG nor the config
 * names one (server/config.c applies those first): $XDG_DATA_HOME/ebb/catalog.db,
 * else $HOME/.local/share/ebb/catalog.db (the XDG default). CATALOG_ERROR if
 * neither variable is set (as for a system user without a home: give the
 * daemon an explicit path, e.g. /var/lib/ebb/catalog.db) or the path is too long. */
enum catalog_status catalog_default_path(char *buf, size_t len, char *err, size_t errlen);

/* Registers the GGUF at gguf_path. The file is opened and fully validated
 * (a corrupt file is refused with the reader's message, as CATALOG_INVALID).
 * name may be NULL: then it is the file's basename without ".gguf". If out is
 * not NULL it receives the new row (free it with catalog_model_free). */
enum catalog_status catalog_model_add(struct catalog *cat, const char *gguf_path, const char *name,
                                      struct catalog_model *out, char *err, size_t errlen);
/* CATALOG_NOT_FOUND (with a message) when no model has that name. */
enum catalog_status catalog_model_get(struct catalog *cat, const char *name, struct catalog_model *out,
                                      char *err, size_t errlen);
/* Every model, ordered by name. *models is NULL when *n is 0. */
enum catalog_status catalog_model_list(struct catalog *cat, struct catalog_model **models, size_t *n,
                                       char *err, size_t errlen);
/* How catalog_model_check_file compares a model's file with its row. */
enum catalog_check {
    CATALOG_CHECK_SHA256 = 0,   /* size, then the whole file's sha256 (reads it all) */
    CATALOG_CHECK_STAT = 1,     /* size and modification time: one stat() */
};
/* Whether the file a model row names is still the file that was registered:
 * a regular file of the registered size and, by `how`, the same sha256 or
 * modification time (a row without a sha256 is compared by time). Touches
 * no database, so it needs no handle and may take long (hashing runs about
 * 250 MB/s here). CATALOG_OK, or CATALOG_INVALID with "PATH: what differs". */
enum catalog_status catalog_model_check_file(const struct catalog_model *m, enum catalog_check how, char *err,
                                             size_t errlen);
/* Removes the model and, through the foreign keys, its variants and blocks.
 * Files on disk are left alone. */
enum catalog_status catalog_model_remove(struct catalog *cat, const char *name, char *err, size_t errlen);
void catalog_model_free(struct catalog_model *m);            /* the strings; not m itself */
void catalog_model_list_free(struct catalog_model *models, size_t n);

/* 0 if name is a valid model name; otherwise -1 with the reason in err. */
int catalog_name_check(const char *name, char *err, size_t errlen);

/* Adds a variant of v->model_id (v->id and v->created_at are ignored);
 * *id_out (may be NULL) receives its id. */
enum catalog_status catalog_variant_add(struct catalog *cat, const struct catalog_variant *v, int64_t *id_out,
                                        char *err, size_t errlen);

/* One block of a BitStack variant's directory, in stack order: where the
 * block lies in the file, and what a budget that keeps the blocks up to
 * this one holds and (at the packer's checkpoints) measured. */
struct catalog_block {
    int64_t ord;              /* position in the stack's order, from 0 */
    int layer, level;
    char *tensor;             /* its matrix's tensor stem, e.g. "blk.3.ffn_up" */
    int64_t offset;           /* its signs' byte offset in the file */
    int64_t bytes;            /* signs and factors */
    int64_t cumulative_bytes; /* the blocks up to and including this one */
    int has_perplexity;       /* a checkpoint: perplexity measured with exactly that prefix */
    double perplexity;
};
/* catalog_variant_add and the variant's block directory, in one
 * transaction: both or neither. ords must run 0..n-1 and cumulative bytes
 * must grow by each block's bytes. */
enum catalog_status catalog_variant_add_stack(struct catalog *cat, const struct catalog_variant *v,
                                              const struct catalog_block *blocks, size_t n, int64_t *id_out,
                                              char *err, size_t errlen);
/* A variant's directory, ordered by ord (none: *n = 0). */
enum catalog_status catalog_variant_blocks(struct catalog *cat, int64_t variant_id, struct catalog_block **blocks,
                                           size_t *n, char *err, size_t errlen);
void catalog_blocks_free(struct catalog_block *blocks, size_t n);
/* The variants of one model, ordered by id. */
enum catalog_status catalog_variant_list(struct catalog *cat, int64_t model_id, struct catalog_variant **variants,
                                         size_t *n, char *err, size_t errlen);
void catalog_variant_list_free(struct catalog_variant *variants, size_t n);

/* Settings: text values by key. get returns CATALOG_NOT_FOUND when unset;
 * *value is malloc'd and owned by the caller. */
enum catalog_status catalog_setting_get(struct catalog *cat, const char *key, char **value, char *err, size_t errlen);
enum catalog_status catalog_setting_set(struct catalog *cat, const char *key, const char *value, char *err,
                                        size_t errlen);
/* Integer convenience over the text value (e.g. "memory_budget_bytes"). A
 * stored value that is not a non-negative integer is CATALOG_ERROR. */
enum catalog_status catalog_setting_get_u64(struct catalog *cat, const char *key, uint64_t *value, char *err,
                                            size_t errlen);
enum catalog_status catalog_setting_set_u64(struct catalog *cat, const char *key, uint64_t value, char *err,
                                            size_t errlen);
#endif
