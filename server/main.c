/* ebb: one binary, subcommands. main() only dispatches; each subcommand lives
 * in its own file (server/cmd_*.c) with its own --help, except that `pack`
 * executes the program ebb-pack (run_pack below). */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "server/cli.h"

/* `ebb pack` is a program of its own, ebb-pack, so that this binary (and the
 * daemon it runs) links neither the packer nor LAPACK/OpenBLAS. It runs the
 * ebb-pack in the directory of this binary's real path (/proc/self/exe:
 * symbolic links resolved), never one found on PATH, which could be another
 * version's, with the same arguments; its exit status is the command's.
 * 127 when it cannot be run, as a shell says for a missing command. */
static int run_pack(int argc, char **argv) {
    static const char name[] = "ebb-pack";
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path);
    if (n < 0 || (size_t)n >= sizeof path) {
        fprintf(stderr, "ebb pack: cannot find this program's own path (/proc/self/exe): %s\n",
                n < 0 ? strerror(errno) : "too long");
        return 127;
    }
    path[n] = 0;
    char *slash = strrchr(path, '/');
    if (!slash || (size_t)(slash + 1 - path) + sizeof name > sizeof path) {
        fprintf(stderr, "ebb pack: cannot place %s beside %s\n", name, path);
        return 127;
    }
    memcpy(slash + 1, name, sizeof name);
    (void)argc;
    argv[0] = path;   /* argv[argc] is NULL, as execv wants */
    execv(path, argv);
    fprintf(stderr,
            "ebb pack: cannot run the packer %s: %s\n"
            "  (`ebb pack` is the separate program ebb-pack, built and installed beside ebb:\n"
            "   cmake --build build --target ebb-pack, or install -m 755 build/ebb-pack next to ebb)\n",
            path, strerror(errno));
    return 127;
}

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
    {"devices", cmd_devices, "the CPU path and the CUDA devices this build can use"},
    {"pack", run_pack, "pack a model into a compressed variant (runs ebb-pack)"},
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
