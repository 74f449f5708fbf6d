/* Who may call the API, and from which browser origins.
 *
 * API keys. The model-serving routes (/v1/..., /tokenize, /detokenize)
 * take "Authorization: Bearer KEY" when keys are configured: api_keys (a
 * comma-separated list: config, EBB_API_KEYS or --api-keys) and api_key_file
 * (one key per line, '#' comments), both read once at start. Every key is
 * compared in full against the one presented, in time that depends only on
 * the presented key's length, so neither a key's bytes nor which key matched
 * leak through timing. A missing or wrong key is 401 with OpenAI's error
 * shape and code "invalid_api_key" (the official clients raise
 * AuthenticationError on it). /health, /ready and /metrics stay open for
 * probes and scrapers; the admin routes keep their own token.
 *
 * Keys are off by default, which is safe only on loopback: the daemon
 * refuses to start on any other address with no keys unless the operator
 * says insecure_no_auth (--insecure-no-auth), so exposing an open API is
 * always a decision someone wrote down. An address counts as loopback when
 * it is "localhost" or a literal in 127.0.0.0/8 or ::1; a host name that
 * resolves to loopback does not count (it could resolve differently later).
 *
 * CORS. cors_origins lists the origins a browser may call the API from
 * (exact "scheme://host[:port]" matches, or "*" for any). For an allowed
 * Origin every response carries Access-Control-Allow-Origin (the origin
 * itself, with Vary: Origin) and exposes X-Request-Id; a preflight (OPTIONS
 * with Access-Control-Request-Method) is answered 204 with the methods and
 * the request headers allowed for ten minutes. Preflights are answered
 * before the key check, since browsers never send credentials on them. An
 * origin not listed gets no CORS headers (the browser then blocks the
 * response) and its preflight a 403 saying which setting to change.
 *
 * Loop thread only, except auth_load, which runs before the loop.
 */
#ifndef EBB_SERVER_AUTH_H
#define EBB_SERVER_AUTH_H
#include <stdbool.h>
#include <stddef.h>

struct daemon;
struct ebb_config;
struct http_request;

#define AUTH_MAX_KEYS 1024
#define AUTH_MAX_KEY_BYTES 256

struct api_keys {
    char **keys;   /* n NUL-terminated keys, each visible ASCII without ',' */
    int n;
};

/* Reads api_keys and api_key_file: 0, or -1 with the reason (the key's
 * position, never its text) in err. */
int auth_load(struct api_keys *k, const struct ebb_config *cfg, char *err, size_t errlen);
void auth_free(struct api_keys *k);

/* Start-up rule: 0, or -1 when cfg->host is not loopback and there are no
 * keys and insecure_no_auth is not set (err says how to fix it). */
int auth_check_listen(const struct ebb_config *cfg, int n_keys, char *err, size_t errlen);
bool auth_is_loopback(const char *host);

/* True when the request may go on; otherwise it has been answered 401. */
bool auth_api_key_ok(struct daemon *d, struct http_request *req);

/* Adds the CORS headers an allowed Origin gets (nothing otherwise). Call
 * before the request is answered. */
void cors_add_headers(struct daemon *d, struct http_request *req);
/* True when req is a CORS preflight, which has then been answered. */
bool cors_preflight(struct daemon *d, struct http_request *req);

/* Constant-time comparison of a presented secret with a configured one (in
 * time that depends on the presented one's length only). */
bool secret_equal(const char *presented, const char *secret);
#endif
