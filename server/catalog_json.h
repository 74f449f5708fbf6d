/* A catalog model and its variants as JSON; see catalog_json.c. */
#ifndef EBB_SERVER_CATALOG_JSON_H
#define EBB_SERVER_CATALOG_JSON_H
#include <jansson.h>
#include <stddef.h>

struct catalog;
struct catalog_model;

/* {"name", "architecture", "path", "bytes", "params", "created_at",
 *  "variants": [{"kind", "path", "bytes", "bits_per_weight", "perplexity",
 *  "ppl_text", "checksum", "created_at"}]}, a "bitstack" variant with
 *  "stack": {"blocks", "bytes", "checkpoints": [{"bytes", "perplexity"}],
 *  "checkpoint_text"} (what the checkpoints scored, or null)
 *  from its block directory: a new reference, or NULL with
 * err ("out of memory", or the catalog's error reading the variants). */
json_t *catalog_model_json(struct catalog *cat, const struct catalog_model *m, char *err, size_t errlen);
#endif
