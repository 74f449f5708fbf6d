/* `ebb devices`: what this machine and this build can compute on.
 *
 *   ebb devices [--json]
 *
 * The CPU path the kernels chose (and EBB_CPU_PATH can force) with the
 * online cores, then every CUDA device with its compute capability and
 * memory, or the reason there is none: a build without CUDA, no driver, a
 * driver too old for this build's runtime. Operators run it before naming a
 * GPU in the config; tools/gpu-check.sh prints it first. Seeing no GPU is an
 * answer, not an error: the exit status is 0 either way.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/backend.h"
#include "server/cli.h"

#define MAX_DEVICES 16

static void devices_usage(FILE *out)
{
    fprintf(out,
            "usage: ebb devices [--json]\n"
            "  the CPU path in use and the CUDA devices this build can use (or why none)\n"
            "  --json   one JSON object: {\"cpu\": {...}, \"cuda\": {\"devices\": [...], \"unavailable\": ...}}\n");
}

static json_t *device_json(int index, const struct ebb_device_info *d)
{
    char cc[16];
    snprintf(cc, sizeof cc, "%d.%d", d->cc_major, d->cc_minor);
    return json_pack("{s:i, s:s, s:s, s:i, s:I, s:I}", "index", index, "name", d->name, "compute_capability", cc,
                     "multiprocessors", d->multiprocessors, "total_bytes", (json_int_t)d->total_bytes,
                     "free_bytes", (json_int_t)d->free_bytes);
}

int cmd_devices(int argc, char **argv)
{
    int as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) as_json = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            devices_usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "ebb devices: unknown option '%s'\n", argv[i]);
            devices_usage(stderr);
            return 2;
        }
    }
    const struct ebb_backend *cpu = ebb_backend_cpu();
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    struct ebb_device_info dev[MAX_DEVICES];
    char why[256] = "";
    const int count = ebb_cuda_devices(dev, MAX_DEVICES, why, sizeof why);
    const int shown = count < MAX_DEVICES ? count : MAX_DEVICES;

    if (as_json) {
        json_t *list = json_array(), *cuda = json_object();
        for (int i = 0; i < shown; i++) json_array_append_new(list, device_json(i, &dev[i]));
        json_object_set_new(cuda, "devices", list);
        if (count < 0) json_object_set_new(cuda, "unavailable", json_string(why));
        json_t *root = json_pack("{s:{s:s, s:i}, s:o}", "cpu", "path", cpu->name, "cores", (int)cores, "cuda", cuda);
        char *text = root ? json_dumps(root, JSON_INDENT(2)) : NULL;
        if (text) puts(text);
        free(text);
        json_decref(root);
        return text ? 0 : 1;
    }
    printf("cpu: %s path, %ld cores\n", cpu->name, cores);
    if (count < 0) {
        printf("cuda: none: %s\n", why);
        return 0;
    }
    for (int i = 0; i < shown; i++)
        printf("cuda:%d: %s, compute %d.%d, %d multiprocessors, %.1f GiB (%.1f GiB free)\n", i, dev[i].name,
               dev[i].cc_major, dev[i].cc_minor, dev[i].multiprocessors, dev[i].total_bytes / 1073741824.0,
               dev[i].free_bytes / 1073741824.0);
    return 0;
}
