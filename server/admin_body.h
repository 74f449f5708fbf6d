/* The request bodies of the admin routes (routes_admin.c), parsed without
 * the transport or the daemon, so the fuzz target (tests/fuzz/fuzz_json.c)
 * runs exactly what the routes run.
 *
 * A body is one JSON object with only the route's keys (a misspelt key must
 * not be silently ignored); on anything wrong the parser returns -1 with a
 * message for a 400 and the offending field ("" when none). */
#ifndef EBB_SERVER_ADMIN_BODY_H
#define EBB_SERVER_ADMIN_BODY_H
#include <stddef.h>
#include <stdint.h>

struct admin_body_error {
    char message[320];
    char param[128];    /* the field (an unknown key is cut to fit) */
};

/* The memory budget's policy (server/memory.c). */
struct memory_policy {
    int automatic;            /* "auto": the budget follows the free memory */
    uint64_t bytes;           /* fixed: the budget, 0 = none */
    uint64_t reserve_bytes;   /* auto: memory left to the rest of the machine */
};

/* PUT /admin/memory: {"memory_budget_bytes": N} or {"budget": N}, N a
 * non-negative integer (0 removes the budget), or {"budget": "auto"} with
 * an optional "reserve_bytes": N (default_reserve when absent). Types
 * only: whether the machine can give the bytes is the route's to check.
 * *key: the budget's key as given ("budget" or "memory_budget_bytes"). */
int admin_parse_memory(const char *body, size_t len, uint64_t default_reserve, struct memory_policy *p,
                       const char **key, struct admin_body_error *e);

/* POST /admin/models: {"path": "...", "name": "..."}. path is a non-empty
 * string that fits path_cap with its NUL (never truncated: a shortened path
 * names another file); name, optional ("" when absent), a valid catalog
 * name (catalog_name_check), which always fits a name_cap of
 * CATALOG_NAME_MAX + 1. */
int admin_parse_model_add(const char *body, size_t len, char *path, size_t path_cap, char *name, size_t name_cap,
                          struct admin_body_error *e);
#endif
