/* Context compression: after the prefill of a long prompt, decide for every
 * layer and KV head which past positions keep the cache's precision, which
 * are demoted (values to 2 bits) and which are dropped, then compact the cache
 * (engine/kv.h holds the mechanism and the 2-bit tier).
 *
 * Scoring is SnapKV's: the queries of the prompt's last COMPRESS_WINDOW
 * positions (the observation window, recorded by the forward pass) attend
 * to every earlier position; a position's score for a KV head is the
 * softmax weight those queries give it, summed over the window and averaged
 * over the query heads that share the KV head, then max-pooled over
 * COMPRESS_POOL neighbours so that a kept token keeps its neighbours (an
 * answer is rarely one token). Then, unlike SnapKV, the KV heads of a layer
 * pool their scores and keep the same positions ("snapkv_head" keeps
 * SnapKV's choice per head): an answer spelled over several tokens (a
 * number is one token per digit here) needs all of them in the heads that
 * read it, and per-head choices lose some digits in some heads. On 12
 * passkey prompts (1k and 2k tokens, filler and natural text) dropping 50%
 * of a question-agnostic context found 0 keys per head, 6 per layer; 25%:
 * 0 and 1; with the question in the prompt 11 and 11 at 50%, 5 and 7 at
 * 25%; perplexity after dropping 75% moved +4.29% per head, +4.40% per
 * layer (docs/benchmarks.md). The first KV_SINK_TOKENS positions (the
 * attention sinks) and the recent window -- everything from the boundary
 * on, 64 to 127 positions, which include the observation window -- are
 * always kept; the boundary is the last whole page that no query to come
 * reads from the cache's f32 window.
 *
 * The budget counts positions kept at the cache's precision as a share of
 * the prompt (or a number of tokens), sinks and recent window included. The
 * rest are demoted (MiKV: a demoted token still answers a retrieval that a
 * dropped one cannot) or, in drop mode, evicted; low_budget demotes only
 * the next best share and drops the rest, which is how a byte budget below
 * what 2 bits for everything costs is met. Selection "random" and
 * "recent" (StreamingLLM: sinks plus the positions just before the window)
 * replace the scores, for the ablations.
 *
 * Demoted values go to 2 bits; demoted keys stay at 4 bits by default,
 * because on the default model 2-bit keys cost far more than 2-bit values:
 * with every position but the sinks and the recent window demoted (2,048
 * tokens of context, 3 held-out windows at KV4, perplexity 22.07 whole),
 * 2-bit keys per channel in the H64 basis gave 23.23 (+5.3%), per channel
 * unrotated (KIVI's basis) 25.94, per position 28.24, while 4-bit keys with
 * 2-bit values gave 22.15 (+0.4%); at equal bytes (36% of the cache) 4-bit
 * keys gave +2.4% against +3.7%. low_key_bits 2 keeps the option.
 *
 * The window's queries are the prompt's own, which say what it read last,
 * not what comes next. A lookahead (LAQ's pseudo-queries) decodes a few
 * tokens past the point greedily with the whole cache, records their
 * queries too, scores with them (attending to the cache and to each other,
 * as they were computed), then forgets their rows. Dropping 75% of 6k
 * tokens of held-out text, the next 2k scored +7.4% in perplexity with the
 * window alone, +5.3% with 32 tokens of lookahead, +4.9% with 64 (at 50%:
 * +6.1% and +4.0%); an oracle that scores with the 2k scored tokens' own
 * queries (per KV head) loses nothing (-0.3%): the choice is bound by how
 * well the queries to come are guessed (docs/benchmarks.md). It costs one
 * decoding pass per token and their recorded queries (1 s on a 7k prompt
 * whose prefill took 24 s); 32 by default. Only a cache not compressed yet
 * looks ahead: a conversation's next turn, compressed again after 20-70
 * new tokens, would wait 5x longer for its first token (300 ms against 60
 * on a 2.7k conversation), and compressing again as one reads (ppl
 * --compress-every) looks ahead at its first point only.
 *
 * Both guess at what comes next from what the prompt says last: a context
 * compressed before its question is known (kvpress's question-agnostic
 * protocol, a document asked about later) keeps the end of its filler and
 * loses its pass key (1 of 22 prompts at 25% kept). Selection
 * "reconstruct" adds KVzip's answer: a row matters if the model needs it
 * to say the context again. After the prefill the prompt is written again
 * past the point, a chunk of up to 256 positions per pass after a cue
 * ("Repeat the previous context exactly.", a later chunk's quoting the
 * previous chunk's last 8 tokens), each pass's queries score the chunk's
 * original rows -- a query's weights renormalised over the sinks, the
 * chunk and the pass itself, so that a row competes with its neighbours,
 * not with the whole prompt, and the most any query gives it kept -- and
 * the pass's rows are forgotten as the lookahead's are. A row then ranks
 * by the better of its two ranks, the window's (with the lookahead) and
 * the reconstruction's: either's best are kept first. Dropping 75%:
 * question-agnostic passkey 1 -> 12 of 22 (every filler haystack; natural
 * text still 0 of 8: every token of it is new, and the reconstruction
 * needs them all alike), question-aware 22 -> 21, perplexity at 4k + 4k
 * +3.3% -> +3.2%; the reconstruction alone gave 12, 12 and +4.3%, and a
 * sum of scores (each over its mean) 13, 21 and +3.6%. Each pass attends
 * only to what its scoring renormalises over (the sinks' page, the chunk's
 * pages and its own: kv->reading), not to the whole prompt: passes that
 * read everything cost about two prefills (56 s after a 28 s prefill of 8k
 * tokens), these 11 s, with the same keys found (question-aware 22 of 22)
 * and perplexity within 0.1% (docs/benchmarks.md). It is still 0.4 of
 * a prefill more before the first token and keeps no more perplexity at
 * 6k + 2k, so it is asked for, not the default.
 *
 * The scores read keys at the cache's precision, as attention does, and
 * cost the window's queries against the whole prompt once per layer: a few
 * percent of the prefill they follow.
 *
 * A conversation (the scheduler's prompt cache) is compressed again at
 * each later turn's end, over the store's rows and the positions since:
 * the new turn's window scores them all, the budget is a share of the
 * whole conversation, kept rows may be demoted or dropped and demoted ones
 * dropped, never promoted (a demoted row's lost bits do not come back).
 * The points and their windows travel in compress_params.earlier, so that
 * the same cache can be computed again from the tokens. Compressing so, as
 * one reads, costs no quality on the default model (docs/benchmarks.md:
 * dropping 75% of 2k tokens +3.5 to +4.1% compressed every 128-1024 tokens
 * against +4.4% once). */
#ifndef EBB_ENGINE_COMPRESS_H
#define EBB_ENGINE_COMPRESS_H
#include <stddef.h>
#include <stdint.h>

#include "engine/kv.h"
#include "engine/model_config.h"

struct ebb_pool;

#define COMPRESS_WINDOW 32          /* observation window: the prompt's last positions */
#define COMPRESS_MIN_WINDOW 8       /* the fewest a conversation's next turn compresses again with */
#define COMPRESS_POOL 7             /* max-pooling width over neighbouring positions */
#define COMPRESS_MIN_PROMPT 1024    /* shorter prompts are left alone unless told */
#define COMPRESS_MAX_POINTS 32      /* a conversation is compressed again for at most this many turns */
#define COMPRESS_LOOKAHEAD 32       /* tokens decoded past a point for their queries, by default */
#define COMPRESS_MAX_LOOKAHEAD 64   /* and at most */
#define COMPRESS_RECONSTRUCT_PASS 256   /* a reconstruction pass's positions (cue and chunk) at most */
#define COMPRESS_RECONSTRUCT_TAIL 8     /* a later chunk's cue quotes the previous chunk's last tokens */

enum compress_mode { COMPRESS_OFF = 0, COMPRESS_DEMOTE, COMPRESS_DROP };
enum compress_select { COMPRESS_SNAPKV = 0, COMPRESS_SNAPKV_HEAD, COMPRESS_RANDOM, COMPRESS_RECENT, COMPRESS_RECONSTRUCT };

struct compress_params {
    enum compress_mode mode;
    enum compress_select select;
    float budget;          /* share of the prompt kept at full precision, [0, 1] (budget_tokens 0) */
    int budget_tokens;     /* a count instead, when > 0 */
    float low_budget;      /* demote mode: share of the prompt demoted, the next best after the kept
                            * ones, the rest dropped (a byte budget's mix); < 0: all the rest */
    int min_prompt;        /* prompts shorter than this are not compressed */
    int low_key_bits;      /* demoted keys: 4 (per position, the default; 0 too) or 2 (per channel) */
    int at;                /* compress after this many prompt tokens, the rest fed after (the
                            * question-agnostic evaluation); 0: after the whole prompt */
    uint64_t seed;         /* COMPRESS_RANDOM */
    int lookahead;         /* tokens decoded greedily past the point of a cache not compressed yet,
                            * whose queries score with the window's (compress_look_ahead), <=
                            * COMPRESS_MAX_LOOKAHEAD; 0: none */
    int window;            /* the observation window at `at`, <= COMPRESS_WINDOW; 0: COMPRESS_WINDOW
                            * (a conversation's next turn may compute fewer of its last tokens) */
    /* Where the cache was compressed before `at`, ascending, and with what
     * window: a conversation's earlier turns (the scheduler's prompt
     * cache). The prefill stops and compresses at each, then at `at`, each
     * time over what the cache holds (compress_apply on a compact cache);
     * a preempted turn computes the same cache again that way. */
    int n_earlier;
    struct compress_mark {
        int at, window;
    } earlier[COMPRESS_MAX_POINTS];
};

/* Defaults: off, SnapKV, budget 0.25, low_budget -1, min_prompt
 * COMPRESS_MIN_PROMPT, lookahead COMPRESS_LOOKAHEAD. */
struct compress_params compress_defaults(void);
/* Names for config, the API and flags, indexed by the enum and ended by
 * NULL: "off" "demote" "drop"; "snapkv" "snapkv_head" "random" "recent"
 * "reconstruct". The parsers give -1, the name "?", when unknown. */
extern const char *const compress_mode_names[];
extern const char *const compress_select_names[];
int compress_mode_parse(const char *s);
int compress_select_parse(const char *s);
const char *compress_mode_name(enum compress_mode m);

/* What one compression did, per (layer, KV head): positions of the prompt
 * kept at full precision (sinks and recent window included), demoted and
 * dropped; the cache's bytes before and after; the stage's time. */
struct compress_report {
    int applied;
    enum compress_mode mode;
    int n_prompt, boundary, kept, demoted, dropped;
    size_t bytes_before, bytes_after;
    double ms;
};

/* Where compression comes in a prompt of n_prompt tokens: p->at, or its end. */
int compress_point(const struct compress_params *p, int n_prompt);
/* The first compression point (p->earlier's, then compress_point) whose
 * observation window a prefill from position `from` computes, 0 when none. */
int compress_next_point(const struct compress_params *p, int n_prompt, int from);
/* The observation window of compression point `at` (p->earlier's window,
 * or p->window at the last, COMPRESS_WINDOW by default). */
int compress_window(const struct compress_params *p, int at);
/* How many tokens a compression point's lookahead decodes at most: p's,
 * within COMPRESS_MAX_LOOKAHEAD, 0 when the selection does not score. */
int compress_lookahead_tokens(const struct compress_params *p);
/* How far a prompt of n_prompt tokens compressed under p writes at most
 * past its first point (only a cache not compressed yet looks ahead or
 * reconstructs): the point plus the lookahead, or plus a reconstruction's
 * longest pass; 0 when there is neither. */
int compress_lookahead_reach(const struct compress_params *p, int n_prompt);
/* The positions a cache needs for a prompt of n_prompt tokens and a
 * context of n_ctx (prompt and answer) compressed under p: n_ctx, or as far
 * as the lookahead reaches if that is further (a short answer still looks
 * ahead as far as asked), never beyond n_max. */
int compress_context(const struct compress_params *p, int n_prompt, int n_ctx, int n_max);
/* Whether a prompt of n_prompt tokens would be compressed under p. */
int compress_wanted(const struct compress_params *p, int n_prompt);
/* What compress_prepare's recording of a prompt of n_prompt tokens costs
 * (0 when it would not be compressed): the scheduler admits a request
 * only if its budget takes the cache and this. */
size_t compress_observation_bytes(const struct model_config *cfg, const struct compress_params *p, int n_prompt);
/* Before the prefill of a prompt whose first n_prompt tokens are to be
 * compressed (a compression point): records the observation window's queries
 * if compress_wanted, charged to the cache's account (kv_cache_observe:
 * KV_OVER_BUDGET when its budget cannot take them now, KV_FAILED when out
 * of memory). */
enum kv_status compress_prepare(struct kv_cache *kv, const struct model_config *cfg, const struct compress_params *p,
                                int n_prompt);
/* After the prefill of those tokens (kv->n_past is their count): scores,
 * selects and compacts; the scoring (one item per layer and KV head) is
 * split over pool (NULL: the calling thread), with the same result. On a
 * cache compressed before (a conversation's next turn) the window scores
 * the store's rows with the positions since, and the budget, a share of
 * the whole prompt now, is met again: kept rows may be demoted or dropped,
 * demoted ones dropped (drop mode, or a low budget), none promoted. 0
 * (report filled; applied 0 when there was nothing to do), or -1 when out
 * of memory or the budget refuses a new store (the cache is unchanged and
 * still usable). */
int compress_apply(struct kv_cache *kv, const struct model_config *cfg, const struct ebb_backend *be,
                   struct ebb_pool *pool, const struct compress_params *p, struct compress_report *report);

/* Whether the cache, at its compression point, has a recording that asks
 * for a reconstruction before the lookahead and compress_apply (selection
 * "reconstruct" on a cache not compressed yet), each pass a cue of at most
 * `cue` tokens and then a chunk of the prompt: the positions [0, *end) to
 * reconstruct and the chunk's length. 0 when none -- also when the
 * recording's room past the point is too short for the cue and a useful
 * chunk, and then the reconstruction is given up (the window scores
 * alone). */
int compress_reconstruction(struct kv_cache *kv, int cue, int *end, int *chunk);
/* After a reconstruction pass that wrote a cue and then positions [from,
 * to) of the prompt again past the recording's point: the softmax
 * weight each of the pass's queries gives each of those positions, among
 * the sinks, the chunk's original positions and the pass's own (KVzip's
 * normalisation: a position competes with its neighbours, not with the
 * whole prompt), the most over the queries and the query heads of each KV
 * head, kept in the recording's scores. Split over pool as compress_apply.
 * -1 when out of memory. */
int compress_score_reconstruction(struct kv_cache *kv, const struct model_config *cfg, const struct ebb_backend *be,
                                  struct ebb_pool *pool, int from, int to);

/* The selection alone, for tests and tools: fills tiers[(layer * n_head_kv
 * + head) * rows + row] from scores[same index] (ignored by "random" and
 * "recent"): per head the sinks and the n_keep - KV_SINK_TOKENS best other
 * rows kept -- never one of rows [low_from, low_to), a store's demoted
 * ones -- the next n_low demoted, the rest dropped. -1 when out of memory. */
int compress_select_tiers(const struct compress_params *p, const float *scores, int n_heads, int rows, int n_keep,
                          int n_low, int low_from, int low_to, uint8_t *tiers);

#endif
