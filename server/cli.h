/* Command-line front end: one function per subcommand and the small helpers
 * they share (strict number parsing, reading files, loading a model with a
 * clear error). Every command returns the process exit status and reports
 * problems on stderr as "ebb <command>: what is wrong". */
#ifndef EBB_SERVER_CLI_H
#define EBB_SERVER_CLI_H
#include <stddef.h>
#include <stdint.h>

#include "engine/compress.h"
#include "engine/model.h"

struct model;

int cmd_generate(int argc, char **argv);
int cmd_logits(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_models(int argc, char **argv);
int cmd_pack(int argc, char **argv);
int cmd_devices(int argc, char **argv);

/* Strict parsers: the whole string must be a number inside [lo, hi]; on
 * failure they print "ebb CMD: FLAG ..." and return -1. */
int cli_int(const char *cmd, const char *flag, const char *s, long lo, long hi, int *out);
int cli_float(const char *cmd, const char *flag, const char *s, double lo, double hi, float *out);
int cli_u64(const char *cmd, const char *flag, const char *s, uint64_t *out);
/* The value after a flag, or NULL (with an error) when argv ends. */
const char *cli_value(const char *cmd, int argc, char **argv, int *i);

/* Reads a whole file; malloc'd, NUL-terminated; NULL with an error printed. */
char *cli_read_file(const char *cmd, const char *path, size_t *len);
/* Whitespace- or comma-separated token ids from a string; malloc'd. */
int cli_parse_ids(const char *cmd, const char *text, int32_t **ids);

/* --device: a name of the form kernels/backend.h accepts ("cpu", "cuda",
 * "cuda:N") into *out, or prints why not and returns 2. */
int cli_device(const char *cmd, const char *value, const char **out);
/* Loads a model onto device ("cpu", "cuda[:N]"; NULL: the CPU) and a run
 * of it with n_threads workers (engine/model.h), or prints why not and
 * returns NULL. The caller frees the run, then the model. */
struct model_run *cli_load_model(const char *cmd, struct model *m, const char *path, enum model_weights weights,
                                 const char *device, int n_threads);
/* --stack-bytes: keeps the prefix of a bitstack file's stack that fits in
 * stack_bytes (UINT64_MAX: all of it) and prints "stack: R of A bytes
 * resident, ..." on stdout. 0, or the command's exit status: 2 when
 * --stack-bytes was given for a file without a stack, 1 when the fit fails. */
int cli_fit_stack(const char *cmd, struct model *m, uint64_t stack_bytes);

/* The context-compression flags shared by generate and ppl, flag a with
 * value v: 1 when it is one of them (parsed into p), 0 when it is not, 2
 * after printing why its value is wrong. COMPRESS_FLAGS_USAGE lists them. */
int cli_compress_flag(const char *cmd, const char *a, const char *v, struct compress_params *p);
#define COMPRESS_FLAGS_USAGE \
    "  --compress MODE     context compression after the prompt's prefill: off (default),\n" \
    "                      demote (the rest to 2 bits) or drop (the rest evicted)\n" \
    "  --compress-budget F share of the prompt kept at the cache's precision (default 0.25)\n" \
    "  --compress-tokens N that many tokens instead of a share\n" \
    "  --compress-low F    demote only this share (the next best), drop the rest\n" \
    "  --compress-select S snapkv (default: per layer), snapkv_head (per KV head), reconstruct\n" \
    "                      (scored while the model repeats the prompt: question-agnostic, about 0.4\n" \
    "                      of a prefill more), random or recent (ablations)\n" \
    "  --compress-min N    prompts shorter than N tokens are not compressed (default 1024)\n" \
    "  --compress-keys B   demoted keys at 4 bits per token (default) or 2 bits per channel\n" \
    "  --compress-lookahead N  score also with the queries of N tokens decoded greedily past\n" \
    "                      the point, then forgotten (0-64, default 32)\n"

/* --weights native|f32 (engine/model.h); 0, or 2 after printing why not. */
int cli_weights(const char *cmd, const char *value, enum model_weights *out);
#endif
