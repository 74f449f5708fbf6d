/* `ebb serve`: the command line of the HTTP daemon.
 *
 * Reads the configuration (defaults < file < EBB_* < flags) and
 * EBB_TEST_ROUTES (routes_debug.c), then hands over to daemon_run
 * (daemon.c), which owns start-up, the loop and shutdown. The pieces of the
 * daemon are listed in daemon.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/cli.h"
#include "server/daemon.h"
#include "server/log.h"

static void serve_usage(FILE *out) {
    fprintf(out, "usage: ebb serve [--config FILE] [options]\n"
                 "Runs the HTTP daemon. Every setting comes from, in increasing priority: its default,\n"
                 "the JSON config file (--config, else $EBB_CONFIG), EBB_<SETTING> variables, and flags:\n");
    config_flags_help(out);
    fprintf(out, "environment: EBB_TEST_ROUTES=1 enables POST /debug/echo and GET /debug/stream\n"
                 "see docs/operations.md\n");
}

static int parse_flags(struct daemon *d, int argc, char **argv) {
    const char *config_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { serve_usage(stdout); return 1; }
        if (!strcmp(argv[i], "--config")) {
            if (!(config_path = cli_value("serve", argc, argv, &i))) return 2;
        }
    }
    char err[512];
    if (config_load(&d->cfg, config_path, err, sizeof err)) {
        fprintf(stderr, "ebb serve: %s\n", err);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config")) { i++; continue; }
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = config_apply_flag(&d->cfg, argv[i], value, err, sizeof err);
        if (rc == 2) continue;   /* a boolean flag given alone: no value taken */
        if (rc) {
            fprintf(stderr, "ebb serve: %s\n", err);
            if (rc == 1) serve_usage(stderr);
            return 2;
        }
        i++;
    }
    enum log_level lvl;
    if (!log_parse_level(config_log_level_name(d->cfg.log_level), &lvl)) log_set_level(lvl);
    return 0;
}

int cmd_serve(int argc, char **argv) {
    static struct daemon d;   /* static: signal and async handles point into it */
    memset(&d, 0, sizeof d);
    int rc = parse_flags(&d, argc, argv);
    if (rc) return rc == 1 ? 0 : rc;
    const char *tr = getenv("EBB_TEST_ROUTES");
    d.test_routes = tr && !strcmp(tr, "1");
    return daemon_run(&d);
}
