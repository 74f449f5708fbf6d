/* ebb: one binary, subcommands. main() only dispatches; each subcommand lives
 * in its own file (server/cmd_*.c) with its own --help. */
#include <stdio.h>
#include <string.h>

#include "server/cli.h"

struct subcommand {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

static const struct subcommand commands[] = {
    {"generate", cmd_generate, "generate text from a prompt or a chat message"},
    {"tokenize", cmd_tokenize, "print the token ids of a text"},
    {"ppl", cmd_ppl, "perplexity of a model over a text file"},
    {"bench", cmd_bench, "prefill and decode speed"},
    {"inspect", cmd_inspect, "show a GGUF file's metadata and tensors"},
    {"logits", cmd_logits, "write raw logits for token ids (for reference checks)"},
    {"serve", cmd_serve, "run the HTTP daemon"},
    {"models", cmd_models, "list, add or remove catalog models"},
    {"pack", cmd_pack, "pack a model into a compressed variant"},
};

static void usage(FILE *out) {
    fprintf(out, "usage: ebb COMMAND [options]   (ebb COMMAND --help for details)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "ebb: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
