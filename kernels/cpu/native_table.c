/* The native GGUF types as op-table entries: each path's rectangles
 * (native_scalar.c, native_avx2.c, native_avx512.c) behind the one matmul
 * driver of backend_cpu.c.
 *
 * Built without instruction-set flags: it only adapts the driver's
 * rectangle arguments to native.h's and calls the path's rectangle, which
 * lives in its own translation unit. Rows are handed out in multiples of 8
 * (the decode tile's height, so no tile computes rows it then drops), 16 on
 * AMX (its tiles' height, which a verification pass of a few tokens takes
 * too), and tokens in multiples of 4 (the prefill tiles' widths).
 */
#include "kernels/cpu/native.h"
#include "kernels/cpu/ops.h"

#define NATIVE_ENTRY(type, TYPE, isa) NATIVE_ENTRY_ALIGNED(type, TYPE, isa, 8)
#define NATIVE_ENTRY_ALIGNED(type, TYPE, isa, row_align) \
    static void block_##type##_##isa(const struct matmul_args *a, int t0, int t1, int o0, int o1) \
    { \
        const struct ebb_native_matmul_args n = {a->out, a->x.q, a->x.s, a->x.sums, a->w, a->row_bytes, \
                                                 a->n_tok, a->n_in, a->n_out}; \
        ebb_native_block_##type##_##isa(&n, t0, t1, o0, o1); \
    } \
    EBB_CPU_MATMUL(ebb_cpu_matmul_##type##_##isa, TYPE, block_##type##_##isa, row_align, 4)

#define NATIVE_ENTRY_scalar(type, TYPE) NATIVE_ENTRY(type, TYPE, scalar)
#define NATIVE_ENTRY_avx2(type, TYPE) NATIVE_ENTRY(type, TYPE, avx2)
#define NATIVE_ENTRY_avx512(type, TYPE) NATIVE_ENTRY(type, TYPE, avx512)
#define NATIVE_ENTRY_amx(type, TYPE) NATIVE_ENTRY_ALIGNED(type, TYPE, amx, 16)
#define NATIVE_PATH(isa) EBB_NATIVE_PRODUCT_TYPES(NATIVE_ENTRY_##isa)

NATIVE_PATH(scalar)
#if defined(__x86_64__) || defined(__i386__)
NATIVE_PATH(avx2)
NATIVE_PATH(avx512)
NATIVE_PATH(amx)
#endif
