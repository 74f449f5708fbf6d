/* ebb-pack: the packer as a program of its own. `ebb pack ARGS` executes it
 * with the same arguments (server/main.c), so that only this program links
 * the packer (tools/pack/) and LAPACK/OpenBLAS, never `ebb` and its daemon.
 * Run directly it behaves exactly as `ebb pack`; its messages say so. */
#include "server/cli.h"

int main(int argc, char **argv) {
    return cmd_pack(argc, argv);
}
