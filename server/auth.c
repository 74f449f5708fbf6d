/* API keys, the loopback rule and CORS; the design is in auth.h. */
#include "server/auth.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "server/config.h"
#include "server/daemon.h"
#include "storage/error.h"

#define KEY_FILE_MAX_BYTES (1 << 20)

bool secret_equal(const char *presented, const char *secret) {
    const size_t lp = strlen(presented), ls = strlen(secret);
    unsigned char diff = (unsigned char)(lp != ls);
    for (size_t i = 0; i < lp; i++) diff |= (unsigned char)(presented[i] ^ secret[ls ? i % ls : 0]);
    return diff == 0;
}

/* A key is 1..AUTH_MAX_KEY_BYTES bytes of visible ASCII other than ',' (the
 * list separator): what fits an Authorization header unquoted. */
static const char *key_problem(const char *s, size_t n) {
    if (n == 0) return "is empty";
    if (n > AUTH_MAX_KEY_BYTES) return "is longer than 256 bytes";
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e || s[i] == ',') return "has a character other than visible ASCII (or a ',')";
    return NULL;
}

static int add_key(struct api_keys *k, const char *s, size_t n) {
    if (k->n == AUTH_MAX_KEYS) return -1;
    char **keys = realloc(k->keys, (size_t)(k->n + 1) * sizeof *keys);
    if (!keys) return -1;
    k->keys = keys;
    if (!(k->keys[k->n] = strndup(s, n))) return -1;
    k->n++;
    return 0;
}

static void trim(const char **s, size_t *n) {
    while (*n && isspace((unsigned char)**s)) (*s)++, (*n)--;
    while (*n && isspace((unsigned char)(*s)[*n - 1])) (*n)--;
}

static int load_list(struct api_keys *k, const char *list, char *err, size_t errlen) {
    const char *rest = list;
    size_t all = strlen(list);
    trim(&rest, &all);
    if (!all) return 0;   /* no keys */
    for (int index = 1;; index++) {
        const char *comma = strchr(list, ',');
        size_t n = comma ? (size_t)(comma - list) : strlen(list);
        const char *s = list;
        trim(&s, &n);
        const char *why = key_problem(s, n);
        if (why) {
            errf(err, errlen, "api_keys: key %d (counting from 1) %s", index, why);
            return -1;
        }
        if (add_key(k, s, n)) {
            errf(err, errlen, "api_keys: more than %d keys, or out of memory", AUTH_MAX_KEYS);
            return -1;
        }
        if (!comma) return 0;
        list = comma + 1;
    }
}

static int load_file(struct api_keys *k, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        errf(err, errlen, "api_key_file %s: %s", path, strerror(errno));
        return -1;
    }
    char *text = malloc(KEY_FILE_MAX_BYTES + 1);
    size_t len = text ? fread(text, 1, KEY_FILE_MAX_BYTES + 1, f) : 0;
    const int read_error = ferror(f);
    fclose(f);
    if (!text || read_error || len > KEY_FILE_MAX_BYTES) {
        errf(err, errlen, "api_key_file %s: %s", path,
             !text ? "out of memory" : read_error ? "cannot be read" : "is larger than 1 MiB");
        free(text);
        return -1;
    }
    text[len] = '\0';
    int rc = 0, line = 0, before = k->n;
    for (char *p = text; p && *p && !rc; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        line++;
        char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        const char *s = p;
        trim(&s, &n);
        if (n && *s != '#') {
            const char *why = memchr(s, '\0', n) ? "has a NUL byte" : key_problem(s, n);
            if (why) {
                errf(err, errlen, "api_key_file %s: line %d: the key %s", path, line, why);
                rc = -1;
            } else if (add_key(k, s, n)) {
                errf(err, errlen, "api_key_file %s: more than %d keys, or out of memory", path, AUTH_MAX_KEYS);
                rc = -1;
            }
        }
    }
    if (!rc && k->n == before) {
        errf(err, errlen, "api_key_file %s: holds no key (one per line; '#' starts a comment)", path);
        rc = -1;
    }
    free(text);
    return rc;
}

int auth_load(struct api_keys *k, const struct ebb_config *cfg, char *err, size_t errlen) {
    memset(k, 0, sizeof *k);
    if (load_list(k, cfg->api_keys, err, errlen) || (*cfg->api_key_file && load_file(k, cfg->api_key_file, err, errlen))) {
        auth_free(k);
        return -1;
    }
    return 0;
}

void auth_free(struct api_keys *k) {
    for (int i = 0; i < k->n; i++) {
        /* Keys are secrets: not left behind in freed memory. */
        volatile char *s = k->keys[i];
        for (size_t j = 0; s[j]; j++) s[j] = 0;
        free(k->keys[i]);
    }
    free(k->keys);
    memset(k, 0, sizeof *k);
}

bool auth_is_loopback(const char *host) {
    if (!strcasecmp(host, "localhost")) return true;
    unsigned char a[16];
    if (inet_pton(AF_INET, host, a) == 1) return a[0] == 127;
    if (inet_pton(AF_INET6, host, a) == 1) {
        static const unsigned char v6_loopback[16] = {[15] = 1};
        return !memcmp(a, v6_loopback, 16);
    }
    return false;
}

int auth_check_listen(const struct ebb_config *cfg, int n_keys, char *err, size_t errlen) {
    if (n_keys > 0 || cfg->insecure_no_auth || auth_is_loopback(cfg->host)) return 0;
    errf(err, errlen,
         "refusing to serve the API on %s without API keys: anyone who can reach the address could use it. "
         "Set api_keys or api_key_file (EBB_API_KEYS, --api-keys), listen on 127.0.0.1, or pass "
         "--insecure-no-auth (insecure_no_auth) to serve it open on purpose",
         cfg->host);
    return -1;
}

bool auth_api_key_ok(struct daemon *d, struct http_request *req) {
    if (d->api_keys.n == 0) return true;
    const char *auth = http_header(req, "Authorization");
    /* The scheme is case-insensitive (RFC 9110 §11.1); spaces may follow it. */
    const char *token = auth && !strncasecmp(auth, "Bearer ", 7) ? auth + 7 : NULL;
    while (token && *token == ' ') token++;
    bool match = false;
    for (int i = 0; token && i < d->api_keys.n; i++) match |= secret_equal(token, d->api_keys.keys[i]);
    if (match) return true;
    http_add_header(req, "WWW-Authenticate", "Bearer");
    http_respond_error_code(req, 401, "invalid_request_error", "invalid_api_key",
                            token ? "Incorrect API key provided."
                                  : "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                            NULL);
    return false;
}

/* The request's Origin, when cors_origins allows it; else NULL. */
static const char *allowed_origin(const struct daemon *d, const struct http_request *req) {
    const char *origin = http_header(req, "Origin");
    if (!origin || !*d->cfg.cors_origins) return NULL;
    const size_t lo = strlen(origin);
    for (const char *p = d->cfg.cors_origins; *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        const char *s = p;
        trim(&s, &n);
        if ((n == 1 && *s == '*') || (n == lo && !strncasecmp(s, origin, n))) return origin;
        if (!comma) break;
        p = comma + 1;
    }
    return NULL;
}

void cors_add_headers(struct daemon *d, struct http_request *req) {
    const char *origin = allowed_origin(d, req);
    if (!origin) return;
    http_add_header(req, "Access-Control-Allow-Origin", origin);
    http_add_header(req, "Vary", "Origin");
    http_add_header(req, "Access-Control-Expose-Headers", "X-Request-Id, Retry-After");
}

/* Access-Control-Request-Headers as the browser sent it, if it is a plain
 * list of header names; else the headers the API uses. */
static const char *allowed_request_headers(const struct http_request *req) {
    const char *h = http_header(req, "Access-Control-Request-Headers");
    if (!h || !*h || strlen(h) > 1024) return "Authorization, Content-Type";
    for (const char *p = h; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("-_, ", *p)) return "Authorization, Content-Type";
    return h;
}

bool cors_preflight(struct daemon *d, struct http_request *req) {
    if (strcmp(req->method, "OPTIONS") || !http_header(req, "Origin") ||
        !http_header(req, "Access-Control-Request-Method"))
        return false;
    if (!allowed_origin(d, req)) {
        char msg[256];
        snprintf(msg, sizeof msg, "origin '%.120s' may not call this API from a browser: add it to cors_origins "
                 "(EBB_CORS_ORIGINS)", http_header(req, "Origin"));
        http_respond_error(req, 403, "permission_error", msg, NULL);
        return true;
    }
    cors_add_headers(d, req);
    http_add_header(req, "Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS");
    http_add_header(req, "Access-Control-Allow-Headers", allowed_request_headers(req));
    http_add_header(req, "Access-Control-Max-Age", "600");
    http_respond(req, 204, NULL, NULL, 0);
    return true;
}
