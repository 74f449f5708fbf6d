/* Configuration tests: defaults, then each layer (file, environment, flag)
 * overriding the one below, and every kind of bad input refused with a
 * message that names the key (and, for malformed JSON, the line and column).
 *
 * The expected defaults are written out here by hand, not read from the
 * table in config.c, so changing a default is a deliberate act in two places.
 * conf/ebb.json and docs/operations.md are checked against the table: the
 * shipped file must spell out exactly the defaults, and the documentation
 * must mention every key, its environment variable and its flag.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "engine/model.h"
#include "server/config.h"

static char err[1024];
static char tmpdir[256];

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f)) {
        perror(path);
        exit(2);
    }
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    if (buf) buf[n] = 0;
    fclose(f);
    return buf;
}

/* Every EBB_* variable the config reads, cleared so the caller's
 * environment cannot leak into the tests. */
static void clear_env(void) {
    for (int i = 0; config_key(i); i++) {
        char name[64];
        int n = snprintf(name, sizeof name, "EBB_");
        for (const char *k = config_key(i); *k; k++) name[n++] = (char)(*k >= 'a' && *k <= 'z' ? *k - 32 : *k);
        name[n] = 0;
        unsetenv(name);
    }
    unsetenv("EBB_CONFIG");
}

static void check_defaults(const struct ebb_config *c) {
    CHECK(!strcmp(c->host, "127.0.0.1"));
    CHECK(c->port == 8080);
    CHECK(c->admin_token[0] == 0);
    CHECK(c->catalog[0] == 0);
    CHECK(!strcmp(c->default_model, "SmolLM2-135M-Instruct.Q4_1"));
    CHECK(!strcmp(c->default_model_path, "models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    CHECK(c->threads == 0);
    CHECK(c->memory_budget_bytes == 0);
    CHECK(c->memory_budget_mode == 0 && c->memory_reserve_bytes == 512ull << 20);
    CHECK(c->max_body_bytes == 8388608);
    CHECK(c->prompt_cache_bytes == 1ull << 30);
    CHECK(c->max_header_bytes == 16384);
    CHECK(c->max_connections == 1024);
    CHECK(c->header_timeout_ms == 10000);
    CHECK(c->idle_timeout_ms == 30000);
    CHECK(c->request_timeout_ms == 60000);
    CHECK(c->queue_length == 64);
    CHECK(c->max_running == 16);
    CHECK(c->max_context == 0);
    CHECK(c->kv_bits == 32);
    CHECK(c->model_kv_bits[0] == 0);
    CHECK(c->weights == MODEL_WEIGHTS_NATIVE);
    CHECK(c->shutdown_timeout_ms == 10000);
    CHECK(c->log_level == CONFIG_LOG_INFO);
}

static void test_defaults(void) {
    struct ebb_config c;
    config_defaults(&c);
    check_defaults(&c);
    for (int i = 0; config_key(i); i++) CHECK(config_source_of(&c, config_key(i)) == CONFIG_FROM_DEFAULT);
    CHECK(config_key(CONFIG_N_FIELDS) == NULL);
    CHECK(config_source_of(&c, "nonsense") == -1);
    CHECK(!strcmp(config_log_level_name(CONFIG_LOG_DEBUG), "debug"));
}

/* The shipped conf/ebb.json is the defaults, spelled out, every key present. */
static void test_shipped_file(void) {
    const char *src = getenv("EBB_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/conf/ebb.json", src ? src : ".");
    struct ebb_config c;
    config_defaults(&c);
    CHECK_MSG(config_load_file(&c, path, err, sizeof err) == 0, "%s", err);
    check_defaults(&c);
    for (int i = 0; config_key(i); i++)
        CHECK_MSG(config_source_of(&c, config_key(i)) == CONFIG_FROM_FILE, "%s missing from conf/ebb.json",
                  config_key(i));
}

static void test_file_override(void) {
    struct ebb_config c;
    config_defaults(&c);
    CHECK_MSG(config_load_text(&c, "{\"port\": 9000, \"host\": \"::1\", \"log_level\": \"debug\", "
                                   "\"memory_budget_bytes\": 6442450944, \"kv_bits\": 4, \"admin_token\": \"s3\"}",
                               "t.json", err, sizeof err) == 0, "%s", err);
    CHECK(c.port == 9000);
    CHECK(!strcmp(c.host, "::1"));
    CHECK(c.log_level == CONFIG_LOG_DEBUG);
    CHECK(c.memory_budget_bytes == 6442450944ULL); /* above 32 bits */
    CHECK(c.kv_bits == 4);
    CHECK(!strcmp(c.admin_token, "s3"));
    CHECK_MSG(config_load_text(&c, "{\"kv_bits\": 8}", "t8.json", err, sizeof err) == 0, "%s", err);
    CHECK_MSG(config_load_text(&c, "{\"weights\": \"f32\"}", "tw.json", err, sizeof err) == 0, "%s", err);
    CHECK(c.weights == MODEL_WEIGHTS_F32);
    CHECK(c.kv_bits == 8);
    CHECK(c.queue_length == 64); /* untouched keys keep their defaults */
    CHECK(config_source_of(&c, "port") == CONFIG_FROM_FILE);
    CHECK(config_source_of(&c, "queue_length") == CONFIG_FROM_DEFAULT);
    /* An empty object changes nothing. */
    struct ebb_config d;
    config_defaults(&d);
    CHECK(config_load_text(&d, "{}", "e.json", err, sizeof err) == 0);
    check_defaults(&d);
}

static void test_env_override(void) {
    clear_env();
    struct ebb_config c;
    config_defaults(&c);
    setenv("EBB_PORT", "9100", 1);
    setenv("EBB_ADMIN_TOKEN", "from-env", 1);
    setenv("EBB_LOG_LEVEL", "warn", 1);
    setenv("EBB_CATALOG", "/var/lib/ebb/catalog.db", 1);
    CHECK_MSG(config_apply_env(&c, err, sizeof err) == 0, "%s", err);
    CHECK(c.port == 9100);
    CHECK(!strcmp(c.admin_token, "from-env"));
    CHECK(c.log_level == CONFIG_LOG_WARN);
    CHECK(!strcmp(c.catalog, "/var/lib/ebb/catalog.db"));
    CHECK(config_source_of(&c, "port") == CONFIG_FROM_ENV);
    CHECK(config_source_of(&c, "host") == CONFIG_FROM_DEFAULT);

    const char *bad[][3] = {
        {"EBB_PORT", "abc", "EBB_PORT"},      {"EBB_PORT", "70000", "EBB_PORT"}, {"EBB_PORT", "", "EBB_PORT"},
        {"EBB_PORT", "80x", "EBB_PORT"},      {"EBB_PORT", " 80", "EBB_PORT"},  {"EBB_KV_BITS", "12", "EBB_KV_BITS"},
        {"EBB_LOG_LEVEL", "loud", "EBB_LOG_LEVEL"}, {"EBB_HOST", "", "EBB_HOST"},
        {"EBB_MEMORY_BUDGET_BYTES", "-1", "EBB_MEMORY_BUDGET_BYTES"},
        {"EBB_THREADS", "99999999999999999999", "EBB_THREADS"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        clear_env();
        setenv(bad[i][0], bad[i][1], 1);
        config_defaults(&c);
        CHECK_MSG(config_apply_env(&c, err, sizeof err) == -1, "%s=%s accepted", bad[i][0], bad[i][1]);
        CHECK_MSG(strstr(err, bad[i][2]), "%s", err);
    }
    clear_env();
}

static void test_flag_override(void) {
    struct ebb_config c;
    config_defaults(&c);
    CHECK(config_apply_flag(&c, "--port", "9200", err, sizeof err) == 0);
    CHECK(config_apply_flag(&c, "admin-token", "flag-token", err, sizeof err) == 0);
    CHECK(config_apply_flag(&c, "--kv-bits", "16", err, sizeof err) == 0);
    CHECK(config_apply_flag(&c, "max_running", "4", err, sizeof err) == 0);
    CHECK(c.port == 9200 && !strcmp(c.admin_token, "flag-token") && c.kv_bits == 16 && c.max_running == 4);
    CHECK(config_source_of(&c, "kv_bits") == CONFIG_FROM_FLAG);
    CHECK(config_apply_flag(&c, "--kv-bits", "12", err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "--kv-bits") && strstr(err, "one of 32, 16, 8, 4"), "%s", err);
    CHECK(c.kv_bits == 16); /* a refused value leaves the old one */
    CHECK_MSG(config_apply_flag(&c, "--kv-bits", "8", err, sizeof err) == 0, "%s", err);
    CHECK(c.kv_bits == 8);
    CHECK(config_apply_flag(&c, "--max-running", "0", err, sizeof err) == -1);
    CHECK(config_apply_flag(&c, "--port", NULL, err, sizeof err) == -1);
    CHECK(config_apply_flag(&c, "--model-dir", "x", err, sizeof err) == 1);
    CHECK_MSG(strstr(err, "--model-dir"), "%s", err);
    CHECK(config_apply_flag(&c, "--", "x", err, sizeof err) == 1);
    /* device: its own form, checked when given; a refused one leaves the old */
    CHECK(!strcmp(c.device, "cpu"));
    CHECK_MSG(config_apply_flag(&c, "--device", "cuda:3", err, sizeof err) == 0 && !strcmp(c.device, "cuda:3"), "%s", err);
    CHECK(config_apply_flag(&c, "--device", "cuda", err, sizeof err) == 0 && !strcmp(c.device, "cuda"));
    static const char *const bad[] = {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1024", "cuda0", "CPU", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_MSG(config_apply_flag(&c, "--device", bad[i], err, sizeof err) == -1, "'%s' accepted", bad[i]);
        CHECK_MSG(strstr(err, "--device") && (!*bad[i] || strstr(err, "a device is cpu, cuda or cuda:N")), "%s", err);
        CHECK(!strcmp(c.device, "cuda"));
    }
}

/* The layers in their order: file < env < flag. */
static void test_precedence(void) {
    clear_env();
    char path[512];
    snprintf(path, sizeof path, "%s/layers.json", tmpdir);
    write_text(path, "{\"port\": 1111, \"host\": \"0.0.0.0\", \"threads\": 3}\n");
    setenv("EBB_PORT", "2222", 1);
    setenv("EBB_THREADS", "5", 1);
    struct ebb_config c;
    CHECK_MSG(config_load(&c, path, err, sizeof err) == 0, "%s", err);
    CHECK(config_apply_flag(&c, "--threads", "7", err, sizeof err) == 0);
    CHECK(!strcmp(c.host, "0.0.0.0"));  /* file */
    CHECK(c.port == 2222);              /* env beats file */
    CHECK(c.threads == 7);              /* flag beats env */
    CHECK(c.queue_length == 64);        /* default */
    CHECK(config_source_of(&c, "host") == CONFIG_FROM_FILE);
    CHECK(config_source_of(&c, "port") == CONFIG_FROM_ENV);
    CHECK(config_source_of(&c, "threads") == CONFIG_FROM_FLAG);
    clear_env();

    /* With no path, $EBB_CONFIG names the file. */
    setenv("EBB_CONFIG", path, 1);
    CHECK_MSG(config_load(&c, NULL, err, sizeof err) == 0, "%s", err);
    CHECK(c.port == 1111);
    unsetenv("EBB_CONFIG");
    CHECK(config_load(&c, NULL, err, sizeof err) == 0);
    CHECK(c.port == 8080);

    /* A missing file is an error naming it. */
    char missing[512];
    snprintf(missing, sizeof missing, "%s/nope.json", tmpdir);
    CHECK(config_load(&c, missing, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "nope.json"), "%s", err);

    /* The catalog location: the config's, else the XDG default. */
    char cat[4096];
    config_defaults(&c);
    setenv("XDG_DATA_HOME", "/xdg", 1);
    CHECK(config_catalog_path(&c, cat, sizeof cat, err, sizeof err) == 0);
    CHECK_MSG(!strcmp(cat, "/xdg/ebb/catalog.db"), "%s", cat);
    CHECK(config_apply_flag(&c, "--catalog", "/tmp/x.db", err, sizeof err) == 0);
    CHECK(config_catalog_path(&c, cat, sizeof cat, err, sizeof err) == 0);
    CHECK(!strcmp(cat, "/tmp/x.db"));
    /* The same layers from a command line: flag over environment over default;
     * a bad configuration file is the error. */
    CHECK(config_resolve_catalog(NULL, NULL, cat, sizeof cat, err, sizeof err) == 0);
    CHECK_MSG(!strcmp(cat, "/xdg/ebb/catalog.db"), "%s", cat);
    setenv("EBB_CATALOG", "/env/c.db", 1);
    CHECK(config_resolve_catalog(NULL, NULL, cat, sizeof cat, err, sizeof err) == 0);
    CHECK_MSG(!strcmp(cat, "/env/c.db"), "%s", cat);
    CHECK(config_resolve_catalog(NULL, "/flag/c.db", cat, sizeof cat, err, sizeof err) == 0);
    CHECK_MSG(!strcmp(cat, "/flag/c.db"), "%s", cat);
    unsetenv("EBB_CATALOG");
    CHECK(config_resolve_catalog(missing, "/flag/c.db", cat, sizeof cat, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "nope.json"), "%s", err);
    unsetenv("XDG_DATA_HOME");
}

static void expect_refused(const char *json, const char *needle1, const char *needle2) {
    struct ebb_config c;
    config_defaults(&c);
    int rc = config_load_text(&c, json, "bad.json", err, sizeof err);
    CHECK_MSG(rc == -1, "accepted: %s", json);
    CHECK_MSG(strstr(err, "bad.json"), "no file name in: %s", err);
    if (needle1) CHECK_MSG(strstr(err, needle1), "'%s' not in: %s", needle1, err);
    if (needle2) CHECK_MSG(strstr(err, needle2), "'%s' not in: %s", needle2, err);
}

static void test_bad_files(void) {
    /* Unknown keys, including near misses of real ones. */
    expect_refused("{\"prot\": 8080}", "unknown key 'prot'", NULL);
    expect_refused("{\"port\": 8080, \"Port\": 8081}", "'Port'", NULL);
    /* Wrong types name the key and what was expected. */
    expect_refused("{\"port\": \"8080\"}", "'port'", "expected an integer");
    expect_refused("{\"port\": 80.5}", "'port'", "integer");
    expect_refused("{\"port\": true}", "'port'", "boolean");
    expect_refused("{\"host\": 5}", "'host'", "expected a string");
    expect_refused("{\"host\": null}", "'host'", "null");
    expect_refused("{\"admin_token\": [\"a\"]}", "'admin_token'", "an array");
    expect_refused("{\"log_level\": 2}", "'log_level'", "one of");
    expect_refused("{\"log_level\": \"loud\"}", "log_level", "loud");
    expect_refused("{\"weights\": \"q4\"}", "'weights'", "'q4' is not a valid value: expected one of \"native\", \"f32\"");
    expect_refused("{\"weights\": 32}", "'weights'", "expected one of");
    expect_refused("{\"speculative\": \"eagle\"}", "'speculative'",
                   "'eagle' is not a valid value: expected one of \"none\", \"ngram\"");
    expect_refused("{\"draft_policy\": true}", "'draft_policy'", "expected one of");
    expect_refused("{\"draft_policy\": \"sometimes\"}", "'draft_policy'", "\"adaptive\", \"always\"");
    expect_refused("{\"context_compression\": \"squash\"}", "'context_compression'",
                   "expected one of \"off\", \"demote\", \"drop\"");
    expect_refused("{\"compression_budget_percent\": 101}", "'compression_budget_percent'", "[0, 100]");
    expect_refused("{\"compression_min_prompt\": -5}", "'compression_min_prompt'", NULL);
    expect_refused("{\"compression_lookahead\": 65}", "'compression_lookahead'", "[0, 64]");
    expect_refused("{\"compression_select\": \"best\"}", "'compression_select'",
                   "expected one of \"snapkv\", \"snapkv_head\", \"random\", \"recent\", \"reconstruct\"");
    expect_refused("{\"prompt_cache_bytes\": -1}", "'prompt_cache_bytes'", NULL);
    expect_refused("{\"prompt_cache_bytes\": \"lots\"}", "'prompt_cache_bytes'", NULL);
    /* Out of range. */
    expect_refused("{\"port\": 65536}", "'port'", "[0, 65535]");
    expect_refused("{\"port\": -1}", "'port'", NULL);
    expect_refused("{\"kv_bits\": 12}", "'kv_bits'", "one of 32, 16, 8, 4");
    expect_refused("{\"kv_bits\": 0}", "'kv_bits'", "one of 32, 16, 8, 4");
    expect_refused("{\"max_body_bytes\": 10}", "'max_body_bytes'", NULL);
    expect_refused("{\"memory_budget_bytes\": -5}", "'memory_budget_bytes'", NULL);
    expect_refused("{\"memory_budget_mode\": \"automatic\"}", "'memory_budget_mode'", NULL);
    expect_refused("{\"memory_reserve_bytes\": -1}", "'memory_reserve_bytes'", NULL);
    expect_refused("{\"host\": \"\"}", "'host'", "empty");
    /* Structure. */
    expect_refused("[1, 2]", "JSON object", NULL);
    expect_refused("{\"port\": 1, \"port\": 2}", "port", NULL); /* duplicate key */
    char longv[400];
    memset(longv, 'x', sizeof longv);
    memcpy(longv, "{\"host\": \"", 10);
    memcpy(longv + sizeof longv - 3, "\"}", 3);
    expect_refused(longv, "'host'", "at most 255");
    expect_refused("{\"host\": \"a\\u0000b\"}", NULL, NULL); /* jansson refuses NUL in strings */
}

/* Malformed JSON reports the line and column of the mistake. */
static void test_malformed_json(void) {
    struct ebb_config c;
    char path[512];
    snprintf(path, sizeof path, "%s/broken.json", tmpdir);
    /* Line 3 lacks the colon: jansson stops on the unexpected string "x"
     * (columns 10-12; it reports the end of the token it could not use). */
    write_text(path, "{\n  \"port\": 8080,\n  \"host\" \"x\"\n}\n");
    config_defaults(&c);
    CHECK(config_load_file(&c, path, err, sizeof err) == -1);
    char want[600];
    snprintf(want, sizeof want, "%s:3:", path);
    CHECK_MSG(strstr(err, want), "no %s in: %s", want, err);
    int line = 0, col = 0;
    const char *at = strstr(err, want);
    if (at) sscanf(at + strlen(path), ":%d:%d:", &line, &col);
    CHECK_MSG(line == 3 && col >= 10 && col <= 12, "line %d column %d", line, col);

    /* Trailing comma on line 2, and a file cut short. */
    write_text(path, "{\"port\": 8080,\n}\n");
    CHECK(config_load_file(&c, path, err, sizeof err) == -1);
    snprintf(want, sizeof want, "%s:2:", path);
    CHECK_MSG(strstr(err, want), "no %s in: %s", want, err);
    write_text(path, "{\"port\": 80");
    CHECK(config_load_file(&c, path, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "invalid JSON"), "%s", err);
    write_text(path, "");
    CHECK(config_load_file(&c, path, err, sizeof err) == -1);
}

static void test_dump(void) {
    struct ebb_config c;
    config_defaults(&c);
    CHECK(config_apply_flag(&c, "--admin-token", "very-secret", err, sizeof err) == 0);
    CHECK(config_apply_flag(&c, "--port", "1234", err, sizeof err) == 0);
    char path[512];
    snprintf(path, sizeof path, "%s/dump.json", tmpdir);
    FILE *f = fopen(path, "w");
    if (!f) { CHECK(0); return; }
    config_dump(&c, f, 1);
    fclose(f);
    char *text = read_text(path);
    CHECK(text != NULL);
    if (!text) return;
    CHECK_MSG(!strstr(text, "very-secret"), "token leaked: %s", text);
    CHECK(strstr(text, "\"port\": 1234") != NULL);
    /* The dump is itself a loadable configuration once _sources is dropped. */
    char *src = strstr(text, ",\n  \"_sources\"");
    if (src) strcpy(src, "\n}\n");
    struct ebb_config d;
    config_defaults(&d);
    CHECK_MSG(config_load_text(&d, text, "dump.json", err, sizeof err) == 0, "%s", err);
    CHECK(d.port == 1234 && !strcmp(d.admin_token, "(set)"));
    free(text);

    snprintf(path, sizeof path, "%s/help.txt", tmpdir);
    f = fopen(path, "w");
    if (!f) { CHECK(0); return; }
    config_flags_help(f);
    fclose(f);
    text = read_text(path);
    CHECK(text && strstr(text, "--admin-token") && strstr(text, "EBB_ADMIN_TOKEN") && strstr(text, "--kv-bits") &&
          strstr(text, "--model-kv-bits") && strstr(text, "EBB_MODEL_KV_BITS"));
    free(text);
}

/* model_kv_bits: accepted from every layer, looked up by exact name, and
 * every kind of malformed value refused with a message naming the key and
 * the offending entry. */
static void expect_kv_map_refused(const char *value, const char *needle1, const char *needle2) {
    char json[8192];
    snprintf(json, sizeof json, "{\"model_kv_bits\": \"%s\"}", value);
    expect_refused(json, "key 'model_kv_bits'", needle1);
    if (needle2) CHECK_MSG(strstr(err, needle2), "'%s' not in: %s", needle2, err);
    /* The environment and the flag go through the same check. */
    struct ebb_config c;
    config_defaults(&c);
    clear_env();
    setenv("EBB_MODEL_KV_BITS", value, 1);
    CHECK_MSG(config_apply_env(&c, err, sizeof err) == -1, "EBB_MODEL_KV_BITS=%s accepted", value);
    CHECK_MSG(strstr(err, "EBB_MODEL_KV_BITS") && strstr(err, needle1), "%s", err);
    clear_env();
    CHECK(config_apply_flag(&c, "--model-kv-bits", "keep=16", err, sizeof err) == 0);
    CHECK_MSG(config_apply_flag(&c, "--model-kv-bits", value, err, sizeof err) == -1, "--model-kv-bits %s accepted",
              value);
    CHECK_MSG(strstr(err, "--model-kv-bits") && strstr(err, needle1), "%s", err);
    CHECK(!strcmp(c.model_kv_bits, "keep=16")); /* a refused value leaves the old one */
}

static void test_model_kv_bits(void) {
    struct ebb_config c;
    /* No override: every model gets the global kv_bits. */
    config_defaults(&c);
    CHECK(config_kv_bits_for(&c, "SmolLM2-135M-Instruct.Q4_1") == 32);
    CHECK(config_apply_flag(&c, "--kv-bits", "16", err, sizeof err) == 0);
    CHECK(config_kv_bits_for(&c, "anything") == 16);

    /* From the file, beside a global value of 8. */
    config_defaults(&c);
    CHECK_MSG(config_load_text(&c, "{\"kv_bits\": 8, \"model_kv_bits\": \"SmolLM2-135M-Instruct.w4a4=4,other=16\"}",
                               "m.json", err, sizeof err) == 0, "%s", err);
    CHECK(config_source_of(&c, "model_kv_bits") == CONFIG_FROM_FILE);
    CHECK(config_kv_bits_for(&c, "SmolLM2-135M-Instruct.w4a4") == 4);
    CHECK(config_kv_bits_for(&c, "other") == 16);
    CHECK(config_kv_bits_for(&c, "SmolLM2-135M-Instruct.Q4_1") == 8); /* not listed: the global */
    CHECK(config_kv_bits_for(&c, "othe") == 8);                        /* names match exactly ... */
    CHECK(config_kv_bits_for(&c, "other2") == 8);
    CHECK(config_kv_bits_for(&c, "Other") == 8);                       /* ... case included */
    CHECK(config_kv_bits_for(&c, "") == 8);

    /* From the environment, over the file. */
    clear_env();
    setenv("EBB_MODEL_KV_BITS", "a=8", 1);
    CHECK_MSG(config_apply_env(&c, err, sizeof err) == 0, "%s", err);
    clear_env();
    CHECK(config_source_of(&c, "model_kv_bits") == CONFIG_FROM_ENV);
    CHECK(config_kv_bits_for(&c, "a") == 8 && config_kv_bits_for(&c, "other") == 8);
    CHECK(config_apply_flag(&c, "--kv-bits", "32", err, sizeof err) == 0);
    CHECK(config_kv_bits_for(&c, "a") == 8 && config_kv_bits_for(&c, "b") == 32);

    /* From a flag, with blanks around entries, names and widths, all four widths. */
    CHECK_MSG(config_apply_flag(&c, "--model-kv-bits", " m32=32, m16 = 16 ,m8=8,\tm4=4", err, sizeof err) == 0,
              "%s", err);
    CHECK(config_source_of(&c, "model_kv_bits") == CONFIG_FROM_FLAG);
    CHECK(config_kv_bits_for(&c, "m32") == 32 && config_kv_bits_for(&c, "m16") == 16);
    CHECK(config_kv_bits_for(&c, "m8") == 8 && config_kv_bits_for(&c, "m4") == 4);
    CHECK(config_kv_bits_for(&c, "a") == 32); /* the environment's map was replaced, not merged */
    /* Empty again means no overrides. */
    CHECK(config_apply_flag(&c, "--model-kv-bits", "", err, sizeof err) == 0);
    CHECK(config_kv_bits_for(&c, "m4") == 32);

    /* Names at the catalog's limit: 128 bytes is fine, 129 is not. */
    char value[4200], name[200];
    memset(name, 'n', 128);
    name[128] = 0;
    snprintf(value, sizeof value, "%s=4", name);
    CHECK_MSG(config_apply_flag(&c, "--model-kv-bits", value, err, sizeof err) == 0, "%s", err);
    CHECK(config_kv_bits_for(&c, name) == 4);
    snprintf(value, sizeof value, "n%s=4", name);
    expect_kv_map_refused(value, "129 bytes long; at most 128", NULL);

    /* Each kind of bad entry, named in the message. */
    expect_kv_map_refused("foo=5", "'foo=5': bits must be one of 32, 16, 8, 4", NULL);
    expect_kv_map_refused("a=4,foo=5", "'foo=5': bits must be one of 32, 16, 8, 4", NULL);
    expect_kv_map_refused("foo=", "'foo=': bits must be one of", NULL);
    expect_kv_map_refused("foo=4x", "'foo=4x': bits must be", NULL);
    expect_kv_map_refused("foo=-4", "'foo=-4': bits must be", NULL);
    expect_kv_map_refused("foo=4=4", "'foo=4=4': bits must be", NULL);
    expect_kv_map_refused("foo", "'foo': expected NAME=BITS", NULL);
    expect_kv_map_refused("a=4,b", "'b': expected NAME=BITS", NULL);
    expect_kv_map_refused("=4", "'=4': model name is empty", NULL);
    expect_kv_map_refused("a b=4", "'a b=4': model name 'a b' is invalid", NULL);
    expect_kv_map_refused("a/b=4", "'a/b=4': model name", "invalid");
    expect_kv_map_refused("a=4,,b=8", "empty entry", NULL);
    expect_kv_map_refused("a=4,", "empty entry", NULL);
    expect_kv_map_refused(",a=4", "empty entry", NULL);
    expect_kv_map_refused(" ", "empty entry", NULL);
    expect_kv_map_refused("a=4,b=8,a=16", "'a=16': model 'a' is given more than once", NULL);
    expect_kv_map_refused("a=4, a =4", "model 'a' is given more than once", NULL);

    /* Wrong JSON type, and a value longer than the field. */
    expect_refused("{\"model_kv_bits\": 4}", "'model_kv_bits'", "expected a string of comma-separated NAME=BITS");
    expect_refused("{\"model_kv_bits\": {\"a\": 4}}", "'model_kv_bits'", "an object");
    char *big = malloc(6000);
    if (!big) { CHECK(0); return; }
    int n = snprintf(big, 6000, "{\"model_kv_bits\": \"");
    for (int i = 0; n < 5900; i++) n += snprintf(big + n, (size_t)(6000 - n), "%smodel%d=4", i ? "," : "", i);
    snprintf(big + n, (size_t)(6000 - n), "\"}");
    expect_refused(big, "'model_kv_bits'", "at most 4095 allowed");
    free(big);

    /* The dump carries the map and loads back to the same lookups. */
    config_defaults(&c);
    CHECK(config_apply_flag(&c, "--model-kv-bits", "x=4,y=16", err, sizeof err) == 0);
    char path[512];
    snprintf(path, sizeof path, "%s/kvdump.json", tmpdir);
    FILE *f = fopen(path, "w");
    if (!f) { CHECK(0); return; }
    config_dump(&c, f, 0);
    fclose(f);
    struct ebb_config d;
    config_defaults(&d);
    CHECK_MSG(config_load_file(&d, path, err, sizeof err) == 0, "%s", err);
    CHECK(config_kv_bits_for(&d, "x") == 4 && config_kv_bits_for(&d, "y") == 16 && config_kv_bits_for(&d, "z") == 32);
}

/* docs/operations.md documents every setting by key, env var and flag. */
static void test_docs_cover_every_setting(void) {
    const char *src = getenv("EBB_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/docs/operations.md", src ? src : ".");
    char *doc = read_text(path);
    CHECK_MSG(doc != NULL, "cannot read %s", path);
    if (!doc) return;
    for (int i = 0; config_key(i); i++) {
        const char *key = config_key(i);
        char env[64], flag[64], quoted[72];
        int n = snprintf(env, sizeof env, "EBB_"), m = snprintf(flag, sizeof flag, "--");
        for (const char *k = key; *k; k++) {
            env[n++] = (char)(*k >= 'a' && *k <= 'z' ? *k - 32 : *k);
            flag[m++] = *k == '_' ? '-' : *k;
        }
        env[n] = flag[m] = 0;
        snprintf(quoted, sizeof quoted, "`%s`", key);
        CHECK_MSG(strstr(doc, quoted), "%s does not document %s", path, quoted);
        CHECK_MSG(strstr(doc, env), "%s does not mention %s", path, env);
        CHECK_MSG(strstr(doc, flag), "%s does not mention %s", path, flag);
    }
    CHECK(strstr(doc, "EBB_CONFIG") && strstr(doc, "XDG_DATA_HOME") && strstr(doc, "/var/lib/ebb/catalog.db"));
    free(doc);
}

/* The boolean setting insecure_no_auth: JSON true/false (or its words), a
 * flag that may stand alone, and clear refusals of anything else. The
 * access settings' secrets never show in the dump. */
static void test_access_settings(void) {
    struct ebb_config c;
    config_defaults(&c);
    CHECK(c.insecure_no_auth == 0 && !*c.api_keys && !*c.api_key_file && !*c.cors_origins);
    CHECK_MSG(config_load_text(&c, "{\"insecure_no_auth\": true}", "b.json", err, sizeof err) == 0, "%s", err);
    CHECK(c.insecure_no_auth == 1);
    CHECK(config_load_text(&c, "{\"insecure_no_auth\": \"false\"}", "b.json", err, sizeof err) == 0 &&
          c.insecure_no_auth == 0);
    CHECK(config_load_text(&c, "{\"insecure_no_auth\": 1}", "b.json", err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "insecure_no_auth"), "%s", err);
    CHECK(config_load_text(&c, "{\"insecure_no_auth\": \"yes\"}", "b.json", err, sizeof err) == -1);
    /* Alone (no value, or the next argument is not true/false): 2, nothing taken. */
    CHECK(config_apply_flag(&c, "--insecure-no-auth", NULL, err, sizeof err) == 2 && c.insecure_no_auth == 1);
    CHECK(config_apply_flag(&c, "--insecure-no-auth", "false", err, sizeof err) == 0 && c.insecure_no_auth == 0);
    CHECK(config_apply_flag(&c, "--insecure-no-auth", "--port", err, sizeof err) == 2 && c.insecure_no_auth == 1);
    setenv("EBB_INSECURE_NO_AUTH", "maybe", 1);
    CHECK(config_apply_env(&c, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "EBB_INSECURE_NO_AUTH"), "%s", err);
    clear_env();
    char big[5000];
    memset(big, 'k', sizeof big - 1);
    big[sizeof big - 1] = 0;
    CHECK(config_apply_flag(&c, "--api-keys", big, err, sizeof err) == -1);
    CHECK(config_apply_flag(&c, "--api-keys", "secret-one", err, sizeof err) == 0);
    char *dump = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&dump, &len);
    if (f) {
        config_dump(&c, f, 0);
        fclose(f);
        CHECK(dump && !strstr(dump, "secret-one") && strstr(dump, "\"api_keys\": \"(set)\""));
        CHECK(dump && strstr(dump, "\"insecure_no_auth\": true"));
    }
    free(dump);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/ebb-test-config-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    clear_env();
    test_defaults();
    test_shipped_file();
    test_file_override();
    test_env_override();
    test_flag_override();
    test_precedence();
    test_bad_files();
    test_malformed_json();
    test_dump();
    test_model_kv_bits();
    test_access_settings();
    test_docs_cover_every_setting();
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return check_report("test_config");
}
