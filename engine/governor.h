/* The memory governor's arithmetic: how one memory budget is shared by the
 * models a daemon serves, and, inside a model's share, by its weights and
 * its KV cache; and, for the "auto" budget, how much memory the machine or
 * the container still has.
 *
 * A model's configurations, best first: whole files above (rungs: the
 * served file, then the variants packed from it, each smaller than the one
 * before), and at the bottom its fixed weights (a plain file's, the
 * smallest variant's, or a BitStack file's embedding, head and norms) with
 * any prefix of its stack, from one level of every matrix to all. Beside
 * its weights a model holds the KV its admitted requests reserve. The
 * policy:
 *
 *   - The least budget that serves is every model's bottom configuration
 *     at its least (fixed weights and one level of the stack) and the
 *     larger of the KV its requests hold now and the KV of its smallest
 *     request. Less is refused (409), so a budget change never ends a
 *     request.
 *   - Above that, each model gets its minimum plus an equal part of the
 *     rest (its share). Equal parts keep the rule one line long; a model
 *     whose stack is whole leaves its part to its KV cache.
 *   - A model computes with the largest rung that fits its share beside the
 *     KV held (governor_rung): the source before its packed variants, a
 *     packed variant before the stack -- the order the ladder measured
 *     (docs/benchmarks.md: the stack only approximates the file it was
 *     packed from, and loses to a 4-bit variant at the same bytes).
 *   - Inside a share the KV cache comes first: admitted requests keep every
 *     position they reserve, up to all the share but fixed weights and one
 *     level; the stack keeps the longest prefix of what the KV leaves. So a
 *     busy model serves more requests at somewhat lower quality, and its
 *     quality comes back as soon as they end, block by block -- the trade
 *     BitStack exists for. (The other choice, weights first, would make
 *     requests wait or be preempted while the memory that could hold them
 *     sits in the weights' last, least useful blocks.)
 *
 * The scheduler applies the split between its steps (engine/scheduler.c);
 * the daemon recomputes shares when the budget, the models or "auto"'s
 * reading change (server/served_models.c). Pure functions, no state.
 */
#ifndef EBB_ENGINE_GOVERNOR_H
#define EBB_ENGINE_GOVERNOR_H
#include <stddef.h>
#include <stdint.h>

/* Whole-file configurations above the bottom one, at most. */
#define GOVERNOR_MAX_RUNGS 8

/* What the governor knows of one served model. */
struct governor_model {
    size_t rung_bytes[GOVERNOR_MAX_RUNGS];   /* the rungs' weights, largest first */
    int n_rungs;               /* 0: the bottom configuration only */
    size_t fixed_bytes;        /* the bottom's weights that do not change with the budget */
    size_t stack_min_bytes;    /* the stack's least prefix: one level of every matrix (0: no stack, or one on a base) */
    size_t stack_full_bytes;   /* the whole stack (0: no stack) */
    size_t kv_min_bytes;       /* the KV of its smallest request */
    size_t kv_held_bytes;      /* the KV its admitted requests reserve now */
};

/* The least budget that serves every model without ending a request. */
uint64_t governor_minimum(const struct governor_model *m, int n);
/* Each model's share of budget (>= governor_minimum; 0: no budget, every
 * share 0 = unlimited) into share[n]. */
void governor_split(uint64_t budget, const struct governor_model *m, int n, uint64_t *share);
/* Inside a share (0: unlimited): the KV budget of the model's requests, and
 * the stack bytes to keep beside kv_held (one level at least; the caller
 * rounds down to a prefix of the order). */
size_t governor_kv_budget(const struct governor_model *m, uint64_t share);
size_t governor_stack_target(const struct governor_model *m, uint64_t share, size_t kv_held);

/* The configuration to compute with: the first rung whose weights fit the
 * share beside the KV held, or n_rungs for the bottom one; no budget: the
 * first rung. current: the one in use now; moving up a rung takes a margin
 * (1/16 of its weights) so that the KV of one more request does not flip
 * it back and forth. */
int governor_rung(const struct governor_model *m, uint64_t share, size_t kv_held, int current);

/* Memory this process could still take: the least headroom (memory.max
 * minus memory.current) of its cgroup v2 and the cgroup's ancestors that set
 * a limit, and /proc/meminfo's MemAvailable, whichever is less. root
 * prefixes every path ("" for the real ones; tests give a directory laid
 * out like /). 0 with *bytes and *source ("cgroup" or "meminfo"), or -1
 * with err when neither can be read. */
int governor_free_memory(const char *root, uint64_t *bytes, const char **source, char *err, size_t errlen);
/* The memory this process can have at most: MemTotal, or the least cgroup
 * memory.max above it when less. 0, or -1 when neither can be read. */
int governor_total_memory(const char *root, uint64_t *bytes);
/* The "auto" budget: what the daemon holds now plus what it could still
 * take, less the operator's reserve (0 when the reserve takes it all). */
uint64_t governor_auto_budget(uint64_t held_bytes, uint64_t free_bytes, uint64_t reserve_bytes);
#endif
