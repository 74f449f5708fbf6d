/* The daemon's memory budget: its policy (none, a fixed number of bytes, or
 * "auto"), how it is saved across restarts, and the timer that follows the
 * machine's free memory in "auto".
 *
 * "auto" makes the budget what the daemon holds now plus what the machine
 * (or the container: cgroup v2) could still give it, less a reserve the
 * operator leaves to everything else; engine/governor.c reads the free
 * memory, or, where models compute on a GPU (config `device`), the device
 * reports its own. It is re-read every AUTO_INTERVAL_MS, and a new budget is applied
 * only when it moves by more than AUTO_HYSTERESIS of itself: each change
 * refits stacks and re-splits KV budgets, and memory readings wobble by a
 * few pages all the time. A reading below what the served models need
 * (served_memory_minimum) is held at that minimum, with a warning: nothing
 * running is ended for memory that another process took; the kernel's
 * reclaim and the reserve are the margin.
 *
 * The policy is one catalog setting, "memory_budget_bytes": the number for
 * a fixed budget, "auto:RESERVE" for auto, so a change is one write that
 * lands whole or not at all.
 */
#include <inttypes.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/governor.h"
#include "kernels/backend.h"
#include "server/daemon.h"
#include "server/log.h"
#include "storage/catalog.h"

#define AUTO_INTERVAL_MS 2000
#define AUTO_HYSTERESIS 0.01
#define AUTO_PREFIX "auto:"

int memory_policy_parse(const char *text, struct memory_policy *p) {
    const int automatic = !strncmp(text, AUTO_PREFIX, strlen(AUTO_PREFIX));
    const char *num = automatic ? text + strlen(AUTO_PREFIX) : text;
    if (*num < '0' || *num > '9') return -1;
    char *end;
    const unsigned long long v = strtoull(num, &end, 10);
    if (*end) return -1;
    *p = (struct memory_policy){.automatic = automatic, .bytes = automatic ? 0 : (uint64_t)v,
                                .reserve_bytes = automatic ? (uint64_t)v : 0};
    return 0;
}

void memory_policy_format(const struct memory_policy *p, char *buf, size_t cap) {
    if (p->automatic) snprintf(buf, cap, AUTO_PREFIX "%" PRIu64, p->reserve_bytes);
    else snprintf(buf, cap, "%" PRIu64, p->bytes);
}

uint64_t memory_process_rss(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long pages_total, pages_resident;
    const int ok = f && fscanf(f, "%llu %llu", &pages_total, &pages_resident) == 2;
    if (f) fclose(f);
    return ok ? (uint64_t)pages_resident * (uint64_t)sysconf(_SC_PAGESIZE) : 0;
}

/* Weights plus KV pages held: what the budget bounds, as the daemon holds
 * it now. */
static uint64_t held_bytes(struct daemon *d) {
    uint64_t held = served_weight_bytes(d);
    for (struct served_model *sm = d->models; sm; sm = sm->next)
        if (sm->state == SERVED_READY) {
            struct sched_stats st;
            sched_get_stats(sm->sched, &st);
            held += st.kv_allocated_bytes;
        }
    return held;
}

/* The "auto" budget now (never below the minimum; *clamped says whether it
 * was held there). 0, or -1 with err when the free memory cannot be read. */
static int auto_budget(struct daemon *d, uint64_t *budget, int *clamped, char *err, size_t errlen) {
    uint64_t free_bytes;
    const char *source = "cuda";
    /* Models on a GPU hold their weights and KV there: its free memory is
     * what an automatic budget follows. */
    if (!ebb_device_is_host(d->cfg.device)) {
        struct ebb_device_info info;
        char why[256];
        if (ebb_device_memory(d->cfg.device, &info, why, sizeof why)) {
            snprintf(err, errlen, "cannot read %s's free memory: %s", d->cfg.device, why);
            return -1;
        }
        free_bytes = info.free_bytes;
    } else if (governor_free_memory("", &free_bytes, &source, err, errlen)) {
        return -1;
    }
    d->memory_free_bytes = free_bytes;
    d->memory_free_source = source;
    const uint64_t want = governor_auto_budget(held_bytes(d), free_bytes, d->memory.reserve_bytes);
    const uint64_t least = served_memory_minimum(d);
    *clamped = want < least;
    *budget = *clamped ? least : want;
    if (*budget == 0) *budget = 1;   /* 0 would mean "no budget" */
    return 0;
}

int memory_apply(struct daemon *d, const struct memory_policy *p, char *err, size_t errlen) {
    if (!p->automatic) {
        if (served_set_budget(d, p->bytes, err, errlen)) return -1;
        d->memory = *p;
        return 0;
    }
    const struct memory_policy old = d->memory;
    d->memory = *p;   /* auto_budget reads the reserve from here */
    uint64_t budget;
    int clamped;
    if (auto_budget(d, &budget, &clamped, err, errlen)) {
        d->memory = old;
        return -1;
    }
    if (clamped) {
        d->memory = old;
        snprintf(err, errlen, "a reserve of %" PRIu64 " bytes leaves less than the served models need: the daemon "
                 "holds %" PRIu64 " bytes and the %s says %" PRIu64 " more are free, so the budget would be %" PRIu64
                 " bytes, below the least the models need (%" PRIu64 " bytes)", p->reserve_bytes, held_bytes(d),
                 d->memory_free_source, d->memory_free_bytes,
                 governor_auto_budget(held_bytes(d), d->memory_free_bytes, p->reserve_bytes),
                 served_memory_minimum(d));
        return -1;
    }
    if (served_set_budget(d, budget, err, errlen)) {
        d->memory = old;
        return -1;
    }
    return 0;
}

static void on_auto_tick(uv_timer_t *t) {
    struct daemon *d = t->data;
    if (!d->memory.automatic || d->stopping) return;
    char err[512];
    uint64_t budget;
    int clamped;
    if (auto_budget(d, &budget, &clamped, err, sizeof err)) {
        log_warn("memory budget: cannot read the free memory", "error=\"%s\"", err);
        return;
    }
    if (clamped && !d->memory_clamped)
        log_warn("memory budget: the free memory is below what the served models need; the budget stays at their "
                 "minimum", "free_bytes=%" PRIu64 " reserve_bytes=%" PRIu64 " minimum_bytes=%" PRIu64,
                 d->memory_free_bytes, d->memory.reserve_bytes, budget);
    d->memory_clamped = clamped;
    const double moved = budget > d->memory_budget ? (double)(budget - d->memory_budget)
                                                   : (double)(d->memory_budget - budget);
    if (d->memory_budget && moved <= AUTO_HYSTERESIS * (double)d->memory_budget) return;
    if (served_set_budget(d, budget, err, sizeof err)) {
        log_warn("memory budget: cannot apply the auto budget", "bytes=%" PRIu64 " error=\"%s\"", budget, err);
        return;
    }
    log_info("memory budget follows the free memory", "bytes=%" PRIu64 " free_bytes=%" PRIu64 " source=%s", budget,
             d->memory_free_bytes, d->memory_free_source);
}

/* The budget bounds weights and KV, but what RSS shows is what the allocator
 * holds. glibc serves a block of at least its mmap threshold with its own
 * mapping, returned on free -- until the first such free, after which it
 * raises the threshold to that block's size, and KV pages (0.4-3 MB here),
 * logits and scratch then come from arenas that keep them after free until
 * the engine goes idle and trims (scheduler.c). Under load that kept ~17 MB
 * over the budget: four streams on the default model's stack peaked with
 * 34-36 MB outside weights and KV instead of 17-18 MB, and a load test's
 * peak RSS was 226 MB instead of 203 MB, with no change in tokens per second
 * (docs/benchmarks.md). Setting the threshold fixes it at 128 KiB, glibc's
 * default, and stops the raising. */
void memory_allocator_setup(void) {
#ifdef __GLIBC__
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
}

int memory_start(struct daemon *d) {
    char err[512];
    struct memory_policy p = {.automatic = d->cfg.memory_budget_mode == 1, .bytes = d->cfg.memory_budget_bytes,
                              .reserve_bytes = d->cfg.memory_reserve_bytes};
    if (p.automatic) p.bytes = 0;
    /* Set for this run (environment or flag): that, not what was saved. */
    const int explicit_budget = config_source_of(&d->cfg, "memory_budget_bytes") >= CONFIG_FROM_ENV ||
                                config_source_of(&d->cfg, "memory_budget_mode") >= CONFIG_FROM_ENV ||
                                config_source_of(&d->cfg, "memory_reserve_bytes") >= CONFIG_FROM_ENV;
    char *saved = NULL;
    if (!explicit_budget && catalog_setting_get(d->catalog, "memory_budget_bytes", &saved, err, sizeof err) == CATALOG_OK) {
        if (memory_policy_parse(saved, &p))
            log_warn("the saved memory budget is not understood; using the configured one", "saved=\"%.64s\"", saved);
        free(saved);
    }
    /* Models are still loading: the budget is applied to each as it becomes
     * READY (served_models.c), and auto's first reading is the timer's. */
    d->memory = p;
    d->memory_budget = p.automatic ? 0 : p.bytes;
    metric_set(d->m_budget, NULL, (double)d->memory_budget);
    if (uv_timer_init(&d->loop, &d->memory_timer)) return -1;
    d->memory_timer.data = d;
    d->memory_timer_live = true;
    return uv_timer_start(&d->memory_timer, on_auto_tick, p.automatic ? 1 : AUTO_INTERVAL_MS, AUTO_INTERVAL_MS) ? -1
                                                                                                                : 0;
}

static void on_timer_closed(uv_handle_t *h) { (void)h; }

void memory_stop(struct daemon *d) {
    if (!d->memory_timer_live) return;
    d->memory_timer_live = false;
    uv_close((uv_handle_t *)&d->memory_timer, on_timer_closed);
}
