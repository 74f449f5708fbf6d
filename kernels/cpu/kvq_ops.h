/* Private to kernels/cpu: the KV-cache row ops (backend.h, "KV cache rows").
 *
 * They live in their own files (kvq_ops_scalar.c, kvq_ops_avx2.c) rather
 * than in the ISA tables of ops_*.c, and backend_cpu.c adds them to each
 * table when it hands one out. The AVX2 versions cover groups of 64 (every
 * head size that is a multiple of 64) and call the scalar ones for smaller
 * groups, so the scalar functions are exported here.
 */
#ifndef EBB_KERNELS_CPU_KVQ_OPS_H
#define EBB_KERNELS_CPU_KVQ_OPS_H
#include "kernels/backend.h"

/* Sets the kv_* fields of be. */
void ebb_cpu_kvq_ops_scalar(struct ebb_backend *be);
void ebb_cpu_kvq_ops_avx2(struct ebb_backend *be);

void ebb_kv_dot_q8_scalar(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                          int n_rows, int n, int group);
void ebb_kv_axpy_q8_scalar(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                           int n_rows, int n, int group);
void ebb_kv_dot_q4_scalar(float *out, const float *x, const uint8_t *codes, const uint16_t *dm, size_t stride,
                          int n_rows, int n, int group);
void ebb_kv_axpy_q4_scalar(float *y, const float *w, const uint8_t *codes, const uint16_t *dm, size_t stride,
                           int n_rows, int n, int group);
#endif
