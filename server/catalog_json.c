/* A catalog model as JSON: the one shape `ebb models list --json` and
 * GET /admin/models share (the admin route adds whether and how the model is
 * being served).
 *
 * It lives apart from both users so that the command line and the daemon
 * describe a model the same way without one depending on the other's file.
 * Reading the variants is one catalog query; the caller chooses the thread
 * (the CLI's main thread, the daemon's loop: a short read in WAL mode).
 */
#include "server/catalog_json.h"

#include <stdio.h>
#include <string.h>

#include "storage/catalog.h"

static json_t *variant_json(const struct catalog_variant *v) {
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "kind", json_string(v->kind));
    json_object_set_new(o, "path", json_string(v->path));
    json_object_set_new(o, "bytes", json_integer(v->bytes));
    json_object_set_new(o, "bits_per_weight", json_real(v->bits_per_weight));
    json_object_set_new(o, "perplexity", v->has_perplexity ? json_real(v->perplexity) : json_null());
    json_object_set_new(o, "ppl_text", v->ppl_text ? json_string(v->ppl_text) : json_null());
    json_object_set_new(o, "checksum", v->checksum ? json_string(v->checksum) : json_null());
    json_object_set_new(o, "created_at", json_integer(v->created_at));
    return o;
}

/* A stack variant's directory in brief: its blocks and the quality the
 * packer measured along it, so an operator can pick a budget before
 * serving. */
static int add_stack_json(struct catalog *cat, const struct catalog_variant *v, json_t *o, char *err, size_t errlen) {
    struct catalog_block *b;
    size_t n;
    if (catalog_variant_blocks(cat, v->id, &b, &n, err, errlen) != CATALOG_OK) return -1;
    json_t *points = json_array();
    for (size_t i = 0; i < n; i++)
        if (b[i].has_perplexity)
            json_array_append_new(points, json_pack("{s:I, s:f}", "bytes", (json_int_t)b[i].cumulative_bytes,
                                                    "perplexity", b[i].perplexity));
    json_object_set_new(o, "stack", json_pack("{s:I, s:I, s:o, s:o}", "blocks", (json_int_t)n, "bytes",
                                              (json_int_t)(n ? b[n - 1].cumulative_bytes : 0), "checkpoints", points,
                                              "checkpoint_text", v->checkpoint_text ? json_string(v->checkpoint_text)
                                                                                    : json_null()));
    catalog_blocks_free(b, n);
    return 0;
}

json_t *catalog_model_json(struct catalog *cat, const struct catalog_model *m, char *err, size_t errlen) {
    struct catalog_variant *vs;
    size_t nv;
    if (catalog_variant_list(cat, m->id, &vs, &nv, err, errlen) != CATALOG_OK) return NULL;
    json_t *o = json_object(), *arr = json_array();
    if (!o || !arr) {
        json_decref(o);
        json_decref(arr);
        catalog_variant_list_free(vs, nv);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    json_object_set_new(o, "name", json_string(m->name));
    json_object_set_new(o, "architecture", json_string(m->architecture));
    json_object_set_new(o, "path", json_string(m->source_path));
    json_object_set_new(o, "bytes", json_integer(m->source_bytes));
    json_object_set_new(o, "params", json_integer(m->params));
    json_object_set_new(o, "created_at", json_integer(m->created_at));
    int bad = 0;
    for (size_t i = 0; i < nv && !bad; i++) {
        json_t *v = variant_json(&vs[i]);
        if (v && !strcmp(vs[i].kind, "bitstack")) bad = add_stack_json(cat, &vs[i], v, err, errlen);
        json_array_append_new(arr, v);
    }
    json_object_set_new(o, "variants", arr);
    catalog_variant_list_free(vs, nv);
    if (bad) {
        json_decref(o);
        return NULL;
    }
    return o;
}
