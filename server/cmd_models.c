/* `ebb models list|add|rm`: the catalog from the command line.
 *
 * It opens the same catalog the daemon uses (found the same way: --catalog,
 * else EBB_CATALOG, else the config file's "catalog", else the XDG default),
 * and it is safe to run while the daemon runs: the catalog is in WAL mode and
 * each change is one short transaction. The daemon reads the catalog when it
 * answers, so a model added here appears in its /v1/models.
 *
 * Exit status: 0 done, 1 the action failed (duplicate name, unknown model,
 * corrupt file, unusable catalog), 2 bad usage.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/catalog_json.h"
#include "server/cli.h"
#include "server/config.h"
#include "storage/catalog.h"

static void models_usage(FILE *out) {
    fprintf(out,
            "usage: ebb models [--catalog PATH] [--config FILE] COMMAND\n"
            "  list [--json]            the registered models (JSON: with their variants)\n"
            "  add PATH [--name NAME]   register a GGUF file (validated first); NAME defaults\n"
            "                           to the file name without .gguf\n"
            "  rm NAME                  remove a model and its variants from the catalog\n"
            "                           (files on disk are left alone)\n"
            "options:\n"
            "  --catalog PATH   catalog database (default: EBB_CATALOG, else the config's\n"
            "                   \"catalog\", else $XDG_DATA_HOME/ebb/catalog.db, i.e.\n"
            "                   ~/.local/share/ebb/catalog.db)\n"
            "  --config FILE    read the catalog location from this configuration\n"
            "                   (default: $EBB_CONFIG if set)\n");
}

static int models_list(struct catalog *cat, int as_json) {
    struct catalog_model *ms;
    size_t n;
    char err[512];
    if (catalog_model_list(cat, &ms, &n, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb models: %s\n", err);
        return 1;
    }
    int status = 0;
    if (as_json) {
        json_t *arr = json_array();
        for (size_t i = 0; arr && i < n && !status; i++) {
            json_t *o = catalog_model_json(cat, &ms[i], err, sizeof err);
            if (!o) {
                fprintf(stderr, "ebb models: %s\n", err);
                status = 1;
            } else {
                json_array_append_new(arr, o);
            }
        }
        char *text = arr && !status ? json_dumps(arr, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        if (text) printf("%s\n", text);
        else if (!status) { fprintf(stderr, "ebb models: out of memory\n"); status = 1; }
        free(text);
        json_decref(arr);
    } else if (n == 0) {
        fprintf(stderr, "(no models in the catalog; add one with: ebb models add PATH)\n");
    } else {
        printf("%-32s %-10s %12s %10s  %s\n", "NAME", "ARCH", "PARAMS", "MIB", "PATH");
        for (size_t i = 0; i < n; i++)
            printf("%-32s %-10s %12lld %10.1f  %s\n", ms[i].name, ms[i].architecture, (long long)ms[i].params,
                   ms[i].source_bytes / 1048576.0, ms[i].source_path);
    }
    catalog_model_list_free(ms, n);
    return status;
}

static int models_add(struct catalog *cat, const char *path, const char *name) {
    struct catalog_model m;
    char err[1024];
    if (catalog_model_add(cat, path, name, &m, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb models add: %s\n", err);
        return 1;
    }
    printf("added %s (%s, %lld parameters) from %s\n", m.name, m.architecture, (long long)m.params, m.source_path);
    catalog_model_free(&m);
    return 0;
}

static int models_rm(struct catalog *cat, const char *name) {
    char err[512];
    if (catalog_model_remove(cat, name, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb models rm: %s\n", err);
        return 1;
    }
    printf("removed %s\n", name);
    return 0;
}

int cmd_models(int argc, char **argv) {
    const char *catalog_flag = NULL, *config_path = NULL, *name = NULL;
    const char *positional[3];
    int n_pos = 0, as_json = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            models_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--catalog")) {
            if (!(catalog_flag = cli_value("models", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--config")) {
            if (!(config_path = cli_value("models", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--name")) {
            if (!(name = cli_value("models", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--json")) {
            as_json = 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "ebb models: unknown option '%s'\n", a);
            models_usage(stderr);
            return 2;
        } else if (n_pos < 3) {
            positional[n_pos++] = a;
        } else {
            fprintf(stderr, "ebb models: too many arguments\n");
            return 2;
        }
    }
    if (n_pos == 0) {
        fprintf(stderr, "ebb models: which command? list, add or rm\n");
        models_usage(stderr);
        return 2;
    }
    const char *action = positional[0];
    int want_args = !strcmp(action, "list") ? 0 : !strcmp(action, "add") || !strcmp(action, "rm") ? 1 : -1;
    if (want_args < 0) {
        fprintf(stderr, "ebb models: unknown command '%s' (list, add or rm)\n", action);
        return 2;
    }
    if (n_pos - 1 != want_args) {
        fprintf(stderr, "ebb models %s: expected %s\n", action,
                want_args ? (strcmp(action, "add") ? "one NAME" : "one PATH") : "no arguments");
        return 2;
    }
    if ((name && strcmp(action, "add")) || (as_json && strcmp(action, "list"))) {
        fprintf(stderr, "ebb models %s: %s does not apply here\n", action, name ? "--name" : "--json");
        return 2;
    }

    /* The catalog location: flag, else the configuration layers. */
    char err[1024], path[4096];
    if (config_resolve_catalog(config_path, catalog_flag, path, sizeof path, err, sizeof err)) {
        fprintf(stderr, "ebb models: %s\n", err);
        return 1;
    }

    struct catalog *cat;
    if (catalog_open(path, &cat, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb models: %s\n", err);
        return 1;
    }
    int rc = !strcmp(action, "list") ? models_list(cat, as_json)
           : !strcmp(action, "add")  ? models_add(cat, positional[1], name)
                                     : models_rm(cat, positional[1]);
    catalog_close(cat);
    return rc;
}
