/* The memory governor's arithmetic (engine/governor.h says the policy). */
#include "engine/governor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t model_minimum(const struct governor_model *m) {
    const size_t kv = m->kv_held_bytes > m->kv_min_bytes ? m->kv_held_bytes : m->kv_min_bytes;
    return m->fixed_bytes + m->stack_min_bytes + kv;
}

uint64_t governor_minimum(const struct governor_model *m, int n) {
    uint64_t total = 0;
    for (int i = 0; i < n; i++) total += model_minimum(&m[i]);
    return total;
}

void governor_split(uint64_t budget, const struct governor_model *m, int n, uint64_t *share) {
    const uint64_t least = governor_minimum(m, n);
    const uint64_t part = budget > least && n > 0 ? (budget - least) / (uint64_t)n : 0;
    for (int i = 0; i < n; i++) share[i] = budget ? model_minimum(&m[i]) + part : 0;
}

size_t governor_kv_budget(const struct governor_model *m, uint64_t share) {
    if (!share) return 0;
    const uint64_t kept = (uint64_t)m->fixed_bytes + m->stack_min_bytes;
    /* 0 would mean unlimited to the KV account: a share that holds nothing
     * for the KV cache holds one byte, which admits nothing. */
    return share > kept + 1 ? (size_t)(share - kept) : 1;
}

size_t governor_stack_target(const struct governor_model *m, uint64_t share, size_t kv_held) {
    if (!m->stack_full_bytes) return 0;
    if (!share) return m->stack_full_bytes;
    const uint64_t taken = (uint64_t)m->fixed_bytes + kv_held;
    uint64_t left = share > taken ? share - taken : 0;
    if (left < m->stack_min_bytes) left = m->stack_min_bytes;
    return left < m->stack_full_bytes ? (size_t)left : m->stack_full_bytes;
}

int governor_rung(const struct governor_model *m, uint64_t share, size_t kv_held, int current) {
    if (!share) return 0;
    for (int i = 0; i < m->n_rungs; i++) {
        const uint64_t margin = i < current ? m->rung_bytes[i] / 16 : 0;
        if ((uint64_t)m->rung_bytes[i] + kv_held + margin <= share) return i;
    }
    return m->n_rungs;
}

uint64_t governor_auto_budget(uint64_t held_bytes, uint64_t free_bytes, uint64_t reserve_bytes) {
    const uint64_t could = held_bytes + free_bytes;
    return could > reserve_bytes ? could - reserve_bytes : 0;
}

/* ------------------------------------------------------ free memory */

/* The whole of a small file, NUL-terminated, in buf; 0, or -1. */
static int read_small(const char *root, const char *path, char *buf, size_t cap) {
    char full[4096];
    if (snprintf(full, sizeof full, "%s%s", root, path) >= (int)sizeof full) return -1;
    FILE *f = fopen(full, "r");
    if (!f) return -1;
    const size_t n = fread(buf, 1, cap - 1, f);
    const int bad = ferror(f);
    fclose(f);
    if (bad) return -1;
    buf[n] = 0;
    return 0;
}

/* A cgroup file holding one number (or "max": no limit, *v = UINT64_MAX). */
static int read_cgroup_value(const char *root, const char *dir, const char *name, uint64_t *v) {
    char path[4096], buf[64];
    if (snprintf(path, sizeof path, "/sys/fs/cgroup%s/%s", dir, name) >= (int)sizeof path) return -1;
    if (read_small(root, path, buf, sizeof buf)) return -1;
    if (!strncmp(buf, "max", 3)) { *v = UINT64_MAX; return 0; }
    char *end;
    const unsigned long long x = strtoull(buf, &end, 10);
    if (end == buf) return -1;
    *v = (uint64_t)x;
    return 0;
}

/* What the cgroup v2 limits on the process allow: the least memory.max,
 * and the least headroom (memory.max minus memory.current), among its
 * cgroup and that cgroup's ancestors (systemd's MemoryMax= sets the limit
 * on the service, a container runtime on the container's root). 0, or -1:
 * no cgroup v2, or no limit anywhere on the path. */
static int cgroup_limits(const char *root, uint64_t *limit, uint64_t *headroom) {
    char buf[4096], dir[2048];
    if (read_small(root, "/proc/self/cgroup", buf, sizeof buf)) return -1;
    /* cgroup v2's one line: "0::/path". */
    char *line = strstr(buf, "0::");
    if (!line || (line != buf && line[-1] != '\n')) return -1;
    const size_t n = strcspn(line + 3, "\n");
    if (n >= sizeof dir) return -1;
    memcpy(dir, line + 3, n);
    dir[n] = 0;
    if (n == 1 && dir[0] == '/') dir[0] = 0;   /* the root itself */
    *limit = *headroom = UINT64_MAX;
    for (;;) {
        uint64_t max, cur;
        if (!read_cgroup_value(root, dir, "memory.max", &max) && max != UINT64_MAX) {
            if (max < *limit) *limit = max;
            const uint64_t room = read_cgroup_value(root, dir, "memory.current", &cur) ? max : max > cur ? max - cur : 0;
            if (room < *headroom) *headroom = room;
        }
        char *slash = strrchr(dir, '/');
        if (!slash) break;
        *slash = 0;
    }
    return *limit == UINT64_MAX ? -1 : 0;
}

/* A meminfo field ("MemAvailable", "MemTotal"), in bytes. */
static int meminfo_field(const char *root, const char *field, uint64_t *bytes) {
    char buf[8192], key[64];
    if (read_small(root, "/proc/meminfo", buf, sizeof buf)) return -1;
    snprintf(key, sizeof key, "%s:", field);
    const char *p = strstr(buf, key);
    if (!p || (p != buf && p[-1] != '\n')) return -1;
    unsigned long long kib;
    if (sscanf(p + strlen(key), " %llu kB", &kib) != 1) return -1;
    *bytes = (uint64_t)kib * 1024;
    return 0;
}

int governor_total_memory(const char *root, uint64_t *bytes) {
    uint64_t total = UINT64_MAX, limit;
    if (meminfo_field(root, "MemTotal", &total)) total = UINT64_MAX;
    uint64_t headroom;
    if (!cgroup_limits(root, &limit, &headroom) && limit < total) total = limit;
    if (total == UINT64_MAX) return -1;
    *bytes = total;
    return 0;
}

int governor_free_memory(const char *root, uint64_t *bytes, const char **source, char *err, size_t errlen) {
    uint64_t cg, limit, mi;
    const int have_cg = cgroup_limits(root, &limit, &cg) == 0, have_mi = meminfo_field(root, "MemAvailable", &mi) == 0;
    if (!have_cg && !have_mi) {
        snprintf(err, errlen, "cannot read the free memory: neither %s/proc/meminfo's MemAvailable nor a cgroup v2 "
                 "memory.max is readable", root);
        return -1;
    }
    if (have_cg && (!have_mi || cg <= mi)) { *bytes = cg; *source = "cgroup"; }
    else { *bytes = mi; *source = "meminfo"; }
    return 0;
}
