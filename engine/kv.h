/* KV cache: per-sequence keys and values in fixed-size pages, at a chosen
 * precision, charged to a shared memory account.
 *
 * Pages. A sequence's cache is a list of pages, each holding KV_PAGE_TOKENS
 * positions of every layer's keys and values. Pages are allocated as the
 * sequence grows, never moved, and returned when the sequence ends, so memory
 * follows the tokens actually held rather than the longest context allowed.
 *
 * Precision (kv_bits), chosen per model by its account (kv_account_init):
 *   32  f32: exactly what the model computed;
 *   16  IEEE half;
 *    8  KV8 rows: 8-bit codes with an f16 scale and minimum per group;
 *    4  KV4 rows likewise with 4-bit codes: 4.5 bits per value with groups of
 *       64 (the row format is described in kernels/formats.h).
 * A group is 64 values of one head at one position (the largest of 64, 32,
 * 16, 8 that divides head_dim).
 *
 * Rotation (8 and 4 bits, head_dim a multiple of 64). Keys -- after RoPE --
 * and values are rotated before they are quantized: every 64-value block
 * of a head times the orthonormal 64x64 Walsh-Hadamard matrix (the backend's
 * hadamard64), which spreads the few large channels over the whole group so
 * that one scale fits it. kv_attend rotates the query the same way (q.k is
 * unchanged: the rotation is orthonormal), sums the rotated values and
 * rotates that sum back once (H64 is its own inverse), so the rotation
 * costs two H64 per query head, not one per position (the sink copies,
 * kept unrotated, are rotated as they join the body's first page). On SmolLM2-135M (4
 * windows of 512 held-out tokens) rotating values as well as keys took
 * KV4's perplexity excess from +1.25% to +1.05%; a model whose weights are
 * already rotated loses nothing by it.
 * Other head sizes are quantized unrotated.
 *
 * Full-precision positions (8 and 4 bits). A query at position t reads
 *   - the first KV_SINK_TOKENS positions (the "attention sinks" that draw
 *     a large share of every query's attention) from an f32 copy;
 *   - the positions of its own page and of the page before it -- 64 * (t/64
 *     - 1) .. t, 65 to 128 positions -- from f32 window pages;
 *   - everything in between from the quantized body.
 * Which store a (query, key) pair uses depends on their positions alone,
 * never on how the sequence was cut into batches or on what else shared
 * them, so results are reproducible token for token. Storage follows:
 * kv_store quantizes every position into the body at once, keeps its f32
 * copy in a window page, and the first few in the sink copy too;
 * kv_cache_ensure, called before each forward pass, hands back the window
 * pages no later query can read (those before the page preceding n_past)
 * and reuses them for new positions. A pass appending B positions holds at
 * most 2 + (B + 62) / 64 window pages (6 for a MODEL_MAX_BATCH prompt chunk,
 * 2 while decoding). The window keeps the recent tokens, which carry much
 * of the attention, exact; the sinks cost 4 positions and took the excess
 * above from +1.05% to +0.45% (kv_bits 8: -0.02%).
 *
 * Admission control works by reservation, grown as a sequence grows: a
 * sequence reserves the bytes its first positions can need (the scheduler
 * asks for its prompt and one more) and grows the reservation, a page at a
 * time, as it decodes (kv_cache_reserve). At 8 and 4 bits the reservation
 * also covers the sinks and the most window pages a cache of that many
 * positions holds at once. The account refuses a reservation that would
 * exceed its budget; the scheduler then preempts (vLLM's policy: the newest
 * running sequence gives its pages back and is recomputed later) instead of
 * failing anyone. Growth inside a reservation never fails for lack of budget
 * (only for lack of system memory), so what a forward pass stores was
 * reserved before it started. allocated_bytes counts what is held: body
 * pages as they are filled, the sinks and window pages while they exist.
 */
#ifndef EBB_ENGINE_KV_H
#define EBB_ENGINE_KV_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model_config.h"
#include "kernels/formats.h"

#define KV_PAGE_TOKENS EBB_KV_PAGE_TOKENS
#define KV_SINK_TOKENS EBB_KV_SINK_TOKENS   /* leading positions kept at full precision (8 and 4 bits) */
/* Queries per attention block: enough to share each converted page among
 * many, few enough that their scores (one row of n_ctx each) stay small. */
#define KV_BLOCK_QUERIES 48

struct ebb_backend;

/* What one precision costs for one model (kv_layout_init). */
struct kv_layout {
    int bits;                 /* 32, 16, 8 or 4 */
    int n_layer, kv_dim, head_dim;
    int group;                /* values per quantization group (8 and 4 bits) */
    int rotate;               /* keys and values rotated by H64 before quantization */
    size_t code_bytes;        /* codes of one row (8 and 4 bits); the f16 (d, m) pairs follow */
    size_t row_bytes;         /* one position's keys (or values) of one layer in the body */
    size_t page_bytes;        /* a body page: K and V of every layer for KV_PAGE_TOKENS positions */
    size_t window_page_bytes; /* an f32 window page (8 and 4 bits), else 0 */
    size_t sink_bytes;        /* the f32 sink positions (8 and 4 bits), else 0 */
};

/* NULL if this model can store its cache at `bits`, else why not. */
const char *kv_bits_problem(const struct model_config *cfg, int bits);
/* 0, or -1 when kv_bits_problem says no. */
int kv_layout_init(struct kv_layout *l, const struct model_config *cfg, int bits);
/* Bytes a sequence of n_ctx positions reserves at most: whole body pages,
 * plus the window pages it can hold at once with passes of any length. */
size_t kv_layout_bytes_for(const struct kv_layout *l, int n_ctx);

/* A model's KV policy -- the precision of its caches and their memory
 * budget -- shared by every sequence of the model; thread-safe (the HTTP
 * side reads it for metrics and admin while the engine charges it). */
struct kv_account {
    pthread_mutex_t lock;
    size_t budget_bytes;      /* 0: unlimited */
    size_t reserved_bytes;    /* promised to admitted sequences */
    size_t kept_bytes;        /* of reserved_bytes: caches kept for a later request (kv_cache_set_kept) */
    size_t allocated_bytes;   /* pages actually held */
    struct kv_layout layout;  /* the precision every cache of this account uses */
    /* Whose memory its caches' pages live in: the model's backend, set by
     * whoever serves it (a device's, engine/model.h); NULL: the host's. */
    const struct ebb_backend *be;
};

/* 0, or -1 when the model cannot use `bits` (kv_bits_problem). */
int kv_account_init(struct kv_account *a, const struct model_config *cfg, int bits, size_t budget_bytes);
void kv_account_destroy(struct kv_account *a);
void kv_account_set_budget(struct kv_account *a, size_t budget_bytes);

/* The account's numbers at one instant (one lock, so they agree). */
struct kv_usage {
    size_t budget_bytes, reserved_bytes, allocated_bytes, kept_bytes;
};
struct kv_usage kv_account_usage(struct kv_account *a);
/* Bytes a sequence of n_ctx positions reserves (with passes of any length),
 * and with passes of at most max_pass positions (kv_cache_init_reserving). */
size_t kv_account_bytes_for(const struct kv_account *a, int n_ctx);
size_t kv_account_bytes_for_pass(const struct kv_account *a, int n, int max_pass);
/* The most positions, up to n_max, that one sequence alone can hold under
 * the budget as it is now (n_max when unlimited; 0 when not even one). */
int kv_account_capacity(struct kv_account *a, int n_max);

struct kv_reading;

struct kv_cache {
    int n_ctx;                /* positions reserved */
    int n_past;               /* positions filled */
    struct kv_layout layout;
    int n_pages;              /* body pages allocated */
    uint8_t **pages;          /* body: [ceil(n_ctx / KV_PAGE_TOKENS)] */
    float **window;           /* f32 window pages by page index, NULL when not held (8 and 4 bits) */
    int window_lo, window_hi; /* every held window page lies in [lo, hi] */
    int window_max;           /* most window pages held at once (what was reserved) */
    int window_hold;          /* 1 + the position whose window pages stay held (kv_cache_hold_window), 0 none */
    float *sink;              /* f32 keys and values of the first KV_SINK_TOKENS positions (8 and 4 bits) */
    struct kv_account *account; /* may be NULL: unaccounted (CLI tools) */
    int n_reserved;           /* positions the reservation covers (<= n_ctx) */
    size_t reserved_bytes;    /* what the reservation holds of the account */
    struct kv_compact *compact;     /* positions [0, compact_boundary) after compression, NULL before */
    int compact_boundary;
    size_t compact_saved;     /* body bytes the compact store saves (its pages less its size) */
    struct kv_observation *obs;     /* queries recorded for compression's scoring, NULL when none */
    const struct ebb_backend *be;   /* whose memory holds the pages, window and sinks (the
                                       account's; the host's CPU table without one) */
    void **table;             /* a backend with a fused attention: the page tables in its memory,
                                 [2][ceil(n_ctx / KV_PAGE_TOKENS)] (body, window), else NULL */
    int table_stale;          /* pages changed since the tables were sent */
    int kept;                 /* its reservation counts as the account's kept_bytes */
    const struct kv_reading *reading; /* not NULL: attention reads only these pages (a
                                         reconstruction's passes, engine/compress.h) */
};

enum kv_status {
    KV_OK = 0,
    KV_FAILED = -1,        /* bad arguments or out of memory */
    KV_OVER_BUDGET = -2    /* the account's budget cannot take the reservation now */
};

/* A cache of at most n_ctx positions, stored at the account's precision (f32
 * without an account), reserving room for the first n_reserve of them; no
 * forward pass will append more than max_pass positions at once (8 and 4
 * bits: that bounds the f32 window pages held, so a decoding sequence
 * reserves two, not one per prompt chunk). A tool that wants another
 * precision without a budget gives an account initialised with budget 0.
 * KV_OVER_BUDGET leaves nothing to free. */
enum kv_status kv_cache_init_reserving(struct kv_cache *kv, const struct model_config *cfg, int n_ctx, int n_reserve,
                                       int max_pass, struct kv_account *account);
/* The same reserving all n_ctx positions at once (tools that know their length). */
enum kv_status kv_cache_init(struct kv_cache *kv, const struct model_config *cfg, int n_ctx,
                             struct kv_account *account);
/* Grows the reservation to cover positions [0, n), n <= n_ctx: KV_OK (also
 * when it already does), KV_OVER_BUDGET (nothing changed), KV_FAILED when
 * n > n_ctx. Never shrinks; kv_cache_free returns all of it. */
enum kv_status kv_cache_reserve(struct kv_cache *kv, int n);
void kv_cache_free(struct kv_cache *kv);
/* Marks a cache whose sequence ended as kept for a later request (the
 * scheduler's prompt cache), or takes the mark off: its reservation moves
 * into or out of the account's kept_bytes, and kv_cache_free of a kept
 * cache releases both at once, so that one kv_account_usage always sees
 * what is held by running work as reserved less kept. A kept cache's
 * reservation must not change (take the mark off first). */
void kv_cache_set_kept(struct kv_cache *kv, int kept);
/* Drops every position (keeps pages for reuse). */
void kv_cache_clear(struct kv_cache *kv);
/* From now on no pass appends more than max_pass positions (a sequence
 * whose prompt is done decodes a token, or a verification pass, at a time):
 * at 8 and 4 bits the f32 window pages beyond what such passes hold are
 * freed now and leave the reservation, which a prompt's longest chunk set.
 * Never raises the limit. */
void kv_cache_limit_pass(struct kv_cache *kv, int max_pass);
/* Forgets positions n .. n_past-1 (speculative decoding's rollback of the
 * drafted tokens a verification pass rejected): the next pass writes over
 * them, and until then nothing reads them, so the cache is exactly what it
 * was before they were written. Rows are quantized one position at a time
 * and window pages are kept from the page before the last pass's first
 * position, so n must not lie before the start of the last pass: 0, or -1
 * (nothing changed) when n is negative, beyond n_past, or before the window
 * still held. Pages and the reservation are kept for the positions to come. */
int kv_cache_truncate(struct kv_cache *kv, int n);
/* The longest pass the window this cache reserved takes (window_max: a
 * pass of n positions holds WINDOW_PAGES_FOR(n) pages); n_ctx without a
 * window (f32 and f16). */
int kv_cache_max_pass(const struct kv_cache *kv);
/* Keeps the window pages a query at position pos reads (pos's page and the
 * one before) through the passes that follow, so that kv_cache_truncate
 * can go back to pos after several of them -- context compression's
 * lookahead decodes a few tokens past its point, then forgets them; pos <
 * 0 lets them go at the next pass. The passes after pos must fit the
 * window the cache reserved as one pass would (a lookahead of n tokens: a
 * max_pass >= n). */
void kv_cache_hold_window(struct kv_cache *kv, int pos);
/* The smallest n kv_cache_truncate takes now: 0 for f32 and f16 caches
 * (every row is kept as computed); at 8 and 4 bits the start of the page
 * the last pass began in, whose f32 window pages -- that page's and the
 * one before -- are the only ones still held (a decoding sequence can go
 * back at most to the start of its last page), and never inside a compact
 * store or its next page; n_past when nothing earlier is possible. */
int kv_cache_truncate_floor(const struct kv_cache *kv);
/* A cache whose sequence ended goes on for a new one that starts with the
 * same n_past tokens (the scheduler's prompt cache): the new sequence's
 * n_ctx positions (n_past at least), reserving room for the first
 * n_reserve of them, with passes of up to max_pass positions, as
 * kv_cache_init_reserving would set them. The reservation is set to what
 * that needs, shrinking or growing. KV_OVER_BUDGET or KV_FAILED (bad
 * arguments, a recording of queries still held, out of memory) leave the
 * cache as it was. */
enum kv_status kv_cache_resume(struct kv_cache *kv, int n_ctx, int n_reserve, int max_pass);
/* Copies the first n positions of src into kv, an empty cache of the same
 * precision in the same memory whose reservation covers them (the prompt
 * cache shares a kept sequence's start without giving the sequence up).
 * f32 and f16 caches only, uncompressed: at 8 and 4 bits the positions
 * before a cut need the f32 window the source no longer holds. 0, or -1
 * (nothing copied) when that does not hold or out of memory. */
int kv_cache_copy_prefix(struct kv_cache *kv, const struct kv_cache *src, int n);
/* Makes sure positions [0, n) have pages, and that positions n_past .. n-1
 * can be stored and attended to, growing the reservation if it must; -1 if
 * n > n_ctx, the budget refuses the growth, out of memory, or (8 and 4 bits)
 * more than MODEL_MAX_BATCH new positions at once. */
int kv_cache_ensure(struct kv_cache *kv, int n);

/* Writes one token's keys and values (kv_dim floats each; keys after RoPE)
 * for a layer at position pos (kv_cache_ensure must cover it). */
void kv_store(struct kv_cache *kv, const struct ebb_backend *be, int layer, int pos, const float *k,
              const float *v);

/* Attention of a block of queries: n_tok consecutive positions pos0,
 * pos0 + 1, ... of one sequence (already stored) times the n_head query
 * heads that share KV head kvh of a layer. The query of token t and head h
 * is at q + t * stride + h * head_dim, and softmax(q.k * scale) weighted sum
 * of v goes to out at the same place. n_tok * n_head <= kv_block_queries();
 * scratch holds kv_attend_scratch() floats, private to the caller's thread.
 *
 * How it runs: a page at a time, the block's queries against the page's
 * keys, then a softmax per query, then the values a page at a time. Rows
 * read at full precision are used in place; body rows are converted to f32
 * one page of one head at a time (never the whole cache), once for the
 * whole block, which is what makes a long prompt's attention cheap: every
 * query of the block shares the conversion and the rows' trip through the
 * cache. Each query's arithmetic depends only on its own position (which
 * store each page comes from) and on backend.h's definitions of the score
 * and value ops, so a query gives the same bits alone or in any block.
 * Rotated layouts rotate the query once and sum the body's values in the
 * rotated basis, rotating that sum back once. */
void kv_attend_block(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
                     float *out, size_t stride, int n_tok, int n_head, int pos0, float scale, float *scratch);
/* One query at position n_pos - 1: a block of one. */
void kv_attend(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
               int n_pos, float scale, float *scratch, float *out);
/* Floats of scratch for blocks over contexts of up to n_ctx positions. */
size_t kv_attend_scratch(const struct model_config *cfg, int n_ctx);
/* Most queries in a block (KV_BLOCK_QUERIES, or one token's group of query
 * heads if that is more), and the tokens a block takes at most. */
int kv_block_queries(const struct model_config *cfg);
int kv_block_tokens(const struct model_config *cfg);


/* ------------------------------------------------ context compression
 *
 * The mechanism; engine/compress.h decides what goes where. Compression
 * moves positions [0, boundary) of a cache out of its pages into a compact
 * store, per layer and KV head: each position is kept at the cache's
 * precision (KV_TIER_KEEP), demoted (KV_TIER_LOW: values at 2 bits, keys
 * at 2 or 4) or dropped.
 * Every (layer, KV head) keeps and demotes the same number of positions, so
 * the store is dense arrays, and its pages are freed: the account's
 * allocation and this cache's reservation shrink by what it saves.
 *
 * The 2-bit tier (KIVI's split): values per position in groups like the
 * body's rows; keys per channel over chunks of up to KV_PAGE_TOKENS
 * positions, one (d, m) pair per channel per chunk, because a key's
 * channels differ in scale far more than its positions do -- or keys at 4
 * bits per position like the body's rows, which engine/compress.h chooses
 * by default (2-bit keys cost the default model too much). Both are stored
 * rotated by H64 when head_dim is a multiple of 64 (whatever the cache's
 * precision), so one scale fits each group. A demoted row is quantized from
 * what the cache held: the body's 4 or 8 bits, or f32/f16.
 *
 * Attention after compression: every query comes after the boundary (it
 * lies at least a page before the first position still being decoded), so
 * each reads the whole store -- kept rows, then demoted rows, a chunk of
 * KV_PAGE_TOKENS at a time -- and then the pages from the boundary on as
 * before. Order within the store does not matter to softmax; the rows'
 * RoPE was applied at their original positions when they were stored.
 * The sinks (positions < KV_SINK_TOKENS) must be kept. */
enum kv_tier { KV_TIER_DROP = 0, KV_TIER_LOW = 1, KV_TIER_KEEP = 2 };
#define KV_LOW_BITS 2

/* Queries of positions [from, from + n) of every layer, recorded as the
 * forward pass computes them (after RoPE): q[(layer * n + i) * q_dim];
 * and, when asked for, room for scores gathered from passes whose rows are
 * gone by the time the cache is compressed (a reconstruction's,
 * engine/compress.h). */
struct kv_observation {
    int from, n, q_dim;
    int past;                  /* of the n, the last ones past the compression point */
    int ahead;                 /* of those, how many a lookahead decodes (a reconstruction's
                                  passes, with scores, may write them all) */
    size_t bytes;              /* of q and scores, charged to the cache's account */
    float *q;
    float *scores;             /* n_scores floats, zeroed; NULL when none were asked for */
    size_t n_scores;
};

/* Starts recording the queries of positions [from, from + n) (q_dim floats
 * each), with room for n_scores scores; replaces a previous recording. It
 * lives from prefill to compression and costs n * q_dim * n_layer +
 * n_scores floats (2.2 MB on the default model for SnapKV's window), which
 * the cache's account reserves within its budget and counts as held until
 * the recording is forgotten: KV_OVER_BUDGET when the budget cannot take
 * them now, KV_FAILED when out of memory or when the cache lives in a
 * device's memory (compression runs on host caches only). */
size_t kv_observation_bytes(int n_layer, int n, int q_dim, size_t n_scores);
enum kv_status kv_cache_observe(struct kv_cache *kv, int from, int n, int q_dim, size_t n_scores);
/* The forward pass's hook: keeps position pos's query if it is recorded. */
void kv_observe_query(struct kv_cache *kv, int layer, int pos, const float *q);
void kv_cache_forget_observation(struct kv_cache *kv);

/* The largest boundary compression may use now: a multiple of
 * KV_PAGE_TOKENS at least a page before n_past's page (so no query to come
 * reads those positions from the window), 0 when none. */
int kv_cache_compact_limit(const struct kv_cache *kv);
/* The same for a cache at position n <= n_past (one that holds a few rows
 * past its compression point, a lookahead's, until they are scored). */
int kv_cache_compact_limit_at(const struct kv_cache *kv, int n);
/* The rows of each (layer, KV head) a compaction at boundary decides
 * (>= the store's boundary): the store's, kept then demoted, and the
 * positions from its boundary to this one (boundary itself when none). */
int kv_cache_compact_rows(const struct kv_cache *kv, int boundary);
/* Moves positions [0, boundary) into the compact store as tiers says:
 * tiers[(layer * n_head_kv + head) * rows + row] over
 * kv_cache_compact_rows(kv, boundary) rows, demoted keys at low_key_bits:
 * KV_LOW_BITS (per-channel packs), or 4 (KV4 rows, for models whose keys 2
 * bits hurt; values are 2 bits either way). On a cache compressed before
 * (a conversation's next turn), the store is made again: its kept rows may
 * stay, be demoted or dropped, its demoted ones stay or are dropped (never
 * kept: a demoted row's lost bits do not come back), and the positions
 * since its boundary join it. A row demoted before keeps its bytes (keys
 * per channel excepted: they are quantized again with their new chunk).
 * 0, or -1 (nothing changed) when boundary is not a multiple of
 * KV_PAGE_TOKENS from the store's boundary (or a positive one) to
 * kv_cache_compact_limit, a sink is not kept, a demoted row would be kept,
 * the heads' counts differ, low_key_bits differs from the store's, the
 * cache is in a device's memory, the budget cannot take a store that
 * saves less than the one it replaces, or out of memory. */
int kv_cache_compact(struct kv_cache *kv, const struct ebb_backend *be, int boundary, const uint8_t *tiers,
                     int low_key_bits);
/* The compact store's boundary, its rows per (layer, KV head) at each tier,
 * and its bytes; all 0 before compression. */
struct kv_compact_info {
    int boundary, n_keep, n_low;
    size_t bytes;
};
struct kv_compact_info kv_cache_compact_info(const struct kv_cache *kv);
/* The body bytes its positions need now: the compact store and the pages
 * that hold positions (a cleared cache keeps later pages for reuse; they
 * do not count). Window pages and sinks are not body. */
size_t kv_cache_body_bytes(const struct kv_cache *kv);
/* Bytes of a compact store with these counts (what kv_cache_compact would
 * hold), so a policy can size its tiers to a byte budget. */
size_t kv_compact_bytes(const struct kv_layout *l, int n_keep, int n_low, int low_key_bits);

/* The softmax weights kv_attend_block computes for a block of queries:
 * w[j * w_stride + slot] for query j (token j / n_head, head j % n_head,
 * as kv_attend_block numbers them) and the slots it reads: a compact
 * store's rows (kept, then demoted, as kv_cache_compact numbers them),
 * then the positions from its boundary to the query's own. Context
 * compression scores rows with them, after the pass that computed the
 * queries: a window page given back since is read from the body instead.
 * With `only` (a cache not compacted), just the pages that hold the sinks,
 * positions [from, to) or positions from `tail` on are read, and the
 * weights are the softmax over those alone, written at their slots (the
 * others' are not written): a scoring that renormalises over some
 * positions needs no more, and reads a fraction of a long cache. The
 * same reading as kv->reading makes a forward pass's attention
 * (kv_attend_block) read and softmax over just those pages too. */
struct kv_reading {
    int from, to, tail;
};
void kv_attend_weights(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
                       size_t stride, int n_tok, int n_head, int pos0, float scale, const struct kv_reading *only,
                       float *scratch, float *w, size_t w_stride);

#endif
