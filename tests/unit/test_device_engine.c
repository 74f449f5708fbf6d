/* The engine on a device, without a GPU: the default model placed on the
 * emulated device (tests/unit/emulated_device.h: the scalar ops behind
 * pointers the host cannot touch) must give the scalar CPU path's logits
 * bit for bit -- prompt and decode, every KV precision, batched with other
 * sequences -- and its embeddings. Any place where the engine still reads
 * or writes a device buffer on the host faults here at once; any op it
 * calls in another order or on the wrong rows shows as a changed bit.
 * The GPU suite (tests/gpu) runs the same comparison on a real device.
 * Also: what model_place refuses, and that a device model takes no host
 * cache and its caches no compression. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "emulated_device.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"

struct side {
    struct model *m;
    struct model_run *run;
    struct kv_account account;
};

static int side_init(struct side *s, struct model *m, int kv_bits) {
    s->m = m;
    s->run = model_run_new(m, 2);
    if (!s->run || kv_account_init(&s->account, &m->cfg, kv_bits, 0)) return -1;
    s->account.be = m->be;
    return 0;
}

static void side_free(struct side *s) {
    model_run_free(s->run);
    kv_account_destroy(&s->account);
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* A prompt past two pages (so the quantized body, the window and the sinks
 * are all read), then greedy decoding: both sides' logits at every step. */
static void test_prompt_and_decode(struct model *ref, struct model *dev, const int32_t *prompt, int n_prompt,
                                   int kv_bits) {
    struct side a, b;
    CHECK(side_init(&a, ref, kv_bits) == 0 && side_init(&b, dev, kv_bits) == 0);
    const int V = ref->cfg.n_vocab, n_ctx = n_prompt + 24;
    struct kv_cache ka, kb;
    CHECK(kv_cache_init(&ka, &ref->cfg, n_ctx, &a.account) == KV_OK);
    CHECK(kv_cache_init(&kb, &dev->cfg, n_ctx, &b.account) == KV_OK);
    float *la = malloc((size_t)n_prompt * V * sizeof(float)), *lb = malloc((size_t)n_prompt * V * sizeof(float));
    /* every prompt row, so each position's attention is compared */
    CHECK(model_forward(a.run, &ka, prompt, n_prompt, la, 1) == 0);
    CHECK(model_forward(b.run, &kb, prompt, n_prompt, lb, 1) == 0);
    CHECK_MSG(memcmp(la, lb, (size_t)n_prompt * V * sizeof(float)) == 0, "KV%d: prompt logits differ", kv_bits);
    int32_t tok = argmax(la + (size_t)(n_prompt - 1) * V, V);
    int same = 1;
    for (int step = 0; step < 12; step++) {
        CHECK(model_forward(a.run, &ka, &tok, 1, la, 0) == 0);
        CHECK(model_forward(b.run, &kb, &tok, 1, lb, 0) == 0);
        same &= memcmp(la, lb, (size_t)V * sizeof(float)) == 0;
        tok = argmax(la, V);
    }
    CHECK_MSG(same, "KV%d: decode logits differ", kv_bits);
    /* speculative decoding's rollback, then the same token again */
    CHECK(kv_cache_truncate(&ka, ka.n_past - 1) == 0 && kv_cache_truncate(&kb, kb.n_past - 1) == 0);
    CHECK(model_forward(a.run, &ka, &tok, 1, la, 0) == 0 && model_forward(b.run, &kb, &tok, 1, lb, 0) == 0);
    CHECK_MSG(memcmp(la, lb, (size_t)V * sizeof(float)) == 0, "KV%d: after a rollback", kv_bits);
    /* a device cache holds no compression */
    CHECK(kv_cache_observe(&kb, 0, 8, dev->cfg.n_head * dev->cfg.head_dim) == -1);
    kv_cache_free(&ka);
    kv_cache_free(&kb);
    free(la);
    free(lb);
    side_free(&a);
    side_free(&b);
}

/* Three sequences in one pass on the device (a prompt chunk, a decode
 * token, an embedding) against each alone on the CPU. */
static void test_batch(struct model *ref, struct model *dev, const int32_t *prompt, int n_prompt) {
    struct side a, b;
    CHECK(side_init(&a, ref, 4) == 0 && side_init(&b, dev, 4) == 0);
    const int V = ref->cfg.n_vocab, E = ref->cfg.n_embd;
    struct kv_cache alone[3], batched[3];
    for (int i = 0; i < 3; i++) {
        CHECK(kv_cache_init(&alone[i], &ref->cfg, n_prompt + 8, &a.account) == KV_OK);
        CHECK(kv_cache_init(&batched[i], &dev->cfg, n_prompt + 8, &b.account) == KV_OK);
    }
    float *want = malloc((size_t)V * sizeof(float)), *got[2];
    got[0] = malloc((size_t)V * sizeof(float));
    got[1] = malloc((size_t)V * sizeof(float));
    float *emb_want = calloc((size_t)E, sizeof(float)), *emb_got = calloc((size_t)E, sizeof(float));
    /* sequence 1 has decoded a prompt already; it now appends one token */
    CHECK(model_forward(a.run, &alone[1], prompt, 40, want, 0) == 0);
    CHECK(model_forward(b.run, &batched[1], prompt, 40, got[1], 0) == 0);
    struct batch_seq seqs[3] = {
        {&batched[0], prompt, 30, got[0], 0, NULL},
        {&batched[1], prompt + 40, 1, got[1], 0, NULL},
        {&batched[2], prompt + 5, 12, NULL, 0, emb_got},
    };
    CHECK(model_forward_batch(b.run, seqs, 3) == 0);
    CHECK(model_forward(a.run, &alone[0], prompt, 30, want, 0) == 0);
    CHECK_MSG(memcmp(want, got[0], (size_t)V * sizeof(float)) == 0, "batched prompt chunk differs");
    CHECK(model_forward(a.run, &alone[1], prompt + 40, 1, want, 0) == 0);
    CHECK_MSG(memcmp(want, got[1], (size_t)V * sizeof(float)) == 0, "batched decode token differs");
    struct batch_seq e = {&alone[2], prompt + 5, 12, NULL, 0, emb_want};
    CHECK(model_forward_batch(a.run, &e, 1) == 0);
    CHECK_MSG(memcmp(emb_want, emb_got, (size_t)E * sizeof(float)) == 0, "embedding sums differ");
    /* a host cache is not the device model's */
    struct kv_account host;
    CHECK(kv_account_init(&host, &dev->cfg, 4, 0) == 0);
    struct kv_cache hk;
    CHECK(kv_cache_init(&hk, &dev->cfg, 16, &host) == KV_OK);
    CHECK(model_forward(b.run, &hk, prompt, 4, want, 0) == -1);
    kv_cache_free(&hk);
    kv_account_destroy(&host);
    for (int i = 0; i < 3; i++) {
        kv_cache_free(&alone[i]);
        kv_cache_free(&batched[i]);
    }
    free(want), free(got[0]), free(got[1]), free(emb_want), free(emb_got);
    side_free(&a);
    side_free(&b);
}

static void test_refusals(struct model *dev, const char *path) {
    char why[256] = "";
    CHECK(model_place(dev, dev->be, why, sizeof why) == -1);
    CHECK_MSG(strstr(why, "already placed") != NULL, "%s", why);
    struct model m;
    char err[256];
    if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) return;
    const struct ebb_backend *before = m.be;
    CHECK(model_place(&m, ebb_backend_cpu(), why, sizeof why) == -1 && m.be == before);
    CHECK_MSG(strstr(why, "host memory") != NULL, "%s", why);
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
    char why[256] = "";
    CHECK_MSG(model_place(&dev, emu, why, sizeof why) == 0, "%s", why);
    CHECK(dev.be == emu && dev.placed != NULL);

    /* past two pages: the first is then read from the quantized body */
    const char *text = "The committee met on Tuesday to discuss the budget for next year. After a long debate "
                       "about roads, schools and the new library, they agreed to raise the parks fund by ten "
                       "percent and to review the transport plan in the spring, when the new figures are in. "
                       "The mayor thanked the volunteers who had counted traffic at every crossing in town, "
                       "and asked the council to publish the counts, the costs of each option and a map of "
                       "the proposed bus lanes before the public meeting in March. Several residents wrote "
                       "to say that the bridge on Mill Street needs repairs first, since lorries now take a "
                       "long detour through the market square on Saturdays, which slows everyone down.";
    int32_t *prompt = NULL;
    const int n_prompt = tokenizer_encode(ref.tok, text, strlen(text), 0, &prompt);
    CHECK_MSG(n_prompt > 2 * KV_PAGE_TOKENS, "%d prompt tokens", n_prompt);
    const int kv_bits[] = {32, 16, 8, 4};
    for (size_t i = 0; i < sizeof kv_bits / sizeof *kv_bits; i++)
        test_prompt_and_decode(&ref, &dev, prompt, n_prompt, kv_bits[i]);
    test_batch(&ref, &dev, prompt, n_prompt);
    test_refusals(&dev, path);
    free(prompt);
    model_free(&dev);
    model_free(&ref);
    return check_report("test_device_engine");
}
