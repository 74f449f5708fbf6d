/* Text generation for one sequence: prompt in, streamed text out.
 *
 * This is the loop every front end shares (the CLI now, the daemon's
 * scheduler later): prefill the prompt, then sample, detokenize, filter stop
 * strings and hand complete UTF-8 text to a callback one token at a time.
 */
#ifndef EBB_ENGINE_GENERATE_H
#define EBB_ENGINE_GENERATE_H
#include <stddef.h>
#include <stdint.h>
#include "engine/sampler.h"

struct model;

enum finish_reason { FINISH_STOP = 0, FINISH_LENGTH = 1, FINISH_CANCELLED = 2, FINISH_ERROR = 3 };
const char *finish_reason_name(enum finish_reason r);

struct gen_params {
    int max_tokens;                 /* generated tokens at most */
    struct sampler_params sampling;
    const char *const *stops;       /* stop strings (borrowed) */
    int n_stops;
    int n_ctx;                      /* KV cache size; 0: prompt + max_tokens, capped by training ctx */
};

/* Called with each piece of released text (may be empty when text is held
 * back) and the id that produced it. Return nonzero to cancel. */
typedef int (*gen_text_fn)(void *ud, int32_t id, const char *text, size_t len);

struct gen_result {
    enum finish_reason finish;
    int n_prompt, n_generated;
    double prefill_s, decode_s;     /* wall time of each phase */
    char error[256];
};

/* Returns 0, or -1 with res->error set (prompt too long for the context,
 * out of memory). */
int generate(struct model *m, const int32_t *prompt, int n_prompt, const struct gen_params *p,
             gen_text_fn on_text, void *ud, struct gen_result *res);

/* Token ids that end a turn for this model (EOS and end-of-turn control
 * tokens such as <|im_end|>). */
int generate_is_end_token(const struct model *m, int32_t id);

double ebb_now_seconds(void);
#endif
