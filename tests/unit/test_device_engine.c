/* The engine on a device, without a GPU: the default model placed on the
 * emulated device (tests/unit/emulated_device.h: the scalar ops behind
 * pointers the host cannot touch) must give the scalar CPU path's logits
 * bit for bit -- prompt and decode at every KV precision, a rollback,
 * batched with other sequences -- and its embeddings (engine_compare.h),
 * on the model's first 4 layers (the scalar path is slow).
 * Any place where the engine still reads or writes a device buffer on the
 * host faults here at once; any op called in another order or on the wrong
 * rows shows as a changed bit. tests/gpu/test_cuda_engine.c runs the same
 * comparison on a real device. Also: what model_place refuses, and that a
 * device model takes no host cache and its caches no compression. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "emulated_device.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "engine_compare.h"
#include "kernels/backend.h"

static void test_refusals(struct model *dev, const char *path, const int32_t *prompt) {
    char why[256] = "";
    CHECK(model_place(dev, dev->be, why, sizeof why) == -1);
    CHECK_MSG(strstr(why, "already placed") != NULL, "%s", why);
    /* a host cache is not the device model's; a device cache holds no compression */
    struct model_run *run = model_run_new(dev, 1);
    struct kv_account host, device;
    CHECK(run && kv_account_init(&host, &dev->cfg, 4, 0) == 0 && kv_account_init(&device, &dev->cfg, 4, 0) == 0);
    device.be = dev->be;
    struct kv_cache hk, dk;
    CHECK(kv_cache_init(&hk, &dev->cfg, 16, &host) == KV_OK && kv_cache_init(&dk, &dev->cfg, 16, &device) == KV_OK);
    float *logits = malloc((size_t)dev->cfg.n_vocab * sizeof(float));
    CHECK(model_forward(run, &hk, prompt, 4, logits, 0) == -1 && hk.n_past == 0);
    CHECK(model_forward(run, &dk, prompt, 4, logits, 0) == 0 && dk.n_past == 4);
    CHECK(kv_cache_observe(&dk, 0, 4, dev->cfg.n_head * dev->cfg.head_dim, 0) == -1);
    free(logits);
    kv_cache_free(&hk);
    kv_cache_free(&dk);
    kv_account_destroy(&host);
    kv_account_destroy(&device);
    model_run_free(run);
    /* a CPU table is not a device */
    struct model m;
    char err[256];
    if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) return;
    const struct ebb_backend *before = m.be;
    CHECK(model_place(&m, ebb_backend_cpu(), why, sizeof why) == -1 && m.be == before && !m.placed);
    CHECK_MSG(strstr(why, "host memory") != NULL, "%s", why);
    CHECK(model_use_device(&m, "cpu", why, sizeof why) == 0 && m.be == before);
    CHECK(model_use_device(&m, "gpu", why, sizeof why) == -1 && m.be == before);
    model_free(&m);
}

int main(void) {
    const struct ebb_backend *emu = emulated_device();
    if (!emu) {
        printf("test_device_engine: this machine's pointers use bit 62; the emulated device cannot run\n");
        return CHECK_SKIPPED;
    }
    char path[1024], err[512];
    if (check_model_path(path, sizeof path)) return check_report_skipped("test_device_engine", path);
    struct model ref, dev;
    if (model_load(&ref, path, MODEL_WEIGHTS_NATIVE, err, sizeof err) ||
        model_load(&dev, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        fprintf(stderr, "cannot load the default model: %s (run scripts/setup)\n", err);
        return 1;
    }
    ref.be = ebb_backend_cpu_named("scalar");   /* what the emulated device runs */
    model_keep_layers(&ref, 4);   /* every layer runs the same ops; the scalar path is slow */
    model_keep_layers(&dev, 4);
    char why[256] = "";
    CHECK_MSG(model_place(&dev, emu, why, sizeof why) == 0, "%s", why);
    CHECK(dev.be == emu && dev.placed != NULL);

    int32_t *prompt = NULL;
    const int n_prompt = tokenizer_encode(ref.tok, ec_text, strlen(ec_text), 0, &prompt);
    CHECK_MSG(n_prompt > 2 * KV_PAGE_TOKENS, "%d prompt tokens", n_prompt);
    const int kv_bits[] = {32, 16, 8, 4};
    for (size_t i = 0; i < sizeof kv_bits / sizeof *kv_bits; i++) {
        struct ec_stats st;
        ec_stats_init(&st);
        ec_prompt_and_decode(&ref, &dev, prompt, n_prompt, kv_bits[i], 12, &st);
        CHECK_MSG(st.rows > n_prompt && st.rows_differing == 0, "KV%d: %ld of %ld rows differ (max %g)", kv_bits[i],
                  st.rows_differing, st.rows, st.max_abs);
    }
    struct ec_stats st;
    ec_stats_init(&st);
    ec_batch(&ref, &dev, prompt, n_prompt, &st);
    CHECK_MSG(st.rows == 3 && st.rows_differing == 0, "batched: %ld of %ld rows differ", st.rows_differing, st.rows);
    test_refusals(&dev, path, prompt);
    free(prompt);
    model_free(&dev);
    model_free(&ref);
    return check_report("test_device_engine");
}
