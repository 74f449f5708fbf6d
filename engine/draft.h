/* Drafts for speculative decoding: where drafted tokens come from and how
 * many of them a step should verify.
 *
 * A decoded token costs a pass that reads every weight once; a pass over
 * k + 1 tokens reads them once too, so when the served model agrees with k
 * guessed tokens it emits k + 1 tokens for one pass. Verification is exact
 * (the scheduler keeps a drafted token only where the model, sampling as it
 * would anyway, chose that very token), so drafts change speed, never text.
 *
 * Source: n-gram lookup (prompt-lookup decoding). The last DRAFT_NGRAM_MAX
 * tokens, or failing that fewer down to DRAFT_NGRAM_MIN, are looked for
 * earlier in the sequence (prompt and output); the tokens that followed
 * their most recent occurrence are the draft. It costs no weights and pays
 * where output copies input: rewriting, summarizing, code edits.
 *
 * Length. Whether a draft pays depends on the machine: on a small model and
 * a couple of cores a pass over several tokens is far from free (a pass of
 * 2 tokens took 2.1x one token's time on the development machine, 9 tokens
 * 3.9x: `ebb bench --verify 8`). So the engine keeps the measured wall time
 * of its steps by their token count (struct draft_costs, a moving average)
 * and each request its running acceptance rate a; a step drafts the k that
 * maximizes the step's expected tokens per second, (B + a + a^2 + ... +
 * a^k) / t(B + 1 + k) against (B + 1) / t(B + 1) without a draft (B: the
 * step's other tokens, which the drafts slow down and do not speed up),
 * and none when nothing beats not drafting. Counts not yet measured are
 * estimated from the nearest measured ones, optimistically, so that the
 * curve gets measured; and a request that stopped drafting verifies a whole
 * draft every DRAFT_RETRY_STEPS steps, so that a noisy measurement cannot
 * turn drafting off for good.
 *
 * Acceptance is also measured without verifying: a step that does not
 * draft still looks its draft up, and the token the model then emits tells
 * whether the draft's first token would have been kept (the scheduler
 * records it as one checked position). So a request that starts copying
 * its prompt is seen to, and starts drafting, within a few tokens, at the
 * cost of a lookup.
 */
#ifndef EBB_ENGINE_DRAFT_H
#define EBB_ENGINE_DRAFT_H
#include <stdint.h>

#include "engine/model_config.h"

#define DRAFT_MAX 8             /* drafted tokens per step and sequence at most */
#define DRAFT_NGRAM_MAX 3
#define DRAFT_NGRAM_MIN 2
#define DRAFT_RETRY_STEPS 32
#define DRAFT_MIN_GAIN 1.05     /* a draft must promise this much over none */

/* Where a request's drafts come from. */
enum draft_source { DRAFT_NONE = 0, DRAFT_NGRAM = 1 };
/* "none", "ngram": the names the API, config and metrics use. */
const char *draft_source_name(enum draft_source s);
/* The source named, or -1. */
int draft_source_parse(const char *name);

/* Up to max_draft tokens that followed the most recent earlier occurrence
 * of hist's last n-gram (n from DRAFT_NGRAM_MAX down to DRAFT_NGRAM_MIN);
 * returns how many were written to out (0: no match). */
int draft_ngram(const int32_t *hist, int n_hist, int max_draft, int32_t *out);

/* Wall time of the engine's steps by their token count. */
struct draft_costs {
    double seconds[MODEL_MAX_BATCH + 1];   /* moving average; 0: not measured */
};
void draft_costs_record(struct draft_costs *c, int n_tokens, double seconds);
/* Measured or estimated seconds of a step of n tokens; 0 when no step has
 * been measured at all. */
double draft_costs_estimate(const struct draft_costs *c, int n_tokens);

/* A request's acceptance: drafted positions the model checked and the ones
 * it accepted, decayed so that the recent past counts most. */
struct draft_stats {
    double checked, accepted;
    int steps_since_draft;
};
/* After a verification of k drafts of which `accepted` were kept (k = 1
 * for a draft looked up but not verified: was its first token emitted?). */
void draft_stats_record(struct draft_stats *s, int k, int accepted);
double draft_acceptance(const struct draft_stats *s);

/* How many of the `available` drafted tokens (<= DRAFT_MAX) to verify in a
 * step whose other tokens number `others` (>= 0), at most `room`: 0 when
 * none pays. Counts the request's steps without drafts for the retry. */
int draft_choose(const struct draft_costs *c, struct draft_stats *s, int others, int available, int room);
#endif
