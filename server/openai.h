/* The OpenAI-compatible API surface, without the transport: request bodies
 * in, validated structs out; engine results in, response JSON out.
 *
 * Parsing. Each route has one parser that takes the raw body and either
 * fills a struct oai_request or fills a struct oai_error that the server can
 * send as it is (status, OpenAI error type, the offending field in `param`,
 * and a message saying what is wrong and what was received). The policy is
 * strict, because a silently ignored field is a silent wrong answer:
 *   - the body must be one JSON object, valid UTF-8, with no NUL in any
 *     string and no key given twice (jansson checks these while parsing);
 *   - every field is type- and range-checked;
 *   - a field this server does not implement is refused by name ("not
 *     supported") unless its value asks for the default behaviour (echo
 *     false, presence_penalty 0, logit_bias {}, response_format text...);
 *   - a key no route knows is refused by name;
 *   - JSON null means "not given" for every optional field, since some
 *     clients send explicit nulls for unset options.
 * Sizes are bounded (messages, prompts, token ids, stop strings) so a
 * hostile body costs at most what the HTTP body limit lets it cost.
 *
 * Responses. Generated text is gathered per choice in a struct oai_choice
 * that the server appends to as tokens arrive (text released by the engine,
 * and, when logprobs were asked for, each token's bytes and log-probability).
 * A non-streamed response is then one call, oai_response(); a streamed one
 * calls oai_stream_chunk() after each append, which emits what arrived since
 * the previous call as complete server-sent events and forgets it, so a long
 * stream holds only what has not been sent. Every builder returns malloc'd
 * compact JSON (or SSE text), or NULL when out of memory; the caller frees.
 * Strings that reach JSON are made valid UTF-8 (invalid bytes become U+FFFD)
 * so a response can never fail to encode.
 *
 * Nothing here does I/O, calls the engine, or keeps global state: every
 * function may run on any thread. Parsing yields the API's own values
 * (temperature, stop strings...), never engine types; the route maps them to
 * the engine's parameters (completion_gen_params, server/completion.h). The
 * engine types here are enum finish_reason, the value a choice ends with,
 * struct logit_bias, an (id, bias) pair the sampler takes as it is, and a
 * compiled struct grammar: compiling a request's grammar or JSON schema is
 * part of validating it (engine/grammar.c is pure: no I/O, no globals).
 */
#ifndef EBB_SERVER_OPENAI_H
#define EBB_SERVER_OPENAI_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/generate.h"
#include "server/tools.h"

/* Limits on a request (beyond them: 400 naming the field). */
#define OAI_MAX_MESSAGES 1024          /* chat messages */
#define OAI_MAX_PROMPTS 1024           /* completion prompts in one request */
#define OAI_MAX_TOKEN_IDS (1 << 20)    /* token ids in one request, all prompts together */
#define OAI_MAX_N 16                   /* choices per prompt */
#define OAI_MAX_TOP_LOGPROBS 20        /* chat's top_logprobs (completions' logprobs: 5, as OpenAI) */
#define OAI_MAX_CMPL_LOGPROBS 5
#define OAI_MAX_LOGIT_BIAS 1024        /* entries in logit_bias */
#define OAI_MAX_STOP_IDS 64            /* ids in stop_token_ids */
#define OAI_MAX_STOPS 4                /* stop strings */
#define OAI_MAX_STOP_BYTES 256         /* bytes in one stop string */
#define OAI_MAX_MODEL_NAME 256         /* bytes in the model name */
#define OAI_DEFAULT_MAX_TOKENS 16      /* /v1/completions without max_tokens (as OpenAI) */
#define OAI_CHOICE_MAX_BYTES (8u << 20) /* default cap on one choice's accumulated output */

/* An error ready for http_respond_error(status, type, message, param). */
struct grammar;

struct oai_error {
    int status;          /* 400 for bad input; 503 when out of memory */
    char type[32];       /* "invalid_request_error", "server_error" */
    char message[256];   /* one line for a person; valid UTF-8 */
    char param[64];      /* the offending field ("messages[2].content"); "" when none */
};

enum oai_kind { OAI_COMPLETION, OAI_CHAT, OAI_TOKENIZE, OAI_DETOKENIZE, OAI_EMBEDDING };

/* "developer" is accepted and stored as SYSTEM (it is OpenAI's new name). */
enum oai_role { OAI_ROLE_SYSTEM, OAI_ROLE_USER, OAI_ROLE_ASSISTANT, OAI_ROLE_TOOL };

/* One prompt: text, or token ids given by the client (one is set, except
 * for /detokenize with "tokens": [], which has neither). */
struct oai_prompt {
    char *text;          /* NUL-terminated UTF-8 without NULs, or NULL */
    size_t text_len;
    int32_t *tokens;     /* ids >= 0; range against the vocabulary: oai_check_token_ids */
    int n_tokens;
};

struct oai_message {
    enum oai_role role;
    char *content;       /* NUL-terminated; text parts joined with "\n" */
    size_t content_len;
};

struct oai_request {
    enum oai_kind kind;
    char model[OAI_MAX_MODEL_NAME + 1];  /* "" when not given: the server's default model */

    /* completions: one or more prompts (each its own set of n choices);
     * tokenize: one text prompt; detokenize: one token prompt (may be empty). */
    struct oai_prompt *prompts;
    int n_prompts;
    bool nested_token_prompts;   /* prompt was an array of arrays of ids (names errors) */
    /* chat, and tokenize with "messages". */
    struct oai_message *messages;
    int n_messages;

    int max_tokens;              /* >= 1; -1 (chat default): until the context ends */
    float temperature;           /* [0, 2], default 1; 0 is greedy */
    float top_p;                 /* (0, 1], default 1 */
    int top_k;                   /* 0 (default) or -1: off */
    float min_p;                 /* [0, 1], default 0 */
    float repetition_penalty;    /* (0, 100], default 1 */
    bool has_seed;               /* false: the server picks a seed */
    int64_t seed;
    int n;                       /* 1..OAI_MAX_N */
    char **stops;                /* n_stops NUL-terminated, non-empty strings */
    int n_stops;
    bool stream;
    bool include_usage;          /* stream_options.include_usage */
    bool logprobs;               /* the chosen token's log-probability per token */
    int top_logprobs;            /* and this many alternatives' (0..OAI_MAX_TOP_LOGPROBS) */
    float presence_penalty, frequency_penalty;   /* [-2, 2], 0 off */
    struct logit_bias *logit_bias;               /* ids not yet range-checked: oai_check_token_ids */
    int n_logit_bias;
    bool echo;                   /* completions: the prompt's text comes before the output */
    bool cache_prompt;           /* extension (llama.cpp's name): start from a kept cache of the prompt's
                                    first tokens and keep this one's (engine/scheduler.h); default true */
    bool ignore_eos;             /* extensions: never end on the end-of-turn token, */
    int min_tokens;              /*   nor before this many tokens */
    int32_t *stop_ids;           /* extension stop_token_ids: ids that end the output */
    int n_stop_ids;
    /* Structured output: response_format json_object / json_schema (the
     * schema compiled by server/json_schema.h) or the "grammar" extension,
     * compiled (engine/grammar.h); NULL: unconstrained. Owned. */
    struct grammar *grammar;
    /* Tool calling (server/tools.h): the tools, enum tool_choice, the named
     * tool's index (TOOL_CHOICE_NAMED) and parallel_tool_calls (default
     * true). With tools, grammar holds tools_gbnf's grammar. */
    struct oai_tool *tools;
    int n_tools, tool_choice, tool_named;
    bool parallel_tool_calls;
    int speculative;             /* ebb's extension: enum draft_source (engine/draft.h); -1: the server's default */
    /* ebb's extension "context_compression" (engine/compress.h): enum
     * compress_mode and compress_select, the kept budget as a share or a
     * token count, the shortest prompt compressed; each < 0 when the
     * request leaves it to the server. */
    int compress_mode, compress_select, compress_tokens, compress_min_prompt, compress_key_bits, compress_lookahead;
    float compress_budget, compress_low;

    /* embeddings ("input" is parsed into prompts) */
    bool base64;                 /* encoding_format "base64": little-endian float32, base64 */
    int dimensions;              /* 0: not given; else must be the model's width */

    /* tokenize / completions */
    bool add_special_tokens;     /* add BOS when the model wants one. Default: true
                                    for text prompts, false for messages (the chat
                                    template already has them). Never applies to
                                    prompts given as token ids. */
    bool add_generation_prompt;  /* tokenize with messages: default true */
    bool return_token_strs;      /* tokenize: also return each token's text */
};

/* Parsers: 0 and *out filled (free with oai_request_free), or -1 and *err
 * filled (*out then holds nothing to free, though freeing it is harmless). */
int openai_parse_completion(const char *body, size_t len, struct oai_request *out, struct oai_error *err);
int openai_parse_chat(const char *body, size_t len, struct oai_request *out, struct oai_error *err);
int openai_parse_tokenize(const char *body, size_t len, struct oai_request *out, struct oai_error *err);
int openai_parse_detokenize(const char *body, size_t len, struct oai_request *out, struct oai_error *err);
int openai_parse_embedding(const char *body, size_t len, struct oai_request *out, struct oai_error *err);
/* The field prompts come from: "input" for embeddings, else "prompt". */
const char *oai_prompt_field(enum oai_kind kind);
void oai_request_free(struct oai_request *r);

/* Checks every client-given token id (prompts, stop_token_ids, logit_bias)
 * against the model's vocabulary: 0, or -1 with a 400 naming the first bad
 * id ("prompt[0][7]"). */
int oai_check_token_ids(const struct oai_request *r, int n_vocab, struct oai_error *err);

/* Choices the request produces: n per prompt for completions (choice index =
 * prompt index * n + j, as OpenAI numbers them), n for chat. */
int oai_n_choices(const struct oai_request *r);

/* "system", "user", "assistant", "tool": what the chat template expects. */
const char *oai_role_name(enum oai_role role);
/* finish_reason_name, but NULL for FINISH_NONE (JSON null while running). */
const char *oai_finish_reason(enum finish_reason f);

/* Fills *err (message printf-style, made valid UTF-8 if truncated). */
void oai_error_set(struct oai_error *err, int status, const char *type, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Response ids: "cmpl-<n>" or "chatcmpl-<n>" from the server's request id,
 * and back ("cmpl-42", "chatcmpl-42" or "42" give 42): 0, or -1 if malformed. */
void oai_format_id(char *buf, size_t size, enum oai_kind kind, uint64_t request_id);
int oai_parse_id(const char *s, uint64_t *request_id);

/* ---- accumulating a choice ---- */

struct oai_choice {
    int index;                   /* position in "choices" */
    enum finish_reason finish;   /* FINISH_NONE while running; the server sets it */
    bool logprobs;               /* record tokens (else add_token does nothing) */
    int top_logprobs;            /* alternatives reported per token (recorded as given) */
    bool tools;                  /* chat with tools: text starting "<tool_call>" is a call list */

    /* The rest is private to openai.c. */
    char *text;                  /* text not yet streamed (all of it if not streaming) */
    size_t text_len, text_cap;
    char *pieces;                /* bytes of the recorded tokens, back to back */
    size_t pieces_len, pieces_cap;
    size_t *piece_end;           /* end of token i in pieces */
    float *token_logprob;
    int n_tokens, cap_tokens;
    int *alts_end;               /* end of token i's alternatives in the alt_ arrays */
    char *alt_pieces;            /* the alternatives' bytes, back to back */
    size_t alt_pieces_len, alt_pieces_cap;
    size_t *alt_piece_end;
    float *alt_logprob;
    int n_alts, cap_alts;
    size_t max_bytes;
    size_t chars_streamed;       /* characters of tokens already streamed (text_offset base) */
    int tool_mode;               /* streams with tools: 0 undecided, 1 text, 2 calls */
    char *call_text;             /* calls: everything generated (streams consume text) */
    size_t call_len, call_cap;
    struct tool_stream tool_stream;
    bool started, finish_sent;   /* stream state */
};

/* max_bytes bounds what the choice holds at once (text, token bytes and 16
 * bytes per token or alternative); 0 means OAI_CHOICE_MAX_BYTES.
 * top_logprobs: chat's per-token "top_logprobs" lists are given as arrays
 * (empty when 0) and completions' as objects (JSON null when 0). */
void oai_choice_init(struct oai_choice *c, int index, bool logprobs, int top_logprobs, size_t max_bytes);
/* The choice answers a chat request with tools (server/tools.h): a text
 * that is a call list becomes message.tool_calls, finish_reason
 * "tool_calls", and streams as tool-call deltas. */
void oai_choice_expect_tools(struct oai_choice *c);
/* Appends released text / one generated token (its raw bytes, which may be
 * part of a UTF-8 character, and its log-probability). 0, or -1 when the cap
 * is reached or memory runs out: the server should end the request. */
int oai_choice_add_text(struct oai_choice *c, const char *text, size_t len);
struct oai_alt {
    const char *piece;           /* raw bytes of an alternative token */
    size_t len;
    float logprob;
};
int oai_choice_add_token(struct oai_choice *c, const char *piece, size_t len, float logprob,
                         const struct oai_alt *alts, int n_alts);
void oai_choice_free(struct oai_choice *c);

/* ---- responses ---- */

struct oai_meta {
    enum oai_kind kind;          /* OAI_COMPLETION or OAI_CHAT */
    const char *id;              /* oai_format_id() */
    const char *model;
    int64_t created;             /* unix seconds */
    bool include_usage;          /* streams: chunks carry "usage": null, then a usage chunk */
};

struct oai_usage {
    int prompt_tokens;           /* counted once per prompt, not per choice */
    int cached_tokens;           /* of those, taken from the prompt cache (per prompt, the most any of
                                    its choices took); timings' prompt_n counts the rest */
    int completion_tokens;       /* over every choice */
    /* ebb's extension, in usage only when drafts were verified: tokens
     * drafted for speculative decoding and the ones kept (engine/draft.h). */
    int draft_tokens, accepted_draft_tokens;
    /* ebb's extension, in usage only when a prompt was compressed
     * (engine/compress.h), summed over choices: prompt tokens kept at full
     * precision, demoted, dropped, and the KV bytes before and after. */
    int compressed, kept_tokens, demoted_tokens, dropped_tokens;
    double kv_bytes_full, kv_bytes_compressed;
    /* The response's "timings" object, as llama.cpp's server returns it:
     * prefill (admission to the first token) and decode (first token to the
     * last) wall time, the longest over the choices; 0 when unknown. */
    double prompt_ms, predicted_ms;
    double grammar_ms;           /* constrained decoding's masking, summed over choices (in timings when > 0) */
};

/* The whole non-streamed response: "text_completion" or "chat.completion".
 * *len (may be NULL) receives the length. */
char *oai_response(const struct oai_meta *m, const struct oai_choice *choices, int n_choices,
                   const struct oai_usage *u, size_t *len);

/* Streaming. Returns the SSE events ("data: {...}\n\n" each) for what the
 * choice gained since the previous call, and marks it sent:
 *   chat: a first event with delta {"role":"assistant","content":""} (even
 *     when there is no text yet: call it right after the stream starts to
 *     send it at once), then {"content": new text} when there is text, then,
 *     once c->finish is set, a last event with delta {} and finish_reason;
 *   completions: one event with the new text, and finish_reason once set.
 * Logprobs of the new tokens ride along with the text. Returns "" (*len 0)
 * when there is nothing to send; NULL only when out of memory. */
char *oai_stream_chunk(const struct oai_meta *m, struct oai_choice *c, size_t *len);
/* The final {"choices":[],"usage":{...}} event (include_usage). */
char *oai_stream_usage(const struct oai_meta *m, const struct oai_usage *u, size_t *len);
/* An error inside a stream (e.g. shutdown cut it short):
 * data: {"error":{"message","type","param","code"}} */
char *oai_stream_error(const struct oai_error *e, size_t *len);
#define OAI_SSE_DONE "data: [DONE]\n\n"

/* GET /v1/models: {"object":"list","data":[{"id","object":"model","created","owned_by":"ebb"}]} */
char *oai_models_response(const char *const *names, const int64_t *created, int n, size_t *len);
/* One model object, as GET /v1/models/{id} answers it. */
char *oai_model_response(const char *name, int64_t created, size_t *len);
/* POST /tokenize: {"count","max_model_len","tokens"[,"token_strs"]} as vLLM;
 * pieces/piece_lens (the raw bytes of each token) may be NULL, else the
 * request asked for return_token_strs. */
char *oai_tokenize_response(const int32_t *ids, int n, int max_model_len, const char *const *pieces,
                            const size_t *piece_lens, size_t *len);
/* POST /v1/embeddings: {"object":"list","data":[{"object":"embedding",
 * "index","embedding"}],"model","usage":{"prompt_tokens","total_tokens"}};
 * vectors holds n rows of dim floats; base64: each row as the base64 of its
 * little-endian float32 bytes (what the official clients ask for). */
char *oai_embedding_response(const char *model, const float *vectors, int n, int dim, bool base64,
                             int prompt_tokens, size_t *len);
/* POST /detokenize: {"prompt": text}. */
char *oai_detokenize_response(const char *text, size_t text_len, size_t *len);
#endif
