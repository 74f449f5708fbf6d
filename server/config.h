/* Daemon configuration: one flat struct, filled in layers.
 *
 *   defaults  <  the JSON file (--config FILE, else $EBB_CONFIG)  <  EBB_*
 *   environment variables  <  command-line flags
 *
 * Every setting is one row of a table in config.c (key, type, range, default,
 * one line of documentation); the JSON loader, the environment, the flags,
 * --help text and the effective-config dump are all driven by that table, so
 * a setting cannot exist in one layer and be missing from another. The JSON
 * key "some_key" is the environment variable EBB_SOME_KEY and the flag
 * --some-key.
 *
 * Strictness is the point: an unknown key, a value of the wrong type or out
 * of range, malformed JSON or an unparsable environment value is an error
 * naming the key (and for JSON the line and column), never silently ignored,
 * so a typo in a deployment fails at start instead of running with a default.
 *
 * Strings live in fixed arrays inside the struct, so a config has no heap
 * memory and needs no free; an over-long value is an error.
 *
 * One setting is a small map: model_kv_bits, "NAME=BITS,NAME=BITS", overrides
 * kv_bits per model. It is kept as the validated text and searched when a
 * model loads (config_kv_bits_for): a handful of entries, looked up once per
 * load, need no parsed structure, and a string travels through the file, the
 * environment and the flags like every other setting.
 * docs/operations.md documents every setting.
 */
#ifndef EBB_SERVER_CONFIG_H
#define EBB_SERVER_CONFIG_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum config_log_level { CONFIG_LOG_ERROR, CONFIG_LOG_WARN, CONFIG_LOG_INFO, CONFIG_LOG_DEBUG };
/* draft_policy: drafts verified where they measure to pay, or every one (engine/draft.h). */
enum config_draft_policy { CONFIG_DRAFT_ADAPTIVE, CONFIG_DRAFT_ALWAYS };

/* Where a setting's current value came from. */
enum config_source { CONFIG_FROM_DEFAULT, CONFIG_FROM_FILE, CONFIG_FROM_ENV, CONFIG_FROM_FLAG };

#define CONFIG_N_FIELDS 38

struct ebb_config {
    char host[256];                /* listen address (IPv4 or IPv6 literal, or a host name) */
    int port;                      /* 0 = any free port */
    char admin_token[256];         /* bearer token for /admin; empty = admin routes refused */
    char api_keys[4096];           /* comma-separated keys for the API routes; empty = none (server/auth.h) */
    char api_key_file[4096];       /* a file of keys, one per line; empty = none */
    int insecure_no_auth;          /* 1: serve a non-loopback address with no keys */
    char cors_origins[4096];       /* comma-separated origins browsers may call from, or "*"; empty = none */
    char catalog[4096];            /* catalog path; empty = catalog_default_path() */
    char default_model[129];       /* model loaded at start / used when a request names none */
    char default_model_path[4096]; /* GGUF registered when the catalog is empty; empty = none */
    int threads;                   /* compute threads; 0 = one per online CPU */
    uint64_t memory_budget_bytes;  /* 0 = no budget */
    int memory_budget_mode;        /* 0: fixed (memory_budget_bytes), 1: auto */
    uint64_t memory_reserve_bytes; /* auto: left to the rest of the machine */
    uint64_t max_body_bytes;       /* larger request bodies get 413 */
    int max_header_bytes;          /* request line + headers; larger get 431 */
    int max_connections;           /* open connections; more are refused with 503 */
    int header_timeout_ms;         /* time to receive a request's headers */
    int idle_timeout_ms;           /* keep-alive idle / body inactivity limit */
    int request_timeout_ms;        /* a whole request, first byte to end of body */
    int queue_length;              /* requests waiting for a slot before 429/503 */
    int max_running;               /* sequences decoded together */
    int max_context;               /* tokens per sequence; 0 = the model's own */
    int kv_bits;                   /* KV cache precision: 32, 16, 8 or 4 */
    char model_kv_bits[4096];      /* per-model kv_bits: "NAME=BITS,NAME=BITS"; empty = none */
    int weights;                   /* enum model_weights: native types, or dequantized to f32 */
    char device[32];               /* "cpu", "cuda" or "cuda:N" (kernels/backend.h) */
    int verify_models;             /* enum catalog_check: how a model's file is checked at load */
    int shutdown_timeout_ms;       /* SIGTERM: how long running requests may finish */
    int log_level;                 /* enum config_log_level */
    int speculative;               /* enum draft_source: requests' drafts unless they say (engine/draft.h) */
    int draft_policy;              /* enum config_draft_policy */
    int context_compression;       /* enum compress_mode for requests that do not say (engine/compress.h) */
    int compression_budget_percent;/* share of a compressed prompt kept at the cache's precision */
    int compression_min_prompt;    /* shorter prompts are not compressed */
    int compression_lookahead;     /* compress_params.lookahead for requests that do not say */
    int compression_select;        /* enum compress_select for requests that do not say */
    uint64_t prompt_cache_bytes;   /* the scheduler's prompt cache per model (0: off) */
    unsigned char source[CONFIG_N_FIELDS]; /* enum config_source per field, table order */
};

/* Fills every field with its default. */
void config_defaults(struct ebb_config *cfg);

/* Applies a JSON object from a file / from text (name is used in messages).
 * 0 on success; -1 with "FILE:LINE:COL: ..." or "FILE: key 'k': ..." in err.
 * On failure cfg may be partly updated: do not use it. */
int config_load_file(struct ebb_config *cfg, const char *path, char *err, size_t errlen);
int config_load_text(struct ebb_config *cfg, const char *json, const char *name, char *err, size_t errlen);

/* Applies every EBB_<KEY> variable that is set. 0 or -1 naming the variable. */
int config_apply_env(struct ebb_config *cfg, char *err, size_t errlen);

/* Applies one flag: name may be "port", "--port", "admin-token" or
 * "admin_token". 0 on success (value used), -1 for a bad value, 1 (with a
 * message) when name is not a config flag, so a command can handle its own
 * flags first, 2 when a boolean flag was given alone ("--insecure-no-auth":
 * true; value, when it is not "true" or "false", is the next argument). */
int config_apply_flag(struct ebb_config *cfg, const char *name, const char *value, char *err, size_t errlen);

/* Defaults, then the file (path, or $EBB_CONFIG when path is NULL; no file if
 * neither), then the environment. Flags are for the caller to apply after. */
int config_load(struct ebb_config *cfg, const char *path, char *err, size_t errlen);

/* The catalog to open: cfg->catalog, else the XDG default. 0 or -1. */
int config_catalog_path(const struct ebb_config *cfg, char *buf, size_t len, char *err, size_t errlen);
/* The catalog a command without a loaded configuration opens: config_load
 * (config_path as there), then the --catalog flag when catalog_flag is not
 * NULL, then config_catalog_path. 0, or -1 with the reason in err. */
int config_resolve_catalog(const char *config_path, const char *catalog_flag, char *buf, size_t len, char *err,
                           size_t errlen);

/* Writes the effective configuration as JSON (admin_token and api_keys
 * shown only as "(set)" or ""), with where each value came from when
 * with_sources. */
void config_dump(const struct ebb_config *cfg, FILE *out, int with_sources);
/* One line per flag for a command's --help: "  --port N   ... (EBB_PORT, default 8080)". */
void config_flags_help(FILE *out);

/* The KV cache precision for the model named model_name: its model_kv_bits
 * entry if it has one, else the global kv_bits. model_kv_bits was validated
 * when it was set, so this cannot fail. */
int config_kv_bits_for(const struct ebb_config *cfg, const char *model_name);

const char *config_log_level_name(int level);
/* The source of the setting named key (JSON spelling); -1 if no such key. */
int config_source_of(const struct ebb_config *cfg, const char *key);
/* Iteration over the table: the i-th key, its environment variable and flag
 * (static strings); NULL past the end. Used by docs tests. */
const char *config_key(int i);
#endif
