/* Private to kernels/cpu: the attention and KV-row ops (backend.h,
 * "attention over the KV cache").
 *
 * They live in their own files (kvq_ops_scalar.c, kvq_ops_avx2.c) rather
 * than in the ISA tables of ops_*.c, and backend_cpu.c adds them to each
 * table when it hands one out. The AVX2 row conversions cover groups of 64
 * (every head size that is a multiple of 64) and call the scalar ones for
 * smaller groups, so those are exported here.
 */
#ifndef EBB_KERNELS_CPU_KVQ_OPS_H
#define EBB_KERNELS_CPU_KVQ_OPS_H
#include "kernels/backend.h"

/* Sets the attn_* and kv_rows_* fields of be. */
void ebb_cpu_kvq_ops_scalar(struct ebb_backend *be);
void ebb_cpu_kvq_ops_avx2(struct ebb_backend *be);

void ebb_kv_rows_q8_scalar(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                           int group);
void ebb_kv_rows_q4_scalar(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                           int group);
#endif
