/* The memory governor's arithmetic (engine/governor.h), against the policy
 * its header states, written out here as numbers; and its reading of free
 * memory from files laid out like /proc and /sys/fs/cgroup in a temporary
 * directory (meminfo only, cgroup v2 with limits at several depths, a
 * cgroup without limits, unreadable files). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "engine/governor.h"

#define MB (1u << 20)

static void test_minimum_and_split(void) {
    /* A stack model and a plain one. */
    const struct governor_model m[2] = {
        {.fixed_bytes = 30 * MB, .stack_min_bytes = 15 * MB, .stack_full_bytes = 74 * MB, .kv_min_bytes = 3 * MB},
        {.fixed_bytes = 90 * MB, .kv_min_bytes = 2 * MB, .kv_held_bytes = 10 * MB},
    };
    /* Fixed weights, one level, and the larger of held and smallest KV. */
    CHECK(governor_minimum(m, 2) == (30 + 15 + 3) * MB + (90 + 10) * MB);
    CHECK(governor_minimum(m, 0) == 0);
    uint64_t share[2];
    governor_split(governor_minimum(m, 2), m, 2, share);
    CHECK(share[0] == 48 * MB && share[1] == 100 * MB);
    governor_split(governor_minimum(m, 2) + 40 * MB, m, 2, share);   /* the rest in equal parts */
    CHECK(share[0] == 68 * MB && share[1] == 120 * MB);
    governor_split(0, m, 2, share);                                   /* no budget: unlimited */
    CHECK(share[0] == 0 && share[1] == 0);
}

static void test_inside_a_share(void) {
    const struct governor_model s = {.fixed_bytes = 30 * MB, .stack_min_bytes = 15 * MB, .stack_full_bytes = 74 * MB,
                                     .kv_min_bytes = 3 * MB};
    /* KV may take all but the fixed weights and one level. */
    CHECK(governor_kv_budget(&s, 100 * MB) == 55 * MB);
    CHECK(governor_kv_budget(&s, 0) == 0);
    CHECK(governor_kv_budget(&s, 45 * MB) == 1);   /* nothing left: one byte, never "unlimited" */
    /* The stack keeps what the KV leaves, between one level and all. */
    CHECK(governor_stack_target(&s, 100 * MB, 0) == 70 * MB);
    CHECK(governor_stack_target(&s, 100 * MB, 20 * MB) == 50 * MB);
    CHECK(governor_stack_target(&s, 100 * MB, 60 * MB) == 15 * MB);
    CHECK(governor_stack_target(&s, 200 * MB, 0) == 74 * MB);
    CHECK(governor_stack_target(&s, 0, 50 * MB) == 74 * MB);
    const struct governor_model plain = {.fixed_bytes = 90 * MB, .kv_min_bytes = 2 * MB};
    CHECK(governor_stack_target(&plain, 100 * MB, 0) == 0);
    CHECK(governor_kv_budget(&plain, 100 * MB) == 10 * MB);
    /* The ladder: the file's own weights while they fit beside the KV, with
     * a margin of 1/16 of them to come back; no budget: always the file. */
    const struct governor_model lad = {.rung_bytes = {96 * MB}, .n_rungs = 1, .fixed_bytes = 30 * MB,
                                       .stack_min_bytes = 15 * MB, .stack_full_bytes = 74 * MB,
                                       .kv_min_bytes = 3 * MB};
    CHECK(governor_rung(&lad, 0, 50 * MB, 1) == 0);
    CHECK(governor_rung(&lad, 100 * MB, 4 * MB, 0) == 0);      /* 96 + 4 = 100: fits */
    CHECK(governor_rung(&lad, 100 * MB, 5 * MB, 0) == 1);      /* one more MB of KV: the stack */
    CHECK(governor_rung(&lad, 100 * MB, 4 * MB, 1) == 1);      /* from the stack, 6 MB margin first */
    CHECK(governor_rung(&lad, 106 * MB, 4 * MB, 1) == 0);
    CHECK(governor_rung(&s, 0, 0, 0) == 0);                     /* no rung above a stack: its bottom */
    CHECK(governor_rung(&s, 50 * MB, 0, 0) == 0);
    CHECK(governor_minimum(&lad, 1) == 48 * MB);                /* the stack's least, not the file's */
    /* Three rungs (a file, two packed variants) over a stack: the largest
     * that fits; each step up takes its own margin. */
    const struct governor_model three = {.rung_bytes = {320 * MB, 96 * MB, 64 * MB}, .n_rungs = 3,
                                         .fixed_bytes = 30 * MB, .stack_min_bytes = 15 * MB,
                                         .stack_full_bytes = 74 * MB, .kv_min_bytes = 3 * MB};
    CHECK(governor_rung(&three, 0, 0, 3) == 0);
    CHECK(governor_rung(&three, 400 * MB, 10 * MB, 0) == 0);
    CHECK(governor_rung(&three, 200 * MB, 10 * MB, 0) == 1);   /* the file no longer fits: the larger variant */
    CHECK(governor_rung(&three, 100 * MB, 10 * MB, 1) == 2);
    CHECK(governor_rung(&three, 70 * MB, 10 * MB, 2) == 3);    /* the stack */
    CHECK(governor_rung(&three, 74 * MB, 10 * MB, 3) == 3);    /* 64 + 10 fits, but not with its 4 MB margin */
    CHECK(governor_rung(&three, 78 * MB, 10 * MB, 3) == 2);
    CHECK(governor_rung(&three, 111 * MB, 10 * MB, 2) == 2);   /* 96 + 10 + its 6 MB margin > 111: stays */
    CHECK(governor_rung(&three, 113 * MB, 10 * MB, 3) == 1);   /* two steps up at once when both fit */
    CHECK(governor_minimum(&three, 1) == 48 * MB);
    /* Packed variants without a stack: the smallest is the bottom. */
    const struct governor_model packed = {.rung_bytes = {320 * MB}, .n_rungs = 1, .fixed_bytes = 96 * MB,
                                          .kv_min_bytes = 3 * MB};
    CHECK(governor_minimum(&packed, 1) == 99 * MB);
    CHECK(governor_rung(&packed, 200 * MB, 0, 0) == 1);
    CHECK(governor_stack_target(&packed, 200 * MB, 0) == 0);
    /* auto: held plus free, less the reserve, never below zero. */
    CHECK(governor_auto_budget(100, 900, 200) == 800);
    CHECK(governor_auto_budget(100, 50, 200) == 0);
}

static char root[256];

static void put(const char *rel, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", root, rel);
    for (char *p = path + strlen(root) + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(path, 0755); *p = '/'; }
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void unput(const char *rel) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", root, rel);
    unlink(path);
}

static void test_free_memory(void) {
    snprintf(root, sizeof root, "/tmp/ebb-governor-XXXXXX");
    CHECK(mkdtemp(root) != NULL);
    uint64_t bytes = 0, total = 0;
    const char *source = NULL;
    char err[512];
    /* Nothing readable: an error naming what was looked for. */
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == -1 && strstr(err, "MemAvailable"));
    CHECK(governor_total_memory(root, &total) == -1);
    put("/proc/meminfo", "MemTotal:        2048000 kB\nMemFree:          100000 kB\nMemAvailable:    1024000 kB\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0);
    CHECK(bytes == 1024000ull * 1024 && !strcmp(source, "meminfo"));
    CHECK(governor_total_memory(root, &total) == 0 && total == 2048000ull * 1024);
    /* A cgroup v2 path with no limit anywhere: meminfo still rules. */
    put("/proc/self/cgroup", "0::/system.slice/ebb.service\n");
    put("/sys/fs/cgroup/system.slice/ebb.service/memory.max", "max\n");
    put("/sys/fs/cgroup/system.slice/ebb.service/memory.current", "5000000\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0 && !strcmp(source, "meminfo"));
    /* The service's limit: its headroom, and its limit as the total. */
    put("/sys/fs/cgroup/system.slice/ebb.service/memory.max", "104857600\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0);
    CHECK(bytes == 104857600 - 5000000 && !strcmp(source, "cgroup"));
    CHECK(governor_total_memory(root, &total) == 0 && total == 104857600);
    /* A tighter ancestor wins. */
    put("/sys/fs/cgroup/system.slice/memory.max", "60000000\n");
    put("/sys/fs/cgroup/system.slice/memory.current", "50000000\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0 && bytes == 10000000);
    CHECK(governor_total_memory(root, &total) == 0 && total == 60000000);
    /* Usage over the limit: no headroom, not a wrapped huge number. */
    put("/sys/fs/cgroup/system.slice/memory.current", "70000000\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0 && bytes == 0);
    /* A container: the process at its namespace's root. */
    put("/proc/self/cgroup", "0::/\n");
    put("/sys/fs/cgroup/memory.max", "300000000\n");
    put("/sys/fs/cgroup/memory.current", "100000000\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0 && bytes == 200000000);
    /* cgroup v1 only (no "0::" line): meminfo. */
    put("/proc/self/cgroup", "4:memory:/docker/abc\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == 0 && !strcmp(source, "meminfo"));
    /* A meminfo without MemAvailable (and no cgroup limit): an error. */
    put("/proc/meminfo", "MemTotal:        2048000 kB\n");
    CHECK(governor_free_memory(root, &bytes, &source, err, sizeof err) == -1);
    unput("/proc/meminfo");
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    CHECK(system(cmd) == 0);
}

int main(void) {
    test_minimum_and_split();
    test_inside_a_share();
    test_free_memory();
    /* The real machine answers too (whatever it has). */
    uint64_t bytes;
    const char *source;
    char err[512];
    CHECK(governor_free_memory("", &bytes, &source, err, sizeof err) == 0 && bytes > 0);
    return check_report("test_governor");
}
