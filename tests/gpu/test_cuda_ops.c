/* The GPU suite (ctest label `gpu`): the CUDA backend's every op against the
 * scalar CPU path, on the device, with tests/unit/opcompare.h's cases --
 * quantized products, quantizers, Hadamard, KV rows and BitStack bit for
 * bit; the f32 product, vector ops and attention within float tolerance
 * (over a long cache, which the kernel splits over the sequence, of the
 * largest output).
 * Then its failures: memory the device cannot give is an answer (NULL, the
 * reason in words) after which the device still works, and a request for a
 * device that does not exist is refused with the count.
 *
 * Without a device (every CI machine so far) it prints "skipped: no CUDA
 * device" with the driver's reason and exits 77, which ctest reports as
 * skipped, never as passed. tools/gpu-check.sh runs it on a GPU machine.
 */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "kernels/backend.h"
#include "kernels/cuda/hostdev.h"
#include "opcompare.h"

static void test_failures(const struct ebb_backend *cuda, int count)
{
    char why[256] = "";
    CHECK(ebb_backend_cuda(count, why, sizeof why) == NULL);
    CHECK_MSG(strstr(why, "CUDA device") != NULL, "refusal of device %d: \"%s\"", count, why);

    const size_t huge = (size_t)1 << 52;                  /* 4 PiB: no device has it */
    void *p = cuda->memory->alloc(huge);
    CHECK_MSG(p == NULL, "alloc of 4 PiB succeeded");
    CHECK_MSG(strstr(cuda->memory->error(), "cudaMalloc") != NULL, "its reason: %s", cuda->memory->error());
    /* the device still works: a small op, read back */
    float x[64], y[64];
    for (int i = 0; i < 64; i++) x[i] = (float)i;
    float *dx = cuda->memory->alloc(sizeof x);
    CHECK(dx != NULL);
    if (!dx) return;
    CHECK(cuda->memory->upload(dx, x, sizeof x) == 0);
    cuda->add_f32(dx, dx, 64);
    CHECK_MSG(cuda->memory->download(y, dx, sizeof y) == 0, "after a failed alloc: %s", cuda->memory->error());
    for (int i = 0; i < 64; i++) CHECK(y[i] == 2.0f * (float)i);
    cuda->memory->release(dx);
}

int main(void)
{
    struct ebb_device_info dev[16];
    char why[256] = "";
    const int count = ebb_cuda_devices(dev, 16, why, sizeof why);
    if (count <= 0) {
        printf("test_cuda_ops: skipped: no CUDA device (%s)\n", why);
        return CHECK_SKIPPED;
    }
    for (int i = 0; i < count && i < 16; i++)
        printf("device %d: %s, compute %d.%d, %d SMs, %.1f GiB (%.1f free)\n", i, dev[i].name, dev[i].cc_major,
               dev[i].cc_minor, dev[i].multiprocessors, dev[i].total_bytes / 1073741824.0,
               dev[i].free_bytes / 1073741824.0);
    const struct ebb_backend *cuda = ebb_backend_cuda(0, why, sizeof why);
    CHECK_MSG(cuda != NULL, "a device is listed but the backend refuses it: %s", why);
    if (!cuda) return check_report("test_cuda_ops");
    oc_attend_split_from = EBB_HD_ATTEND_SPLIT_FROM;   /* the kernel's split over long caches */
    const int uncompared = opcompare_all(ebb_backend_cpu_named("scalar"), cuda);
    CHECK_MSG(uncompared == 0, "%d entries of the CUDA table are missing", uncompared);
    test_failures(cuda, count);
    return check_report("test_cuda_ops");
}
