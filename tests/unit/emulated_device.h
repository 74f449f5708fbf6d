/* A device on the CPU, for testing code that drives a backend with its own
 * memory (kernels/backend.h's struct ebb_backend_memory) without a GPU.
 *
 * It wraps the scalar CPU table. Its "device pointers" are host pointers
 * with bit 62 set: not canonical x86-64 (or AArch64) addresses, so host code
 * that reads or writes one directly -- the mistake a port to a GPU makes --
 * faults at once instead of silently working as it would on the CPU. Every
 * op clears the bit of each pointer it is given and runs the scalar op;
 * upload and download copy through the cleared pointers. The results are
 * the scalar path's bits, so anything driven through this table can be held
 * against the CPU path exactly.
 *
 * Uses: tests/unit/test_cuda_math.c runs opcompare's device-memory paths on
 * it (the same paths the GPU suite takes on a device), and checks that a
 * host access to one of its pointers does fault.
 */
#ifndef EBB_TEST_EMULATED_DEVICE_H
#define EBB_TEST_EMULATED_DEVICE_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda/hostdev.h"

#define EMU_TAG ((uintptr_t)1 << 62)

static const struct ebb_backend *emu_cpu;   /* the scalar table it runs */

static void *emu_dev(const void *host) { return (void *)((uintptr_t)host | EMU_TAG); }

/* The host address behind a device pointer; NULL stays NULL. A pointer that
 * is not the emulator's (a host pointer passed to an op by mistake) aborts. */
static void *emu_host(const void *dev)
{
    if (!dev) return NULL;
    if (!((uintptr_t)dev & EMU_TAG)) abort();
    return (void *)((uintptr_t)dev & ~EMU_TAG);
}

#define H(p) emu_host(p)

static void *emu_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    return p ? emu_dev(p) : NULL;
}
static void emu_release(void *p) { free(emu_host(p)); }
/* A device lost for good (a kernel that faulted, as CUDA reports it): every
 * later sync, upload and download fails with the reason. Tests set it. */
static int emu_lost;

static int emu_upload(void *dst, const void *src, size_t bytes)
{
    if (emu_lost) return -1;
    memcpy(H(dst), src, bytes);
    return 0;
}
static int emu_download(void *dst, const void *src, size_t bytes)
{
    if (emu_lost) return -1;
    memcpy(dst, H(src), bytes);
    return 0;
}
static int emu_sync(void) { return emu_lost ? -1 : 0; }
static const char *emu_error(void) { return emu_lost ? "emulated device lost (a test broke it)" : "no error"; }

static void emu_copy(void *dst, const void *src, size_t bytes) { memcpy(H(dst), H(src), bytes); }
static void emu_zero(void *dst, size_t bytes) { memset(H(dst), 0, bytes); }

static const struct ebb_backend_memory emu_memory = {emu_alloc, emu_release, emu_upload, emu_download, emu_sync,
                                                      emu_error, emu_copy, emu_zero};

static void emu_matmul(int type, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in, int n_out)
{
    const struct ebb_act hx = {H(x->f), H(x->q), H(x->s), H(x->sums)};
    emu_cpu->matmul[type](NULL, H(out), &hx, H(w), n_tok, n_in, n_out);
}

#define EMU_MATMUL(name, type) \
    static void emu_matmul_##name(struct ebb_pool *pool, float *out, const struct ebb_act *x, const void *w, \
                                  int n_tok, int n_in, int n_out) \
    { emu_matmul(type, out, x, w, n_tok, n_in, n_out); }
EBB_PRODUCT_TYPES(EMU_MATMUL)

static void emu_rmsnorm(float *out, const float *x, const float *g, int n, float eps)
{ emu_cpu->rmsnorm_f32(H(out), H(x), H(g), n, eps); }
static void emu_softmax(float *x, int n) { emu_cpu->softmax_f32(H(x), n); }
static void emu_swiglu(float *gate, const float *up, int n) { emu_cpu->swiglu_f32(H(gate), H(up), n); }
static void emu_add(float *y, const float *x, int n) { emu_cpu->add_f32(H(y), H(x), n); }
static void emu_quantize_act(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{ emu_cpu->quantize_act(H(x), n_tok, n, n_hi, H(q), H(s)); }
static void emu_quantize_q8b32(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{ emu_cpu->quantize_q8b32(H(x), n, n_hi, H(q), H(d), H(sums)); }
static void emu_quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{ emu_cpu->quantize_q8b32_loudest(H(x), n, n_hi, H(q), H(d), H(sums)); }
static void emu_quantize_q8k(const float *x, int n, int8_t *q, float *d, int16_t *sums)
{ emu_cpu->quantize_q8k(H(x), n, H(q), H(d), H(sums)); }
static void emu_hadamard64(float *x, int n) { emu_cpu->hadamard64(H(x), n); }
static void emu_get_rows(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n)
{ emu_cpu->get_rows(H(out), H(table), type, H(ids), n_rows, n); }
static void emu_permute(float *out, const float *x, const int32_t *perm, int n_tok, int n)
{ emu_cpu->permute_f32(H(out), H(x), H(perm), n_tok, n); }
static void emu_rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                     const float *cos, const float *sin)
{ emu_cpu->rope_f32(H(x), stride, n_tok, n_heads, head_dim, rope_dim, neox, H(cos), H(sin)); }
static void emu_scale(float *out, const float *x, float s, int n) { emu_cpu->scale_f32(H(out), H(x), s, n); }
static void emu_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{ emu_cpu->kv_store_row(H(row), H(x), n, bits, group, rotate); }
static void emu_attn_scores(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                            size_t k_stride, int n_rows, int n)
{ emu_cpu->attn_scores(H(s), s_stride, H(q), q_stride, n_q, H(k), k_stride, n_rows, n); }
static void emu_attn_values(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n)
{ emu_cpu->attn_values(H(y), H(p), H(v), v_stride, n_rows, n); }
static void emu_kv_rows_f16(float *out, const uint16_t *rows, size_t stride, int n_rows, int n)
{ emu_cpu->kv_rows_f16(H(out), H(rows), stride, n_rows, n); }
static void emu_kv_rows_q(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                          int bits, int group)
{ emu_cpu->kv_rows_q(H(out), H(codes), H(dm), stride, n_rows, n, bits, group); }
static void emu_kv_rows_qc(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                           int bits, int group)
{ emu_cpu->kv_rows_qc(H(out), H(codes), stride, H(dm), n_rows, n, bits, group); }
static void emu_bitstack_isums(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n)
{ emu_cpu->bitstack_isums(H(isum), H(signs), n_rows, H(t), n_vec, n); }
static void emu_bitstack_codes(const float *x, const float *v, int n, int8_t *q, float *scale)
{ emu_cpu->bitstack_codes(H(x), H(v), n, H(q), H(scale)); }
static void emu_bitstack_scale_add(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok,
                                   int rank, const float *u, const float *ts)
{ emu_cpu->bitstack_scale_add(H(out), out_stride, H(isum), n_rows, n_tok, rank, H(u), H(ts)); }
/* The fused attention: hostdev.h's, query by query, over the cache with
 * every page pointer in its tables cleared of the tag. */
static void emu_attend(const struct ebb_kv_pages *kv, int layer, int kvh, const float *q, float *out, size_t stride,
                       int n_tok, int n_head, int pos0, float scale, float *scratch)
{
    struct ebb_kv_pages v = *kv;
    const uint8_t **body = malloc((size_t)kv->n_pages * sizeof *body + 1);
    const float **window = malloc((size_t)kv->n_pages * sizeof *window + 1);
    float *work = malloc((4 + 2 * EBB_KV_SINK_TOKENS) * (size_t)kv->head_dim * sizeof(float));
    if (!body || !window || !work) abort();
    const uint8_t *const *tb = H(kv->body);
    const float *const *tw = H(kv->window);
    for (int p = 0; p < kv->n_pages; p++) {
        body[p] = H(tb[p]);
        window[p] = tw ? H(tw[p]) : NULL;
    }
    v.body = body;
    v.window = window;
    v.sink = H(kv->sink);
    const int hd = kv->head_dim, S = pos0 + n_tok;
    for (int j = 0; j < n_tok * n_head; j++) {
        const size_t at = (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
        ebb_hd_attend_query(&v, layer, kvh, (const float *)H(q) + at, (float *)H(out) + at, pos0 + j / n_head, scale,
                            (float *)H(scratch) + (size_t)j * S, work);
    }
    free(body), free(window), free(work);
}
#undef H

/* The table; NULL if this machine's pointers already use bit 62. */
static const struct ebb_backend *emulated_device(void)
{
    static struct ebb_backend b;
    emu_cpu = ebb_backend_cpu_named("scalar");
    void *probe = malloc(1);
    const int usable = probe && !((uintptr_t)probe & EMU_TAG);
    free(probe);
    if (!usable) return NULL;
    memset(&b, 0, sizeof b);
    b.name = "emulated device (scalar ops on tagged pointers)";
    b.memory = &emu_memory;
#define SET_MATMUL(name, type) b.matmul[type] = emu_matmul_##name;
    EBB_PRODUCT_TYPES(SET_MATMUL)
#undef SET_MATMUL
    b.rmsnorm_f32 = emu_rmsnorm;
    b.softmax_f32 = emu_softmax;
    b.swiglu_f32 = emu_swiglu;
    b.add_f32 = emu_add;
    b.quantize_act = emu_quantize_act;
    b.quantize_q8b32 = emu_quantize_q8b32;
    b.quantize_q8b32_loudest = emu_quantize_q8b32_loudest;
    b.quantize_q8k = emu_quantize_q8k;
    b.hadamard64 = emu_hadamard64;
    b.get_rows = emu_get_rows;
    b.permute_f32 = emu_permute;
    b.rope_f32 = emu_rope;
    b.scale_f32 = emu_scale;
    b.kv_store_row = emu_kv_store_row;
    b.attend = emu_attend;
    b.attn_scores = emu_attn_scores;
    b.attn_values = emu_attn_values;
    b.kv_rows_f16 = emu_kv_rows_f16;
    b.kv_rows_q = emu_kv_rows_q;
    b.kv_rows_qc = emu_kv_rows_qc;
    b.bitstack_isums = emu_bitstack_isums;
    b.bitstack_codes = emu_bitstack_codes;
    b.bitstack_scale_add = emu_bitstack_scale_add;
    return &b;
}
#endif
