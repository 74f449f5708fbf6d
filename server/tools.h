/* Tool calling: how tools reach the prompt, what the model may write when
 * it calls one, and how its text becomes message.tool_calls.
 *
 * The format. ebb's default model (ChatML, SmolLM2) has no tools section in
 * its chat template, so tools go in a generic system block and calls use
 * the widely trained Hermes/Qwen convention: each call is
 *
 *   <tool_call>
 *   {"name": "get_weather", "arguments": {"city": "Paris"}}
 *   </tool_call>
 *
 * and several calls follow one another, a newline apart. A result comes
 * back as a "tool" message whose content is wrapped in <tool_response>
 * tags, and an assistant message's tool_calls in the history are rendered
 * in the call format above, so a conversation reads the same way whether
 * the model wrote it or the client replays it. docs/api.md shows the block.
 *
 * The grammar (engine/grammar.h) makes the format hold: a call's JSON is one
 * of the tools' {"name": NAME, "arguments": ARGS} objects with ARGS valid
 * under that tool's parameters schema (server/json_schema.h; each tool's
 * $defs are renamed apart so tools cannot collide). tool_choice decides the
 * rest: "required" or a named function: calls only (the named one only);
 * "auto": calls, or a text answer, which then may not begin with '<'
 * (so the first byte decides which it is); "none": a text answer only.
 * parallel_tool_calls false allows one call.
 *
 * Output. A choice whose text begins with "<tool_call>" is a call list:
 * tools_parse_calls splits it into (name, arguments) pairs, the arguments
 * being the model's JSON text as written. Streams use struct tool_stream,
 * which turns the text as it grows into OpenAI's deltas: the function name
 * once it is complete, then argument fragments, holding back only what
 * could still be the call's closing "}" and tag.
 *
 * No I/O, no globals: any thread.
 */
#ifndef EBB_SERVER_TOOLS_H
#define EBB_SERVER_TOOLS_H
#include <stdbool.h>
#include <stddef.h>

#define TOOLS_MAX 128              /* tools in one request */
#define TOOLS_MAX_CALLS 16         /* calls in one answer when parallel */

struct oai_tool {
    char *name;                    /* [a-zA-Z0-9_-]{1,64} */
    char *description;             /* may be "" */
    char *parameters;              /* compact JSON Schema text ("{}" when none was given) */
};

enum tool_choice { TOOL_CHOICE_AUTO, TOOL_CHOICE_NONE, TOOL_CHOICE_REQUIRED, TOOL_CHOICE_NAMED };

/* GBNF for what the model may write (malloc'd), or NULL with err and
 * err_path (e.g. "tools[1].function.parameters.properties.x.pattern"). */
char *tools_gbnf(const struct oai_tool *tools, int n, enum tool_choice choice, int named, bool parallel,
                 char *err, size_t errlen, char *err_path, size_t pathlen);

/* The system block describing the tools (malloc'd), to go after any system
 * message the client sent. NULL when out of memory. */
char *tools_system_block(const struct oai_tool *tools, int n);

/* One call as the format spells it: "<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>"
 * (arguments: JSON text, written as given when it parses, else as a JSON
 * string). malloc'd; NULL when out of memory. */
char *tools_render_call(const char *name, const char *arguments);
/* A tool result's content, wrapped: "<tool_response>\n...\n</tool_response>". */
char *tools_render_response(const char *content, size_t len);

/* True when text (so far) is, or could still become, a call list. */
bool tools_text_is_call(const char *text, size_t len);

struct tool_call {
    char name[65];
    size_t args_start, args_end;   /* the arguments' JSON text: text[args_start .. args_end) */
};
/* Splits a call list into at most max calls: the number of complete calls
 * at its start (a last one cut short by max_tokens is left out), or -1 when
 * it does not start with one. */
int tools_parse_calls(const char *text, size_t len, struct tool_call *calls, int max);

/* Streaming. Feed the whole text so far (it only grows); the callbacks get
 * each call's name once and its argument bytes in order. */
struct tool_stream {
    int calls;                     /* calls whose name has been announced */
    bool announced;                /* the current block's name has been */
    size_t args_sent;              /* bytes of the current call's arguments already sent */
    size_t scanned;                /* where the current call's block starts */
};
typedef int (*tool_name_fn)(void *ud, int index, const char *name);
typedef int (*tool_args_fn)(void *ud, int index, const char *bytes, size_t len);
/* final: the text is complete (release everything). 0, or the first
 * nonzero callback result. */
int tool_stream_feed(struct tool_stream *s, const char *text, size_t len, bool final, tool_name_fn on_name,
                     tool_args_fn on_args, void *ud);
#endif
