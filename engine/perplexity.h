/* Perplexity of a text under a model, scored the way llama.cpp's
 * llama-perplexity scores it so the numbers are comparable:
 *
 *   - the whole text is tokenized once (BOS first only if the model asks for it);
 *   - it is cut into consecutive, non-overlapping windows of n_ctx tokens
 *     (a trailing partial window is dropped); with a BOS model the first
 *     token of every window is replaced by BOS;
 *   - each window is evaluated from an empty cache, and only the second half
 *     is scored: the predictions at positions n_ctx/2 .. n_ctx-2 of the
 *     tokens that follow them, so every scored token has at least n_ctx/2 of
 *     context (n_score, when not 0, scores the last n_score predictions
 *     instead: positions n_ctx-1-n_score .. n_ctx-2);
 *   - PPL = exp(mean negative log-likelihood over all scored tokens).
 *
 * With context compression (compress not NULL and not off) a window's
 * context -- positions 0 .. first, first being the first scored position --
 * is prefilled and compressed before the rest is fed, so every scored
 * token sees the compressed context (the kvpress protocol: compress, then
 * continue); compress->earlier's points (window-relative) are compressed at
 * first, as a conversation is at each turn. Without it the bits are the
 * same as one pass over the window.
 *
 * top1, when not NULL, receives the model's most likely token at every
 * scored position, in order (room for max_windows * the predictions scored):
 * how top-1 agreement between two configurations is measured.
 *
 * One implementation for `ebb ppl` and for `ebb pack`, which records the
 * perplexity of the variant it wrote in the catalog. */
#ifndef EBB_ENGINE_PERPLEXITY_H
#define EBB_ENGINE_PERPLEXITY_H
#include <stddef.h>
#include <stdint.h>

struct model;
struct model_run;
struct compress_params;

struct ppl_result {
    double ppl;           /* exp(mean NLL) */
    double err;           /* its standard error (delta method), as llama.cpp prints it */
    long scored;          /* tokens scored */
    int windows;          /* windows evaluated */
    int n_tokens;         /* tokens in the whole text */
    int compressed;       /* windows whose context was compressed */
    size_t kv_full_bytes, kv_compressed_bytes;   /* their caches before and after, summed */
};

/* The context of a window of n_ctx scoring n_score predictions (0: the
 * second half): positions 0 .. first, the first scored one; its length. */
int perplexity_context(int n_ctx, int n_score);

/* Called before the first window (done = 0) and after each one. */
typedef void (*ppl_progress_fn)(void *ud, int done, int total, const struct ppl_result *so_far, double seconds);

/* Scores text[0..len) in windows of n_ctx (at most max_windows of them; 0:
 * all), the last n_score predictions of each (0: the second half), with a
 * KV cache of kv_bits. 0, or -1 with the reason in err (text not UTF-8,
 * shorter than one window, n_ctx beyond the model's context, n_score not
 * below n_ctx, a kv_bits the model cannot use, out of memory). */
int perplexity_measure(struct model_run *run, const char *text, size_t len, int n_ctx, int n_score, int max_windows,
                       int kv_bits,
                       const struct compress_params *compress, int32_t *top1, ppl_progress_fn progress, void *ud,
                       struct ppl_result *r, char *err, size_t errlen);
/* The text cut as perplexity_measure cuts it: its tokens (BOS first when
 * the model asks for one) into *tokens (malloc'd, the caller frees),
 * *n_tokens of them, and the whole windows of n_ctx they hold (at most
 * max_windows; 0: all) in *n_windows, for perplexity_windows with the
 * model's tokenizer_bos_to_add as bos. 0, or -1 with err (not UTF-8, not
 * one window). */
int perplexity_tokens(const struct model *m, const char *text, size_t len, int n_ctx, int max_windows,
                      int32_t **tokens, int *n_tokens, int *n_windows, char *err, size_t errlen);
/* The same scoring over n_windows windows of n_ctx tokens already cut:
 * tokens holds them one after another, and the first token of each is
 * replaced by bos when bos >= 0 (the caller's tokens are not changed). What
 * the packer uses for its checkpoints (tools/pack/bitstack.c), whose windows
 * are the calibration's. r->n_tokens, as the caller set it, is kept for
 * the progress callback. 0, or -1 with err. */
int perplexity_windows(struct model_run *run, const int32_t *tokens, int n_windows, int n_ctx, int n_score, int32_t bos,
                       int kv_bits, const struct compress_params *compress, int32_t *top1, ppl_progress_fn progress,
                       void *ud, struct ppl_result *r, char *err, size_t errlen);
#endif
