/* Preconditions that used to be comments are assert()s now; this checks that
 * they fire, and that the sanitized build keeps them.
 *
 * Each violation runs in a forked child that must die by SIGABRT (the
 * assert), while the same call within its precondition, in this process,
 * must work: so a test passes only because the precondition is enforced,
 * not because the call crashes anyway.
 *
 * Release builds define NDEBUG on purpose (CMakeLists.txt): there the
 * violations are skipped (exit 77). A sanitized build (RelWithDebInfo with
 * -fsanitize=address) without asserts fails: that is the build that must
 * check them.
 */
#include <signal.h>
#include <stdbool.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "engine/kv.h"
#include "kernels/backend.h"
#include "server/bridge.h"
#include "storage/catalog.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif

#ifndef NDEBUG
/* Runs fn(arg) in a child; true when the child died by SIGABRT. */
static bool aborts(void (*fn)(void *), void *arg) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        fn(arg);
        _exit(0);   /* the precondition was not checked */
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return false;
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

/* ---------------------------------------------------------------- kv_store */

struct kv_fixture {
    struct model_config c;
    struct kv_account acc;
    struct kv_cache kv;
    float k[64], v[64];
};

static void store_at_200(void *arg) {
    struct kv_fixture *f = arg;
    kv_store(&f->kv, ebb_backend_cpu(), 0, 200, f->k, f->v);   /* past what kv_cache_ensure covered */
}

static void store_layer_1(void *arg) {
    struct kv_fixture *f = arg;
    kv_store(&f->kv, ebb_backend_cpu(), 1, 0, f->k, f->v);     /* the model has one layer */
}

static void test_kv_store(void) {
    struct kv_fixture f;
    memset(&f, 0, sizeof f);
    f.c.n_layer = 1;
    f.c.n_head_kv = 1;
    f.c.n_head = 2;
    f.c.head_dim = 64;
    f.c.n_ctx_train = 4096;
    for (int i = 0; i < 64; i++) f.k[i] = f.v[i] = (float)i;
    CHECK(kv_account_init(&f.acc, &f.c, 32, 0) == 0);
    CHECK(kv_cache_init(&f.kv, &f.c, 256, &f.acc) == KV_OK);
    CHECK(kv_cache_ensure(&f.kv, 10) == 0);
    kv_store(&f.kv, ebb_backend_cpu(), 0, 9, f.k, f.v);        /* covered: fine */
    CHECK_MSG(aborts(store_at_200, &f), "kv_store past the ensured positions did not abort");
    CHECK_MSG(aborts(store_layer_1, &f), "kv_store of a layer the model does not have did not abort");
    kv_cache_free(&f.kv);
    kv_account_destroy(&f.acc);
}

/* ---------------------------------------------------------------- bridge */

struct bridge_fixture {
    uv_loop_t loop;
    struct bridge b;
    struct bridge_target target;
    int delivered;
};

static void count(struct bridge_event *ev, void *arg) {
    struct bridge_fixture *f = arg;
    f->delivered += ev->kind == BRIDGE_DONE && ev->target == &f->target;
}

static void done_twice(void *arg) {
    struct bridge_fixture *f = arg;
    struct sched_timing t = {0};
    bridge_on_done(&f->target, FINISH_STOP, 1, 1, &t);
    bridge_on_done(&f->target, FINISH_STOP, 1, 1, &t);   /* a target hears done once */
}

static void test_bridge_done_once(void) {
    struct bridge_fixture f;
    memset(&f, 0, sizeof f);
    CHECK(uv_loop_init(&f.loop) == 0);
    CHECK(bridge_init(&f.b, &f.loop, count, &f) == 0);
    f.target.bridge = &f.b;
    struct sched_timing t = {0};
    bridge_on_done(&f.target, FINISH_LENGTH, 3, 2, &t);     /* once: fine, and delivered */
    uv_run(&f.loop, UV_RUN_NOWAIT);
    CHECK(f.delivered == 1);
    CHECK(f.target.done.finish == FINISH_LENGTH && f.target.done.n_generated == 2);
    struct bridge_fixture g;
    memset(&g, 0, sizeof g);
    CHECK(uv_loop_init(&g.loop) == 0 && bridge_init(&g.b, &g.loop, count, &g) == 0);
    g.target.bridge = &g.b;
    CHECK_MSG(aborts(done_twice, &g), "a second done event for one target did not abort");
    bridge_close(&g.b);
    uv_run(&g.loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&g.loop) == 0);
    bridge_close(&f.b);
    uv_run(&f.loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&f.loop) == 0);
}

/* ---------------------------------------------------------------- catalog */

static void check_pathless_row(void *arg) {
    (void)arg;
    struct catalog_model m = {.name = "x"};
    char err[256];
    catalog_model_check_file(&m, CATALOG_CHECK_STAT, err, sizeof err);
}

static void test_catalog_row(void) {
    CHECK_MSG(aborts(check_pathless_row, NULL), "checking the file of a row without a path did not abort");
}

#endif

int main(void) {
#ifdef NDEBUG
#ifdef SANITIZED
    CHECK_MSG(0, "the sanitized build defines NDEBUG: its assert()s are compiled out (see CMakeLists.txt)");
    return check_report("test_preconditions");
#else
    printf("test_preconditions: assert() is compiled out (NDEBUG, the Release build's choice): skipped\n");
    return CHECK_SKIPPED;
#endif
#else
    test_kv_store();
    test_bridge_done_once();
    test_catalog_row();
    return check_report("test_preconditions");
#endif
}
