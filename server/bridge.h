/* The bridge between engine threads and the libuv loop.
 *
 * Scheduler callbacks run on engine threads, but every socket belongs to the
 * loop thread. The bridge turns each callback into a small event (a copy of
 * the token text, or the completion record), appends it to a mutex-guarded
 * queue and wakes the loop with uv_async_send; the loop drains the queue in
 * order and hands each event to the request it belongs to. uv_async_send
 * coalesces wake-ups, so a burst of tokens costs one loop iteration.
 *
 * Events carry an opaque target pointer (the request's state). The bridge
 * never interprets it; the loop side guarantees the target outlives every
 * event addressed to it (a request's state is freed only after its on_done
 * event has been delivered).
 *
 * The done event must never be lost (the request's state is freed only when
 * it arrives), so it is not allocated when the engine finishes: it lives in
 * the target itself (struct bridge_target), which the loop side allocated
 * with the request. A token event is allocated; when that fails its text is
 * dropped, logged, and the loop side fails the response on the gap in the
 * token count.
 */
#ifndef EBB_SERVER_BRIDGE_H
#define EBB_SERVER_BRIDGE_H
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "engine/scheduler.h"

enum bridge_kind { BRIDGE_TOKEN, BRIDGE_DONE };

struct bridge_event {
    struct bridge_event *next;
    enum bridge_kind kind;
    void *target;
    /* BRIDGE_TOKEN */
    int32_t id;
    bool prompt;                      /* a prompt token's log-probability (echo with logprobs) */
    float logprob;
    int n_top;                        /* the token's best alternatives, if asked */
    int32_t top_id[SAMPLER_MAX_TOP];
    float top_logprob[SAMPLER_MAX_TOP];
    double t;
    size_t len;
    /* BRIDGE_DONE */
    enum finish_reason finish;
    int n_prompt, n_generated;
    struct sched_timing timing;
    bool in_target;   /* the target's own done event: the bridge does not free it */
    char *text;       /* tokens: len bytes + NUL, allocated with the event */
};

typedef void (*bridge_deliver_fn)(struct bridge_event *ev, void *arg);

struct bridge {
    uv_async_t async;
    pthread_mutex_t lock;
    struct bridge_event *head, *tail;
    bridge_deliver_fn deliver;     /* runs on the loop thread; must free nothing */
    void *arg;
};

int bridge_init(struct bridge *b, uv_loop_t *loop, bridge_deliver_fn deliver, void *arg);
/* Closes the async handle; events still queued are delivered first. */
void bridge_close(struct bridge *b);

/* Scheduler callbacks (engine thread); ud is the target. */
void bridge_on_token(void *ud, const struct gen_token *tok, double t);
void bridge_on_done(void *ud, enum finish_reason finish, int n_prompt, int n_generated,
                    const struct sched_timing *timing);

/* Each target must know its bridge: the first member of every target is a
 * struct bridge_target. Zero-initialise `done`; it belongs to the bridge. */
struct bridge_target {
    struct bridge *bridge;
    struct bridge_event done;   /* filled and posted by bridge_on_done */
};
#endif
