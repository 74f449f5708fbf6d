/* The GPU suite's whole-model check (ctest label `gpu`): a model placed on
 * the CUDA device against the same file on the scalar CPU path, with
 * tests/unit/engine_compare.h's passes -- every prompt position's logits
 * and a greedy decode at KV 32, 16, 8 and 4, a rollback, a batch of three
 * sequences with an embedding. The quantized products, RoPE, KV rows and
 * attention ops are the scalar path's bits on the GPU; RMSNorm, softmax and
 * SwiGLU may sum and exponentiate in their own order, and a last-bit
 * difference can flip an activation's 8-bit code, which the layers after
 * it amplify: the CPU's own SIMD path differs from its scalar path that
 * way too. So the same passes also run on the fastest CPU path, and the
 * GPU must stay as close to the scalar path as that path does: its largest
 * logit difference at most twice the CPU path's (plus 1e-3), and its
 * greedy choices differing at no more rows than the CPU path's plus two.
 * Both are printed.
 *
 *   test_cuda_engine [MODEL.gguf]    (default: the default model)
 *
 * Without a device it says "skipped: no CUDA device" and exits 77.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "engine_compare.h"
#include "kernels/backend.h"

int main(int argc, char **argv)
{
    struct ebb_device_info info[1];
    char why[256] = "", path[1024], err[512];
    if (ebb_cuda_devices(info, 1, why, sizeof why) <= 0) {
        printf("test_cuda_engine: skipped: no CUDA device (%s)\n", why);
        return CHECK_SKIPPED;
    }
    if (argc > 1) snprintf(path, sizeof path, "%s", argv[1]);
    else if (check_model_path(path, sizeof path)) return check_report_skipped("test_cuda_engine", path);
    struct model ref, dev, simd;
    if (model_load(&ref, path, MODEL_WEIGHTS_NATIVE, err, sizeof err) ||
        model_load(&dev, path, MODEL_WEIGHTS_NATIVE, err, sizeof err) ||
        model_load(&simd, path, MODEL_WEIGHTS_NATIVE, err, sizeof err)) {
        fprintf(stderr, "test_cuda_engine: %s\n", err);
        return 1;
    }
    ref.be = ebb_backend_cpu_named("scalar");
    CHECK_MSG(model_use_device(&dev, "cuda:0", why, sizeof why) == 0, "placing %s: %s", path, why);
    if (!dev.placed) return check_report("test_cuda_engine");
    printf("model %s: %zu bytes of weights on %s; CPU path beside it: %s\n", path, dev.weight_bytes, info[0].name,
           simd.be->name);

    int32_t *prompt = NULL;
    const int n_prompt = tokenizer_encode(ref.tok, ec_text, strlen(ec_text), 0, &prompt);
    CHECK(n_prompt > 2 * KV_PAGE_TOKENS);
    const int kv_bits[] = {32, 16, 8, 4};
    for (int i = 0; i < 5 && n_prompt > 0; i++) {
        struct ec_stats gpu, cpu;
        ec_stats_init(&gpu);
        ec_stats_init(&cpu);
        const char *what = i < 4 ? "prompt and decode" : "batch of three";
        if (i < 4) {
            ec_prompt_and_decode(&ref, &dev, prompt, n_prompt, kv_bits[i], 32, &gpu);
            ec_prompt_and_decode(&ref, &simd, prompt, n_prompt, kv_bits[i], 32, &cpu);
        } else {
            ec_batch(&ref, &dev, prompt, n_prompt, &gpu);
            ec_batch(&ref, &simd, prompt, n_prompt, &cpu);
        }
        const struct ec_stats *both[2] = {&gpu, &cpu};
        for (int k = 0; k < 2; k++)
            printf("%s, KV%d, %s vs scalar: %ld rows, %ld not bit-identical, max |diff| %.3g (%.3g of the row's "
                   "largest), %ld greedy choices differ\n", what, i < 4 ? kv_bits[i] : 4, k ? simd.be->name : "cuda",
                   both[k]->rows, both[k]->rows_differing, both[k]->max_abs, both[k]->max_rel,
                   both[k]->argmax_differ);
        CHECK_MSG(gpu.max_abs <= 2 * cpu.max_abs + 1e-3, "%s: the GPU's logits are further from the scalar path "
                  "(%.3g) than the CPU path's (%.3g)", what, gpu.max_abs, cpu.max_abs);
        CHECK_MSG(gpu.argmax_differ <= cpu.argmax_differ + 2, "%s: %ld greedy choices differ (CPU path: %ld)", what,
                  gpu.argmax_differ, cpu.argmax_differ);
    }
    free(prompt);
    model_free(&simd);
    model_free(&dev);
    model_free(&ref);
    return check_report("test_cuda_engine");
}
