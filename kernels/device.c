/* Devices by name: "cpu" (the fastest CPU path) or "cuda[:N]" (the CUDA
 * backend on device N), as the configuration, the command line and the
 * daemon's memory reports spell them. One parser, so every place that
 * takes a device name accepts and refuses the same ones. */
#include <stdio.h>
#include <string.h>

#include "kernels/backend.h"

/* "cuda" or "cuda:N" (N a decimal index below 1024): 0 with the index. */
static int cuda_index(const char *device, int *index)
{
    if (strncmp(device, "cuda", 4) != 0) return -1;
    if (device[4] == 0) {
        *index = 0;
        return 0;
    }
    if (device[4] != ':' || device[5] < '0' || device[5] > '9') return -1;
    long v = 0;
    for (const char *p = device + 5; *p; p++) {
        if (*p < '0' || *p > '9' || (v = v * 10 + (*p - '0')) >= 1024) return -1;
    }
    *index = (int)v;
    return 0;
}

const char *ebb_device_name_problem(const char *device)
{
    int index;
    if (!strcmp(device, "cpu") || cuda_index(device, &index) == 0) return NULL;
    return "a device is cpu, cuda or cuda:N (N the device's index, from `ebb devices`)";
}

int ebb_device_is_host(const char *device)
{
    return !device || !*device || !strcmp(device, "cpu");
}

int ebb_device_memory(const char *device, struct ebb_device_info *info, char *why, size_t why_len)
{
    int index;
    if (cuda_index(device, &index)) {
        snprintf(why, why_len, "'%s' is not a GPU", device);
        return -1;
    }
    struct ebb_device_info all[16];
    const int n = ebb_cuda_devices(all, 16, why, why_len);
    if (n < 0) return -1;
    if (index >= n || index >= 16) {
        snprintf(why, why_len, "no CUDA device %d (this machine has %d)", index, n);
        return -1;
    }
    *info = all[index];
    return 0;
}

const struct ebb_backend *ebb_backend_for_device(const char *device, char *why, size_t why_len)
{
    int index;
    if (ebb_device_is_host(device)) return ebb_backend_cpu();
    if (cuda_index(device, &index) == 0) return ebb_backend_cuda(index, why, why_len);
    snprintf(why, why_len, "'%s': %s", device, ebb_device_name_problem(device));
    return NULL;
}
