/* Native GGUF products on AMX: the AVX-512 VNNI path (native_avx512.c,
 * included here under its own name) with the legacy types' products of 3
 * tokens or more, Q4_K's and Q5_K's of 9 or more, and ebb's W4G64's of 2 or
 * more (its entry is here too), on Intel's tile unit (native_x86.h, "on
 * AMX"). Everything else -- decode's tiles, the other K-quants, the
 * quantizers -- is the AVX-512 code, compiled again with the tile
 * instructions allowed. Only processors that report AMX-INT8
 * and whose kernel grants the tile state (backend_cpu.c) take this path.
 */
#define NX_ISA amx
#define NX_AMX
#include "kernels/cpu/native_avx512.c"
