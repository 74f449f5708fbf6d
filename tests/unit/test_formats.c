/* Tests for kernels/formats.c: half-precision conversions, the type table and
 * row sizes, and a few hand-decoded blocks.
 *
 * References are independent of the code under test: f16 values are decoded
 * with the textbook formula (ldexp), f32 -> f16 rounding is checked against
 * the exhaustive nearest-half search over neighbours and, when the CPU has
 * F16C, against the hardware conversion; type geometry is the GGUF spec's.
 * The full dequantizers are checked against the gguf Python package in
 * tests/reference/test_dequant.py.
 */
#include "kernels/formats.h"
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* The value of a half by the IEEE 754 definition. */
static double half_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp(m, -24);
    else v = ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

static void test_f16_decode_all(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float got = ebb_f16_to_f32((uint16_t)h);
        double want = half_value((uint16_t)h);
        if (isnan(want)) {
            /* NaN stays NaN, sign kept, payload moved to the top of the f32 mantissa. */
            if (!isnan(got) || (f32_bits(got) >> 31) != (h >> 15) ||
                ((f32_bits(got) >> 13) & 1023) != (h & 1023)) bad++;
        } else if ((double)got != want || !signbit(got) != !signbit(want)) {
            bad++;
        }
    }
    CHECK_MSG(bad == 0, "%d halves decoded wrongly", bad);
}

static void test_f16_round_trip_all(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t back = ebb_f32_to_f16(ebb_f16_to_f32((uint16_t)h));
        int is_nan = ((h >> 10) & 31) == 31 && (h & 1023);
        if (is_nan) {
            /* Quietened, same sign and payload otherwise. */
            if ((back & 0x7c00) != 0x7c00 || !(back & 0x3ff) || (back & 0x8000) != (h & 0x8000) ||
                ((back | 0x200) != (h | 0x200))) bad++;
        } else if (back != h) {
            bad++;
        }
    }
    CHECK_MSG(bad == 0, "%d halves did not survive f16 -> f32 -> f16", bad);
}

/* Is h the correctly rounded (nearest, ties to even) half for finite f? */
static int is_nearest_half(float f, uint16_t h)
{
    double x = f;
    if ((h & 0x7fff) == 0x7c00) return fabs(x) >= 65520.0 && !!signbit(f) == (h >> 15);
    if ((h & 0x7c00) == 0x7c00) return 0;                      /* nan for a finite input */
    double v = half_value(h);
    if (!signbit(v) != !signbit(x) && x != 0 && v != 0) return 0;
    double err = fabs(x - v);
    /* Neighbours in magnitude; compare distances. */
    uint16_t mag = h & 0x7fff, sign = h & 0x8000;
    if (mag == 0x7bff && fabs(x) >= 65520.0) return 0;        /* should have overflowed */
    for (int d = -1; d <= 1; d += 2) {
        int nm = (int)mag + d;
        if (nm < 0 || nm > 0x7bff) continue;
        double nv = half_value((uint16_t)(sign | nm));
        double nerr = fabs(x - nv);
        if (nerr < err) return 0;
        if (nerr == err && (mag & 1)) return 0;               /* tie must go to even */
    }
    if (mag == 0 && x != 0) {                                  /* zero: also try the other sign's 1 */
        if (fabs(x) > ldexp(1, -25)) return 0;
        if (fabs(x) == ldexp(1, -25)) return 1;                /* tie between 0 and 1: even is 0 */
    }
    return 1;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}
/* F16C is VEX-encoded: needs the CPU bit and the OS saving the AVX state. */
static int have_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & bit_F16C) || !(c & bit_OSXSAVE) || !(c & bit_AVX)) return 0;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6) == 6;
}
#else
static uint16_t hw_f32_to_f16(float f) { (void)f; return 0; }
static int have_f16c(void) { return 0; }
#endif

static void test_f32_to_f16_rounding(void)
{
    int bad = 0, bad_hw = 0, hw = have_f16c();
    /* A sweep over all exponents (stride through the bit patterns) plus random
     * bits concentrated in the half range, where rounding happens. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t k = 0; k < 2000000; k++) {
            uint32_t u;
            if (pass == 0) u = (uint32_t)(k * 2147u);               /* covers all 2^32 strided */
            else u = (rnd32() & 0x8fffffffu) | 0x30000000u;        /* exponents ~2^-31 .. 2^+32 */
            float f = bits_f32(u);
            if (isnan(f)) continue;
            uint16_t h = ebb_f32_to_f16(f);
            if (!is_nearest_half(f, h)) {
                if (bad < 5) fprintf(stderr, "f32 %08x (%g) -> f16 %04x\n", u, f, h);
                bad++;
            }
            if (hw && hw_f32_to_f16(f) != h) bad_hw++;
        }
    }
    CHECK_MSG(bad == 0, "%d floats rounded to a half that is not the nearest (ties even)", bad);
    CHECK_MSG(bad_hw == 0, "%d floats differ from the F16C conversion", bad_hw);
    if (!hw) printf("test_formats: no F16C on this CPU, hardware cross-check skipped\n");
}

static void test_f32_to_f16_specials(void)
{
    CHECK(ebb_f32_to_f16(0.0f) == 0x0000);
    CHECK(ebb_f32_to_f16(-0.0f) == 0x8000);
    CHECK(ebb_f32_to_f16(1.0f) == 0x3c00);
    CHECK(ebb_f32_to_f16(-2.0f) == 0xc000);
    CHECK(ebb_f32_to_f16(65504.0f) == 0x7bff);                /* largest half */
    CHECK(ebb_f32_to_f16(65519.99f) == 0x7bff);
    CHECK(ebb_f32_to_f16(65520.0f) == 0x7c00);                /* tie, rounds to even = inf */
    CHECK(ebb_f32_to_f16(1e10f) == 0x7c00);
    CHECK(ebb_f32_to_f16(-1e10f) == 0xfc00);
    CHECK(ebb_f32_to_f16(INFINITY) == 0x7c00);
    CHECK(ebb_f32_to_f16(-INFINITY) == 0xfc00);
    uint16_t n = ebb_f32_to_f16(NAN);
    CHECK((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
    CHECK(ebb_f32_to_f16(ldexpf(1, -14)) == 0x0400);          /* smallest normal */
    CHECK(ebb_f32_to_f16(ldexpf(1, -24)) == 0x0001);          /* smallest subnormal */
    CHECK(ebb_f32_to_f16(ldexpf(1, -25)) == 0x0000);          /* tie -> even (0) */
    CHECK(ebb_f32_to_f16(ldexpf(1.0001f, -25)) == 0x0001);
    CHECK(ebb_f32_to_f16(ldexpf(3, -25)) == 0x0002);          /* 1.5 units -> 2 */
    CHECK(ebb_f32_to_f16(ldexpf(5, -25)) == 0x0002);          /* 2.5 units -> 2 */
    CHECK(ebb_f32_to_f16(ldexpf(1023.5f, -24)) == 0x0400);    /* subnormal rounds up to normal */
    CHECK(ebb_f32_to_f16(ldexpf(1, -30)) == 0x0000);
    CHECK(ebb_f32_to_f16(-ldexpf(1, -30)) == 0x8000);
    CHECK(ebb_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);   /* tie between 1 and 1+2^-10 -> even */
    CHECK(ebb_f32_to_f16(1.0f + ldexpf(3, -11)) == 0x3c02);   /* tie -> even (2) */
    CHECK(ebb_f32_to_f16(bits_f32(0x00000001)) == 0x0000);    /* f32 subnormal */
    CHECK(ebb_f16_to_f32(0x7c00) == INFINITY);
    CHECK(ebb_f16_to_f32(0xfc00) == -INFINITY);
    CHECK(isnan(ebb_f16_to_f32(0x7e00)));
    CHECK(ebb_f16_to_f32(0x0001) == ldexpf(1, -24));
    CHECK(ebb_f16_to_f32(0x83ff) == -ldexpf(1023, -24));
    CHECK(signbit(ebb_f16_to_f32(0x8000)) && ebb_f16_to_f32(0x8000) == 0);
}

static void test_bf16(void)
{
    CHECK(ebb_bf16_to_f32(0x3f80) == 1.0f);
    CHECK(ebb_bf16_to_f32(0xc000) == -2.0f);
    CHECK(ebb_bf16_to_f32(0x7f80) == INFINITY);
    CHECK(ebb_bf16_to_f32(0xff80) == -INFINITY);
    CHECK(isnan(ebb_bf16_to_f32(0x7fc0)));
    CHECK(isnan(ebb_bf16_to_f32(0xffc1)));
    CHECK(ebb_bf16_to_f32(0x0001) == ldexpf(1, -133));         /* bf16 subnormal */
    CHECK(signbit(ebb_bf16_to_f32(0x8000)));
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ebb_bf16_to_f32((uint16_t)h);
        /* bf16 is the top half of an f32: the low 16 bits are zero and the
         * value's top half is the input. */
        if (f32_bits(f) != (h << 16)) bad++;
    }
    CHECK_MSG(bad == 0, "%d bf16 values decoded wrongly", bad);
    /* The BF16 row converter agrees with the scalar one. */
    uint8_t raw[8] = { 0x80, 0x3f, 0x00, 0xc0, 0x80, 0x7f, 0x49, 0x40 };
    float out[4];
    ebb_type_info(EBB_TYPE_BF16)->to_f32(raw, out, 4);
    CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == INFINITY);
    CHECK(out[3] == bits_f32(0x40490000u));                     /* 3.140625 */
}

/* Block geometry from the GGUF specification (ggml_type sizes). */
static void test_type_table(void)
{
    static const struct { uint32_t type; const char *name; uint32_t elems, bytes; int computes; } spec[] = {
        { EBB_TYPE_F32, "F32", 1, 4, 1 },      { EBB_TYPE_F16, "F16", 1, 2, 1 },
        { EBB_TYPE_Q4_0, "Q4_0", 32, 18, 1 },  { EBB_TYPE_Q4_1, "Q4_1", 32, 20, 1 },
        { EBB_TYPE_Q5_0, "Q5_0", 32, 22, 1 },  { EBB_TYPE_Q5_1, "Q5_1", 32, 24, 1 },
        { EBB_TYPE_Q8_0, "Q8_0", 32, 34, 1 },  { EBB_TYPE_Q2_K, "Q2_K", 256, 84, 1 },
        { EBB_TYPE_Q3_K, "Q3_K", 256, 110, 1 }, { EBB_TYPE_Q4_K, "Q4_K", 256, 144, 1 },
        { EBB_TYPE_Q5_K, "Q5_K", 256, 176, 1 }, { EBB_TYPE_Q6_K, "Q6_K", 256, 210, 1 },
        { EBB_TYPE_I8, "I8", 1, 1, 0 },        { EBB_TYPE_I16, "I16", 1, 2, 0 },
        { EBB_TYPE_I32, "I32", 1, 4, 0 },      { EBB_TYPE_F64, "F64", 1, 8, 0 },
        { EBB_TYPE_BF16, "BF16", 1, 2, 1 },
    };
    int known = 0;
    for (size_t i = 0; i < sizeof spec / sizeof *spec; i++) {
        const struct ebb_type_info *ti = ebb_type_info(spec[i].type);
        CHECK_MSG(ti != NULL, "type %u missing", spec[i].type);
        if (!ti) continue;
        CHECK_MSG(strcmp(ti->name, spec[i].name) == 0, "type %u named %s", spec[i].type, ti->name);
        CHECK_MSG(ti->block_elems == spec[i].elems && ti->block_bytes == spec[i].bytes,
                  "%s geometry %u/%u", ti->name, ti->block_elems, ti->block_bytes);
        CHECK_MSG((ti->to_f32 != NULL) == spec[i].computes, "%s to_f32", ti->name);
    }
    for (uint32_t t = 0; t < 64; t++) known += ebb_type_info(t) != NULL;
    CHECK_MSG(known == (int)(sizeof spec / sizeof *spec), "%d known types, expected %zu", known,
              sizeof spec / sizeof *spec);
    CHECK(ebb_type_info(4) == NULL);            /* removed Q4_2 */
    CHECK(ebb_type_info(EBB_TYPE_COUNT_) == NULL);
    CHECK(ebb_type_info(UINT32_MAX) == NULL);
}

static void test_row_bytes(void)
{
    CHECK(ebb_row_bytes(EBB_TYPE_F32, 0) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_F32, 3) == 12);
    CHECK(ebb_row_bytes(EBB_TYPE_F16, 577) == 1154);
    CHECK(ebb_row_bytes(EBB_TYPE_BF16, 1) == 2);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_0, 32) == 18);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_0, 31) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_0, 33) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_1, 576) == 18 * 20);
    CHECK(ebb_row_bytes(EBB_TYPE_Q8_0, 49152) == 1536 * 34);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_K, 256) == 144);
    CHECK(ebb_row_bytes(EBB_TYPE_Q4_K, 255) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_Q6_K, 576) == 0);                  /* 576 is not a multiple of 256 */
    CHECK(ebb_row_bytes(EBB_TYPE_Q6_K, 1536) == 6 * 210);
    CHECK(ebb_row_bytes(EBB_TYPE_F64, 5) == 40);
    CHECK(ebb_row_bytes(4, 32) == 0);                               /* unknown type */
    CHECK(ebb_row_bytes(UINT32_MAX, 32) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_F64, UINT64_C(1) << 62) == 0);     /* bytes overflow */
    CHECK(ebb_row_bytes(EBB_TYPE_F32, UINT64_MAX) == 0);
    CHECK(ebb_row_bytes(EBB_TYPE_I8, UINT64_C(1) << 40) == (size_t)1 << 40);
}

/* A few blocks decoded by hand from the layout definitions. */
static void test_hand_blocks(void)
{
    float out[256];
    /* Q4_0: d = 0.5 (0x3800); byte j = low nibble j & 15, high nibble 15 - (j & 15). */
    uint8_t q40[18] = { 0x00, 0x38 };
    for (int j = 0; j < 16; j++) q40[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    ebb_type_info(EBB_TYPE_Q4_0)->to_f32(q40, out, 32);
    int bad = 0;
    for (int j = 0; j < 16; j++) {
        bad += out[j] != 0.5f * (float)(j - 8);
        bad += out[j + 16] != 0.5f * (float)(15 - j - 8);
    }
    CHECK_MSG(bad == 0, "Q4_0 hand block: %d wrong", bad);

    /* Q4_1: d = 2 (0x4000), m = -1 (0xbc00): x = 2q - 1. */
    uint8_t q41[20] = { 0x00, 0x40, 0x00, 0xbc };
    for (int j = 0; j < 16; j++) q41[4 + j] = (uint8_t)(0x30 | (j & 15));
    ebb_type_info(EBB_TYPE_Q4_1)->to_f32(q41, out, 32);
    bad = 0;
    for (int j = 0; j < 16; j++) bad += out[j] != 2.0f * (float)j - 1 || out[j + 16] != 5.0f;
    CHECK_MSG(bad == 0, "Q4_1 hand block: %d wrong", bad);

    /* Q5_0: d = 1; qh bit j set for odd j: value j = (nibble | 16*bit) - 16. */
    uint8_t q50[22] = { 0x00, 0x3c, 0xaa, 0xaa, 0xaa, 0xaa };
    for (int j = 0; j < 16; j++) q50[6 + j] = (uint8_t)(7 | (9 << 4));
    ebb_type_info(EBB_TYPE_Q5_0)->to_f32(q50, out, 32);
    bad = 0;
    for (int j = 0; j < 32; j++) {
        int nib = j < 16 ? 7 : 9, hi = (j & 1) ? 16 : 0;
        bad += out[j] != (float)(nib + hi - 16);
    }
    CHECK_MSG(bad == 0, "Q5_0 hand block: %d wrong", bad);

    /* Q8_0: d = 0.25 (0x3400), q = j - 16. */
    uint8_t q80[34 * 2] = { 0x00, 0x34 };
    for (int j = 0; j < 32; j++) q80[2 + j] = (uint8_t)(int8_t)(j - 16);
    q80[34] = 0x00; q80[35] = 0xc0;                       /* second block d = -2 */
    for (int j = 0; j < 32; j++) q80[36 + j] = (uint8_t)(int8_t)(j == 0 ? -128 : 127);
    ebb_type_info(EBB_TYPE_Q8_0)->to_f32(q80, out, 64);
    bad = 0;
    for (int j = 0; j < 32; j++) bad += out[j] != 0.25f * (float)(j - 16);
    bad += out[32] != 256.0f || out[33] != -254.0f;
    CHECK_MSG(bad == 0, "Q8_0 hand blocks: %d wrong", bad);

    /* Q6_K: d = 1, every scale 1 except scale 15 (values 240..255) = -3; all
     * quants 0b100001 = 33 -> q - 32 = 1: ql nibbles 1, qh pairs 2. */
    uint8_t q6k[210] = { 0 };
    memset(q6k, 0x11, 128);
    memset(q6k + 128, 0xaa, 64);
    for (int i = 0; i < 16; i++) q6k[192 + i] = 1;
    q6k[192 + 15] = (uint8_t)(int8_t)-3;
    q6k[208] = 0x00; q6k[209] = 0x3c;
    ebb_type_info(EBB_TYPE_Q6_K)->to_f32(q6k, out, 256);
    bad = 0;
    for (int j = 0; j < 256; j++) bad += out[j] != (j >= 240 ? -3.0f : 1.0f);
    CHECK_MSG(bad == 0, "Q6_K hand block: %d wrong", bad);

    /* F16 rows. */
    uint8_t f16[6] = { 0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00 };
    ebb_type_info(EBB_TYPE_F16)->to_f32(f16, out, 3);
    CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == ldexpf(1, -24));
}

/* W2G64 (ebb's 2-bit base): a block decoded by hand, and the quantizer
 * against the plain min-max grid it searches beyond: per group its squared
 * error is never larger, over gaussian groups with and without an outlier;
 * a constant group comes back exactly. */
static double sq_err(const float *a, const float *b, int n)
{
    double e = 0;
    for (int i = 0; i < n; i++) e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return e;
}

static void test_w2g64(void)
{
    CHECK(ebb_row_bytes(EBB_TYPE_W2G64, 576) == 9 * 20 && ebb_row_bytes(EBB_TYPE_W2G64, 32) == 0);
    const struct ebb_type_info *ti = ebb_type_info(EBB_TYPE_W2G64);
    CHECK(ti && strcmp(ti->name, "W2G64") == 0 && ti->block_elems == 64 && ti->block_bytes == 20 &&
          ti->act == EBB_ACT_Q8B32);
    if (!ti) return;
    /* d = 0.5 (0x3800), m = -1 (0xbc00); every byte 0xe4: codes 0, 1, 2, 3
     * from its low bits up, i.e. values j, 16 + j, 32 + j, 48 + j */
    uint8_t blk[20] = {0x00, 0x38, 0x00, 0xbc};
    memset(blk + 4, 0xe4, 16);
    float out[64];
    ti->to_f32(blk, out, 64);
    int bad = 0;
    for (int j = 0; j < 64; j++) bad += out[j] != -1.0f + 0.5f * (float)(j / 16);
    CHECK_MSG(bad == 0, "W2G64 hand block: %d wrong", bad);

    float x[64], back[64], grid[64];
    int worse = 0;
    srand(7);
    for (int rep = 0; rep < 400; rep++) {
        for (int j = 0; j < 64; j++) {
            const double u1 = (rand() + 1.0) / (RAND_MAX + 2.0), u2 = (rand() + 1.0) / (RAND_MAX + 2.0);
            x[j] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2) * 0.02);
        }
        if (rep % 2) x[rep % 64] *= 8;   /* an outlier */
        ebb_quantize_w2g64(x, blk, 64);
        ti->to_f32(blk, back, 64);
        float lo = x[0], hi = x[0];
        for (int j = 1; j < 64; j++) lo = fminf(lo, x[j]), hi = fmaxf(hi, x[j]);
        const float step = (hi - lo) / 3;
        for (int j = 0; j < 64; j++) grid[j] = lo + step * roundf((x[j] - lo) / step);
        worse += sq_err(x, back, 64) > sq_err(x, grid, 64) * 1.001 + 1e-12;
    }
    CHECK_MSG(worse == 0, "W2G64: %d of 400 groups worse than the min-max grid", worse);
    /* Weighted (weights spanning 1000x): in the weighted error well below
     * the unweighted choice over all groups and never much above it in one,
     * and NULL weights are the unweighted quantizer's bytes. */
    float wt[64];
    uint8_t plain[20];
    int heavier = 0;
    double sum_w = 0, sum_plain = 0;
    for (int rep = 0; rep < 400; rep++) {
        for (int j = 0; j < 64; j++) {
            const double u1 = (rand() + 1.0) / (RAND_MAX + 2.0), u2 = (rand() + 1.0) / (RAND_MAX + 2.0);
            x[j] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2) * 0.02);
            wt[j] = (float)pow(10.0, 3.0 * rand() / RAND_MAX);
        }
        ebb_quantize_w2g64_weighted(x, wt, blk, 64);
        ebb_quantize_w2g64(x, plain, 64);
        ti->to_f32(blk, back, 64);
        ti->to_f32(plain, grid, 64);
        double e_w = 0, e_plain = 0;
        for (int j = 0; j < 64; j++) {
            e_w += wt[j] * ((double)x[j] - back[j]) * ((double)x[j] - back[j]);
            e_plain += wt[j] * ((double)x[j] - grid[j]) * ((double)x[j] - grid[j]);
        }
        heavier += e_w > e_plain * 1.02 + 1e-12;
        sum_w += e_w, sum_plain += e_plain;
    }
    /* per group the stored f16 pair and the codes chosen again against it
     * can cost a little; over all groups the weighting must pay */
    CHECK_MSG(heavier == 0, "W2G64 weighted: %d of 400 groups 2%% worse in the weighted error than unweighted",
              heavier);
    CHECK_MSG(sum_w < 0.9 * sum_plain, "W2G64 weighted: weighted error %.3g against %.3g unweighted", sum_w,
              sum_plain);
    printf("W2G64 weighted error: %.3g of the unweighted quantizer's\n", sum_w / sum_plain);
    ebb_quantize_w2g64_weighted(x, NULL, blk, 64);
    ebb_quantize_w2g64(x, plain, 64);
    CHECK(memcmp(blk, plain, 20) == 0);
    for (int j = 0; j < 64; j++) x[j] = 0.375f;
    ebb_quantize_w2g64(x, blk, 64);
    ti->to_f32(blk, back, 64);
    CHECK_MSG(sq_err(x, back, 64) == 0, "W2G64: a constant group is not exact");
}

int main(void)
{
    test_f16_decode_all();
    test_f16_round_trip_all();
    test_f32_to_f16_specials();
    test_f32_to_f16_rounding();
    test_bf16();
    test_type_table();
    test_row_bytes();
    test_hand_blocks();
    test_w2g64();
    return check_report("test_formats");
}
