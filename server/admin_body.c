/* Admin route bodies (server/admin_body.h). */
#include "server/admin_body.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "storage/catalog.h"

static int fail(struct admin_body_error *e, const char *param, const char *message) {
    snprintf(e->message, sizeof e->message, "%s", message);
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    return -1;
}

/* The body as a JSON object with only the allowed keys, or NULL with *e set. */
static json_t *body_object(const char *body, size_t len, const char *const *allowed, struct admin_body_error *e) {
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(e->message, sizeof e->message, "request body is not valid JSON: %s (line %d, column %d)", jerr.text,
                 jerr.line, jerr.column);
        e->param[0] = 0;
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        fail(e, NULL, "request body must be a JSON object");
        return NULL;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        int known = 0;
        for (int i = 0; allowed[i]; i++) known |= !strcmp(key, allowed[i]);
        if (!known) {
            snprintf(e->message, sizeof e->message, "unknown field '%.100s'", key);
            snprintf(e->param, sizeof e->param, "%s", key);
            json_decref(root);
            return NULL;
        }
    }
    return root;
}

static int non_negative(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

int admin_parse_memory(const char *body, size_t len, uint64_t default_reserve, struct memory_policy *p,
                       const char **key, struct admin_body_error *e) {
    static const char *const allowed[] = {"memory_budget_bytes", "budget", "reserve_bytes", NULL};
    json_t *root = body_object(body, len, allowed, e);
    if (!root) return -1;
    json_t *legacy = json_object_get(root, "memory_budget_bytes"), *budget = json_object_get(root, "budget");
    json_t *reserve = json_object_get(root, "reserve_bytes");
    const char *name = budget ? "budget" : "memory_budget_bytes";
    *key = name;
    json_t *v = budget ? budget : legacy;
    *p = (struct memory_policy){.reserve_bytes = default_reserve};
    int rc = 0;
    if (legacy && budget)
        rc = fail(e, "budget", "give either 'budget' or 'memory_budget_bytes', not both");
    else if (!v)
        rc = fail(e, "budget", "'budget' is required: a number of bytes, 0 for none, or \"auto\"");
    else if (budget && json_is_string(budget) && !strcmp(json_string_value(budget), "auto"))
        p->automatic = 1;
    else if (!non_negative(v, &p->bytes)) {
        char msg[160];
        snprintf(msg, sizeof msg, "'%s' must be a non-negative integer (0 removes the budget)%s", name,
                 budget ? " or \"auto\"" : "");
        rc = fail(e, name, msg);
    }
    if (rc == 0 && reserve && !p->automatic)
        rc = fail(e, "reserve_bytes", "'reserve_bytes' applies only with \"budget\": \"auto\"");
    else if (rc == 0 && reserve && !non_negative(reserve, &p->reserve_bytes))
        rc = fail(e, "reserve_bytes", "'reserve_bytes' must be a non-negative integer");
    json_decref(root);
    return rc;
}

int admin_parse_model_add(const char *body, size_t len, char *path, size_t path_cap, char *name, size_t name_cap,
                          struct admin_body_error *e) {
    static const char *const allowed[] = {"path", "name", NULL};
    json_t *root = body_object(body, len, allowed, e);
    if (!root) return -1;
    json_t *p = json_object_get(root, "path"), *n = json_object_get(root, "name");
    int rc = 0;
    char why[256];
    if (!json_is_string(p) || !*json_string_value(p)) rc = fail(e, "path", "'path' must be a non-empty string");
    else if (json_string_length(p) >= path_cap) rc = fail(e, "path", "'path' is too long");
    else if (n && !json_is_string(n)) rc = fail(e, "name", "'name' must be a string");
    else if (n && catalog_name_check(json_string_value(n), why, sizeof why)) rc = fail(e, "name", why);
    else if (n && json_string_length(n) >= name_cap) rc = fail(e, "name", "'name' is too long");
    if (rc == 0) {
        memcpy(path, json_string_value(p), json_string_length(p) + 1);
        if (n) memcpy(name, json_string_value(n), json_string_length(n) + 1);
        else name[0] = 0;
    }
    json_decref(root);
    return rc;
}
