/* The CUDA entry points of kernels/backend.h in a build without CUDA (no
 * toolkit found at configure time, or -DEBB_CUDA=OFF): each refuses with the
 * reason, so `ebb devices` and a request for a GPU say why instead of failing
 * to link or pretending. */
#include <stdio.h>

#include "kernels/backend.h"

static const char NO_CUDA[] =
    "this ebb was built without CUDA (the toolkit was not found when it was configured, or -DEBB_CUDA=OFF)";

const struct ebb_backend *ebb_backend_cuda(int index, char *why, size_t why_len)
{
    (void)index;
    if (why && why_len) snprintf(why, why_len, "%s", NO_CUDA);
    return NULL;
}

int ebb_cuda_devices(struct ebb_device_info *out, int max, char *why, size_t why_len)
{
    (void)out, (void)max;
    if (why && why_len) snprintf(why, why_len, "%s", NO_CUDA);
    return -1;
}
