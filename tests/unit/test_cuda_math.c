/* The CUDA kernels' arithmetic (kernels/cuda/hostdev.h), run on the CPU.
 *
 * The GPU kernels call the functions of hostdev.h for every element, block
 * and row they compute; only the thread layout is theirs. Here the same
 * functions are put together into an op table with the thread layouts'
 * orders written as plain loops -- a product's block integers computed last
 * block first, as lanes finish in any order, and folded in block order --
 * and tests/unit/opcompare.h holds that table against the scalar CPU path bit
 * for bit on random cases and edge shapes. So every build, with or without a
 * GPU or even nvcc, checks the math the CUDA path runs; tests/gpu checks the
 * kernels themselves where a device exists.
 *
 * Also checked: hostdev.h's half decoder against formats.c's on every one of
 * the 65,536 halves.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kernels/backend.h"
#include "kernels/cuda/hostdev.h"
#include "kernels/formats.h"
#include "emulated_device.h"
#include "opcompare.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---------------------------------------------------- the table, on the CPU */

/* backend_cuda.cu's decode kernel, its warp written out: per step, each
 * lane's part (hostdev.h), a block's parts summed over its lanes (the
 * shuffle reduction), the sums folded in order. */
static float hd_gemv_row(int type, const uint8_t *row, const struct ebb_hd_act *a, int n_in)
{
    const int lanes = ebb_hd_gemv_lanes(type), per_step = 32 / lanes, blocks = n_in / ebb_hd_block_elems(type);
    float acc = 0;
    for (int base = 0; base < blocks; base += per_step) {
        int32_t part[32];
        for (int lane = 31; lane >= 0; lane--) part[lane] = ebb_hd_gemv_part(type, row, a->q, blocks, base, lane);
        for (int k = 0; k < per_step && base + k < blocks; k++) {
            struct ebb_hd_ints r = {0, 0};
            for (int lane = k * lanes; lane < (k + 1) * lanes; lane++) r.a += part[lane];
            acc = ebb_hd_block_step(type, acc, row, a, base + k, r);
        }
    }
    return acc;
}

/* The products as the CUDA table runs them: the decode kernel's layout for
 * its types at up to 8 tokens, else the reference kernel's (a block's
 * integers in any order, folded in order). */
static void hd_matmul(int type, float *out, const struct ebb_act *x, const void *w, int n_tok, int n_in, int n_out)
{
    const size_t rb = ebb_row_bytes((uint32_t)type, (uint64_t)n_in);
    const int blocks = n_in / ebb_hd_block_elems(type);
    struct ebb_hd_ints *ints = malloc((size_t)blocks * sizeof *ints);
    if (!ints) abort();
    if (n_tok <= 8 && ebb_hd_tiled_type(type)) {
        for (int t = 0; t < n_tok; t++) {
            const struct ebb_hd_act a = ebb_hd_act_of(type, x->q, x->s, x->sums, n_in, t);
            for (int o = 0; o < n_out; o++)
                out[(size_t)t * n_out + o] = hd_gemv_row(type, (const uint8_t *)w + (size_t)o * rb, &a, n_in);
        }
        free(ints);
        return;
    }
    for (int t = 0; t < n_tok; t++) {
        const struct ebb_hd_act a = ebb_hd_act_of(type, x->q, x->s, x->sums, n_in, t);
        for (int o = 0; o < n_out; o++) {
            const uint8_t *row = (const uint8_t *)w + (size_t)o * rb;
            for (int b = blocks - 1; b >= 0; b--) ints[b] = ebb_hd_block_ints(type, row, &a, b);
            float acc = 0;
            for (int b = 0; b < blocks; b++) acc = ebb_hd_block_step(type, acc, row, &a, b, ints[b]);
            out[(size_t)t * n_out + o] = acc;
        }
    }
    free(ints);
}

#define HD_MATMUL(name, type) \
    static void hd_matmul_##name(struct ebb_pool *pool, float *out, const struct ebb_act *x, const void *w, \
                                 int n_tok, int n_in, int n_out) \
    { hd_matmul(type, out, x, w, n_tok, n_in, n_out); }
EBB_INT_PRODUCT_TYPES(HD_MATMUL)

static void hd_quantize_act(const float *x, int n_tok, int n, int n_hi, int8_t *q, float *s)
{
    const int groups = n / EBB_ACT_GROUP;
    for (int g = groups * n_tok - 1; g >= 0; g--)      /* one thread per group: any order */
        ebb_hd_quantize_run(x + (size_t)g * 64, 64, ebb_hd_act_qmax(g % groups, groups, n_hi), q + (size_t)g * 64,
                            s + g);
}

static void hd_quantize_q8b32(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    for (int b = n / 32 - 1; b >= 0; b--)
        sums[b] = (int16_t)ebb_hd_quantize_run(x + 32 * b, 32, b < n_hi ? 127.0f : 7.0f, q + 32 * b, d + b);
}

static void hd_quantize_q8b32_loudest(const float *x, int n, int n_hi, int8_t *q, float *d, int16_t *sums)
{
    const int blocks = n / 32;
    float amax[4096];
    for (int b = 0; b < blocks; b++) amax[b] = ebb_hd_block_amax(x + 32 * b, 32);
    for (int b = blocks - 1; b >= 0; b--)       /* one thread per block: any order */
        sums[b] = (int16_t)ebb_hd_quantize_run(x + 32 * b, 32, ebb_hd_is_loud(amax, blocks, n_hi, b) ? 127.0f : 7.0f,
                                               q + 32 * b, d + b);
}

static void hd_quantize_q8k(const float *x, int n, int8_t *q, float *d, int16_t *sums)
{
    for (int b = n / 256 - 1; b >= 0; b--) ebb_hd_quantize_q8k_block(x + 256 * b, q + 256 * b, d + b, sums + 16 * b);
}

static void hd_hadamard64(float *x, int n)
{
    for (int b = 0; b < n / 64; b++) ebb_hd_hadamard64(x + 64 * b);
}

static void hd_attn_scores(float *s, size_t s_stride, const float *q, size_t q_stride, int n_q, const float *k,
                           size_t k_stride, int n_rows, int n)
{
    for (int j = 0; j < n_q; j++)
        for (int r = 0; r < n_rows; r++)
            s[(size_t)j * s_stride + r] = ebb_hd_dot8(q + (size_t)j * q_stride, k + (size_t)r * k_stride, n);
}

static void hd_attn_values(float *y, const float *p, const float *v, size_t v_stride, int n_rows, int n)
{
    for (int i = 0; i < n; i++)                          /* one thread per channel, rows in order */
        for (int r = 0; r < n_rows; r++) y[i] = fmaf(p[r], v[(size_t)r * v_stride + i], y[i]);
}

static void hd_kv_rows_f16(float *out, const uint16_t *rows, size_t stride, int n_rows, int n)
{
    for (int r = 0; r < n_rows; r++)
        for (int i = 0; i < n; i++)
            out[(size_t)r * n + i] = ebb_hd_f16_at((const uint8_t *)rows + (size_t)r * stride + 2 * (size_t)i);
}

static void hd_kv_rows_q(float *out, const uint8_t *codes, const uint16_t *dm, size_t stride, int n_rows, int n,
                         int bits, int group)
{
    for (int r = 0; r < n_rows; r++)
        for (int i = 0; i < n; i++)
            out[(size_t)r * n + i] = ebb_hd_kv_value(codes + (size_t)r * stride, (const uint8_t *)dm + (size_t)r * stride,
                                                     bits, group, i);
}

static void hd_kv_rows_qc(float *out, const uint8_t *codes, size_t stride, const uint16_t *dm, int n_rows, int n,
                          int bits, int group)
{
    for (int r = 0; r < n_rows; r++)
        for (int i = 0; i < n; i++)
            out[(size_t)r * n + i] = ebb_hd_kv_value_channel(codes + (size_t)r * stride, dm, bits, group, i);
}

static void hd_bitstack_isums(int32_t *isum, const uint8_t *signs, int n_rows, const int8_t *t, int n_vec, int n)
{
    for (int o = 0; o < n_rows; o++)
        for (int v = 0; v < n_vec; v++)
            isum[(size_t)o * n_vec + v] = ebb_hd_sign_isum(signs + (size_t)o * (n / 8), t + (size_t)v * n, n);
}

static void hd_bitstack_codes(const float *x, const float *v, int n, int8_t *q, float *scale)
{
    float amax = 0;
    for (int i = n - 1; i >= 0; i--) amax = fmaxf(amax, fabsf(v[i] * x[i]));   /* a max: any order */
    const float inv = ebb_hd_act_inverse(amax, 127.0f, scale);
    for (int i = 0; i < n; i++) q[i] = (int8_t)ebb_hd_code(v[i] * x[i], inv);
}

static void hd_bitstack_scale_add(float *out, size_t out_stride, const int32_t *isum, int n_rows, int n_tok, int rank,
                                  const float *u, const float *ts)
{
    for (int o = 0; o < n_rows; o++)
        for (int t = 0; t < n_tok; t++)
            out[(size_t)t * out_stride + o] += ebb_hd_bitstack_scaled(isum + ((size_t)o * n_tok + t) * rank,
                                                                      u + (size_t)o * rank, ts + (size_t)t * rank, rank);
}

static void hd_get_rows(float *out, const void *table, uint32_t type, const int32_t *ids, int n_rows, int n)
{
    const size_t rb = ebb_row_bytes(type, (uint64_t)n);
    for (int r = 0; r < n_rows; r++)
        for (int i = n - 1; i >= 0; i--)
            out[(size_t)r * n + i] = ebb_hd_row_value((int)type, (const uint8_t *)table + (size_t)ids[r] * rb, i);
}

static void hd_permute(float *out, const float *x, const int32_t *perm, int n_tok, int n)
{
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < n; i++) out[(size_t)t * n + i] = x[(size_t)t * n + perm[i]];
}

static void hd_rope(float *x, size_t stride, int n_tok, int n_heads, int head_dim, int rope_dim, int neox,
                    const float *cos, const float *sin)
{
    const int half = rope_dim / 2;
    for (int t = 0; t < n_tok; t++)
        for (int h = n_heads - 1; h >= 0; h--)
            for (int i = half - 1; i >= 0; i--)     /* one thread per pair: any order */
                ebb_hd_rope_pair(x + (size_t)t * stride + (size_t)h * head_dim, i, half, neox, cos[(size_t)t * half + i],
                                 sin[(size_t)t * half + i]);
}

static void hd_scale(float *out, const float *x, float s, int n)
{
    for (int i = n - 1; i >= 0; i--) out[i] = x[i] * s;
}

static void hd_kv_store_row(uint8_t *row, const float *x, int n, int bits, int group, int rotate)
{
    if (bits == 32) {
        memcpy(row, x, (size_t)n * sizeof(float));
    } else if (bits == 16) {
        for (int i = n - 1; i >= 0; i--) {
            const uint16_t h = ebb_hd_to_f16(ebb_hd_clamp_f16_range(x[i]));
            memcpy(row + 2 * (size_t)i, &h, 2);
        }
    } else {
        for (int g = n / group - 1; g >= 0; g--)     /* one thread per group: any order */
            ebb_hd_kv_store_group(row, x, n, bits, group, rotate, g);
    }
}

static void hd_attend(const struct ebb_kv_pages *kv, int layer, int kvh, const float *q, float *out, size_t stride,
                      int n_tok, int n_head, int pos0, float scale, float *scratch)
{
    const int hd = kv->head_dim, S = pos0 + n_tok;
    float *work = malloc((4 + 2 * EBB_KV_SINK_TOKENS) * (size_t)hd * sizeof(float));
    float *parts = malloc(((size_t)S / EBB_HD_ATTEND_CHUNK + 1) * EBB_HD_ATTEND_PART(hd) * sizeof(float));
    for (int j = n_tok * n_head - 1; j >= 0; j--) {     /* one thread block per query: any order */
        const size_t at = (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
        const int pos = pos0 + j / n_head;
        if (pos >= EBB_HD_ATTEND_SPLIT_FROM)   /* the kernels' split over the sequence */
            ebb_hd_attend_query_split(kv, layer, kvh, q + at, out + at, pos, scale, scratch + (size_t)j * S, work, parts);
        else
            ebb_hd_attend_query(kv, layer, kvh, q + at, out + at, pos, scale, scratch + (size_t)j * S, work);
    }
    free(work);
    free(parts);
}

static const struct ebb_backend hd_table = {
    .name = "hostdev (CUDA arithmetic on the CPU)",
#define HD_ENTRY(name, type) [type] = hd_matmul_##name,
    .matmul = {EBB_INT_PRODUCT_TYPES(HD_ENTRY)},
#undef HD_ENTRY
    .quantize_act = hd_quantize_act,
    .quantize_q8b32 = hd_quantize_q8b32,
    .quantize_q8b32_loudest = hd_quantize_q8b32_loudest,
    .quantize_q8k = hd_quantize_q8k,
    .hadamard64 = hd_hadamard64,
    .attn_scores = hd_attn_scores,
    .attn_values = hd_attn_values,
    .kv_rows_f16 = hd_kv_rows_f16,
    .kv_rows_q = hd_kv_rows_q,
    .kv_rows_qc = hd_kv_rows_qc,
    .bitstack_isums = hd_bitstack_isums,
    .bitstack_codes = hd_bitstack_codes,
    .bitstack_scale_add = hd_bitstack_scale_add,
    .get_rows = hd_get_rows,
    .permute_f32 = hd_permute,
    .rope_f32 = hd_rope,
    .scale_f32 = hd_scale,
    .kv_store_row = hd_kv_store_row,
    .attend = hd_attend,
};

static void test_halves(void)
{
    int same = 1;
    for (uint32_t h = 0; h < 65536; h++) {
        const float a = ebb_hd_f16(h), b = ebb_f16_to_f32((uint16_t)h);
        same &= memcmp(&a, &b, sizeof a) == 0;
    }
    CHECK_MSG(same, "hostdev.h's half decoder differs from formats.c's");
    /* and the encoder, over floats of every exponent (a stride through the
     * bit patterns) and the edges: subnormal halves, ties, overflow, NaN */
    int enc_same = 1;
    for (uint64_t u = 0; u <= 0xffffffffu; u += 4099) {
        float f;
        const uint32_t b = (uint32_t)u;
        memcpy(&f, &b, 4);
        enc_same &= ebb_hd_to_f16(f) == ebb_f32_to_f16(f);
    }
    static const float edges[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 5.96e-8f, 2.98e-8f,
                                  2.9802322e-8f, 6.1035156e-5f, 6.1e-5f, 1.0009766f, 1.00048828125f, INFINITY, NAN};
    for (size_t i = 0; i < sizeof edges / sizeof *edges; i++) enc_same &= ebb_hd_to_f16(edges[i]) == ebb_f32_to_f16(edges[i]);
    CHECK_MSG(enc_same, "hostdev.h's half encoder differs from formats.c's");
}

/* The table's own entries must be the ones a kernel needs: a product for
 * every type the CPU has one for except f32 (cuBLASLt's), and each block
 * geometry equal to formats.c's. */
static void test_geometry(void)
{
    const struct ebb_backend *ref = ebb_backend_cpu_named("scalar");
    for (int type = 0; type < EBB_TYPE_COUNT_; type++) {
        if (!ref->matmul[type] || type == EBB_TYPE_F32) continue;
        const struct ebb_type_info *ti = ebb_type_info((uint32_t)type);
        CHECK_MSG(ebb_hd_type_has_product(type) && hd_table.matmul[type], "%s has no CUDA product", ti->name);
        CHECK_MSG((uint32_t)ebb_hd_block_elems(type) == ti->block_elems, "%s block elems", ti->name);
        CHECK_MSG((uint32_t)ebb_hd_block_bytes(type) == ti->block_bytes, "%s block bytes", ti->name);
    }
    /* every type the CPU can dequantize, the GPU can (the embedding's rows) */
    for (int type = 0; type < EBB_TYPE_COUNT_; type++) {
        const struct ebb_type_info *ti = ebb_type_info((uint32_t)type);
        if (!ti || !ti->to_f32) continue;
        CHECK_MSG((uint32_t)ebb_hd_block_elems(type) == ti->block_elems &&
                  (uint32_t)ebb_hd_block_bytes(type) == ti->block_bytes, "%s: no dequantizer for the GPU", ti->name);
    }
}

/* Asking for a GPU where there is none (this build without CUDA, or no
 * device or driver) is refused with the reason, the same from both entry
 * points; where a device exists, tests/gpu checks the rest. */
static void test_refusal(void)
{
    struct ebb_device_info dev[4];
    char why_devices[256] = "", why[256] = "";
    const int count = ebb_cuda_devices(dev, 4, why_devices, sizeof why_devices);
    const struct ebb_backend *cuda = ebb_backend_cuda(0, why, sizeof why);
    if (count > 0) {
        CHECK_MSG(cuda != NULL && cuda->memory != NULL, "device 0 listed, refused: %s", why);
        return;
    }
    CHECK(count == -1);
    CHECK(cuda == NULL);
#ifdef EBB_WITH_CUDA
    CHECK_MSG(strstr(why, "no CUDA device") != NULL, "refusal: \"%s\"", why);
#else
    CHECK_MSG(strstr(why, "built without CUDA") != NULL, "refusal: \"%s\"", why);
#endif
    CHECK_MSG(strcmp(why, why_devices) == 0, "\"%s\" vs \"%s\"", why, why_devices);
    printf("test_cuda_math: no GPU here: %s\n", why);
}

static void on_fault(int sig)
{
    (void)sig;
    _exit(42);
}

/* The emulated device (emulated_device.h): opcompare's device-memory paths --
 * the ones the GPU suite takes -- on every op, and a host write through one
 * of its pointers must fault (in a child process), or the emulator would not
 * catch what it is for. */
static void test_emulated_device(void)
{
    const struct ebb_backend *emu = emulated_device();
    if (!emu) {
        printf("test_cuda_math: this machine's pointers use bit 62; the emulated device is not checked\n");
        return;
    }
    oc_exact_softmax = 1;   /* both of this test's tables run the scalar softmax */
    CHECK_MSG(opcompare_all(ebb_backend_cpu_named("scalar"), emu) == 0, "the emulated device lacks an entry");
    fflush(stdout), fflush(stderr);
    const pid_t child = fork();
    if (child == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_fault;
        sigaction(SIGSEGV, &sa, NULL);
        sigaction(SIGBUS, &sa, NULL);
        volatile float *p = emu->memory->alloc(sizeof(float));
        *p = 1.0f;                                         /* must not work */
        _exit(0);
    }
    int status = 0;
    CHECK(child > 0 && waitpid(child, &status, 0) == child);
    CHECK_MSG(!(WIFEXITED(status) && WEXITSTATUS(status) == 0), "a host write to a device pointer did not fault");
}

/* The tensor-core kernel's warp program on the CPU, for every type it
 * takes (W4G64 against Q8G64 codes, the legacy GGUF types against Q8B32
 * codes, half their tokens with 4-bit blocks as a source-exact file's):
 * every lane's loads, an MMA emulated from hostdev.h's operand layout,
 * every lane's fold -- held against the scalar product bit for bit, on
 * shapes with partial token and row tiles. (Whether the layout is the
 * hardware's, the GPU suite says.) */
static void test_mma_tiles(void)
{
    const struct ebb_backend *ref = ebb_backend_cpu_named("scalar");
    static const uint32_t types[] = {EBB_TYPE_W4G64, EBB_TYPE_Q4_0, EBB_TYPE_Q4_1, EBB_TYPE_Q5_0, EBB_TYPE_Q5_1,
                                     EBB_TYPE_Q8_0};
    static const int shapes[][3] = {{16, 64, 8}, {37, 576, 192}, {9, 128, 100}, {33, 1536, 40}};
    for (size_t ty = 0; ty < sizeof types / sizeof *types; ty++)
        for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
            const uint32_t type = types[ty];
            const int n_tok = shapes[k][0], n_in = shapes[k][1], n_out = shapes[k][2];
            const int w4 = type == EBB_TYPE_W4G64, halves = w4 ? 2 : 1, blocks = n_in / (32 * halves);
            CHECK(ebb_hd_tiled_type((int)type));
            const size_t row_bytes = ebb_row_bytes(type, (uint64_t)n_in);
            uint8_t *w = malloc(row_bytes * n_out);
            for (int o = 0; o < n_out; o++) random_row(type, w + o * row_bytes, n_in);
            float *x = malloc((size_t)n_tok * n_in * sizeof(float)), *d = malloc((size_t)n_tok * (n_in / 32) * sizeof(float));
            int8_t *q = malloc((size_t)n_tok * n_in);
            int16_t *sums = malloc((size_t)n_tok * (n_in / 32) * sizeof(int16_t));
            for (int i = 0; i < n_tok * n_in; i++) x[i] = gauss() * (i % 97 == 0 ? 30.0f : 1.0f);
            if (w4) {
                ref->quantize_act(x, n_tok, n_in, blocks / 2, q, d);
            } else {
                for (int t = 0; t < n_tok; t++)
                    ref->quantize_q8b32(x + (size_t)t * n_in, n_in, t % 2 ? blocks / 2 : blocks, q + (size_t)t * n_in,
                                        d + (size_t)t * blocks, sums + (size_t)t * blocks);
            }
            float *want = malloc((size_t)n_tok * n_out * sizeof(float)), *got = calloc((size_t)n_tok * n_out, sizeof(float));
            const struct ebb_act act = {.q = q, .s = d, .sums = w4 ? NULL : sums};
            ref->matmul[type](NULL, want, &act, w, n_tok, n_in, n_out);
            for (int t0 = 0; t0 < n_tok; t0 += 16)
                for (int o_base = 0; o_base < n_out; o_base += 32)
                    for (int nt = 0; nt < 4; nt++) {
                        const int o0 = o_base + 8 * nt;
                        float acc[32][4] = {{0}};
                        for (int blk = 0; blk < blocks; blk++) {
                            uint32_t a[2][32][4], b[32][2];
                            int32_t c[32][4] = {{0}};
                            for (int kh = 0; kh < halves; kh++) {
                                for (int lane = 0; lane < 32; lane++) {
                                    ebb_hd_mma_load_a(a[kh][lane], q, n_in, n_tok, t0, 32 * (halves * blk + kh), lane);
                                    ebb_hd_mma_load_b((int)type, b[lane], w, row_bytes, n_out, o0, blk, kh, lane);
                                }
                                ebb_hd_mma_emulate((const uint32_t(*)[4])a[kh], (const uint32_t(*)[2])b, c);
                            }
                            for (int lane = 0; lane < 32; lane++)
                                ebb_hd_mma_fold((int)type, acc[lane], c[lane], w, row_bytes, q, d, w4 ? NULL : sums,
                                                n_tok, n_in, n_out, t0, o0, blk, lane);
                        }
                        for (int lane = 0; lane < 32; lane++)
                            for (int e = 0; e < 4; e++) {
                                const int t = t0 + ebb_hd_mma_c_tok(lane, e), o = o0 + ebb_hd_mma_c_row(lane, e);
                                if (t < n_tok && o < n_out) got[(size_t)t * n_out + o] = acc[lane][e];
                            }
                    }
            CHECK_MSG(memcmp(want, got, (size_t)n_tok * n_out * sizeof(float)) == 0, "MMA tiles, %s %d x %d x %d",
                      ebb_type_info(type)->name, n_tok, n_in, n_out);
            free(w), free(x), free(d), free(q), free(sums), free(want), free(got);
        }
    CHECK(!ebb_hd_tiled_type(EBB_TYPE_Q4_K) && !ebb_hd_tiled_type(EBB_TYPE_W2G64) && !ebb_hd_tiled_type(EBB_TYPE_F32));
    /* every (token, input) and (input, row) of a tile has exactly one lane and register */
    int a_seen[16][32] = {{0}}, b_seen[32][8] = {{0}}, c_seen[16][8] = {{0}};
    for (int lane = 0; lane < 32; lane++) {
        for (int r = 0; r < 4; r++)
            for (int k = 0; k < 4; k++) a_seen[ebb_hd_mma_a_tok(lane, r)][ebb_hd_mma_a_in(lane, r) + k]++;
        for (int r = 0; r < 2; r++)
            for (int k = 0; k < 4; k++) b_seen[ebb_hd_mma_b_in(lane, r) + k][ebb_hd_mma_b_row(lane)]++;
        for (int e = 0; e < 4; e++) c_seen[ebb_hd_mma_c_tok(lane, e)][ebb_hd_mma_c_row(lane, e)]++;
    }
    int once = 1;
    for (int i = 0; i < 16 * 32; i++) once &= (&a_seen[0][0])[i] == 1;
    for (int i = 0; i < 32 * 8; i++) once &= (&b_seen[0][0])[i] == 1;
    for (int i = 0; i < 16 * 8; i++) once &= (&c_seen[0][0])[i] == 1;
    CHECK_MSG(once, "the MMA operand layout covers a tile once");
}

int main(void)
{
    test_mma_tiles();
    test_emulated_device();
    test_refusal();
    test_halves();
    test_geometry();
    oc_attend_split_from = EBB_HD_ATTEND_SPLIT_FROM;   /* from there on, the split's float order */
    const int skipped = opcompare_all(ebb_backend_cpu_named("scalar"), &hd_table);
    /* f32 products and the f32 vector ops are the kernels' own (reductions
     * in the GPU's order, its expf): the GPU suite compares those. */
    CHECK_MSG(skipped == 5, "expected exactly the five f32 entries uncompared, got %d", skipped);
    return check_report("test_cuda_math");
}
