/* Engine-to-loop event queue; see bridge.h. */
#include "server/bridge.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "server/log.h"

static void drain(uv_async_t *h) {
    struct bridge *b = h->data;
    pthread_mutex_lock(&b->lock);
    struct bridge_event *ev = b->head;
    b->head = b->tail = NULL;
    pthread_mutex_unlock(&b->lock);
    while (ev) {
        struct bridge_event *next = ev->next;
        /* Read before delivering: delivering the done event may free its
         * target, and with it the event. */
        const bool owned = !ev->in_target;
        b->deliver(ev, b->arg);
        if (owned) free(ev);
        ev = next;
    }
}

int bridge_init(struct bridge *b, uv_loop_t *loop, bridge_deliver_fn deliver, void *arg) {
    memset(b, 0, sizeof *b);
    b->deliver = deliver;
    b->arg = arg;
    if (pthread_mutex_init(&b->lock, NULL)) return -1;
    if (uv_async_init(loop, &b->async, drain)) {
        pthread_mutex_destroy(&b->lock);
        return -1;
    }
    b->async.data = b;
    return 0;
}

static void closed(uv_handle_t *h) {
    struct bridge *b = h->data;
    pthread_mutex_destroy(&b->lock);
}

void bridge_close(struct bridge *b) {
    drain(&b->async);
    uv_close((uv_handle_t *)&b->async, closed);
}

static void post(struct bridge *b, struct bridge_event *ev) {
    pthread_mutex_lock(&b->lock);
    if (b->tail) b->tail->next = ev;
    else b->head = ev;
    b->tail = ev;
    pthread_mutex_unlock(&b->lock);
    uv_async_send(&b->async);
}

void bridge_on_token(void *ud, const struct gen_token *tok, double t) {
    struct bridge_target *target = ud;
    assert(target && target->bridge);
    const size_t len = tok->len;
    struct bridge_event *ev = calloc(1, sizeof *ev + len + 1);
    if (!ev) {
        /* Dropping a token's text would corrupt the answer silently; the
         * request's completion event still arrives, and the loop side marks
         * the response as failed when it sees the gap in token counts. */
        log_error("out of memory queuing a token event", NULL);
        return;
    }
    ev->kind = BRIDGE_TOKEN;
    ev->text = (char *)(ev + 1);
    ev->target = ud;
    ev->id = tok->id;
    ev->prompt = tok->prompt != 0;
    ev->logprob = tok->logprob;
    ev->n_top = tok->n_top < 0 ? 0 : tok->n_top > SAMPLER_MAX_TOP ? SAMPLER_MAX_TOP : tok->n_top;
    for (int i = 0; i < ev->n_top; i++) {
        ev->top_id[i] = tok->top_id[i];
        ev->top_logprob[i] = tok->top_logprob[i];
    }
    ev->t = t;
    ev->len = len;
    if (len) memcpy(ev->text, tok->text, len);
    post(target->bridge, ev);
}

void bridge_on_done(void *ud, enum finish_reason finish, int n_prompt, int n_generated,
                    const struct sched_timing *timing) {
    struct bridge_target *target = ud;
    /* No allocation: the done event must never be lost (bridge.h). */
    assert(target && target->bridge);
    struct bridge_event *ev = &target->done;
    assert(!ev->in_target);   /* one done event per target */
    memset(ev, 0, sizeof *ev);
    ev->in_target = true;
    ev->kind = BRIDGE_DONE;
    ev->target = ud;
    ev->finish = finish;
    ev->n_prompt = n_prompt;
    ev->n_generated = n_generated;
    ev->timing = *timing;
    post(target->bridge, ev);
}
