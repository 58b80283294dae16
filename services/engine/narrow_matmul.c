/* Projections y = x W^T (* scale) (+ bias) whose weight is narrower than float32 - int8 codes
 * with one float scale per output row, or bfloat16 - read at memory speed on an AVX2 core.
 *
 * int8 (int8_weight_matmul). Why not torch's _weight_int8pack_mm:
 * on an AVX2 core without VNNI it widens each weight to float and so runs compute-bound at 5-6
 * GB/s of weight, slower than the memory can deliver; a decode step (one to a few rows of x)
 * then gains little from weights four times smaller. Here each row of x is first quantized to
 * int16 with its own scale (max |x| / 32767, a relative step of 3e-5: far below the int8
 * weight's own error, and finer than the bfloat16 activations the torch kernel takes). The
 * products then run on integers: 16 weights sign-extended to int16 and multiplied-and-pair-
 * added against x by one vpmaddwd into int32 lanes, which is two to three times the work per
 * instruction of the float path and keeps a single core at memory speed. Each int32 lane holds
 * at most KCHUNK / 8 products of |w| <= 127 and |x| <= 32767, below 2^31; lanes and chunks are
 * summed in float. w8a8 asks for 127 levels instead of 32767: its int8 activation codes, as
 * services/engine/models/quantized.py's quantize_per_token makes them (symmetric per row,
 * round half to even; x times the step's reciprocal here, x divided by the step there, so a
 * value on an exact half may land one code apart), quantized here so that no PyTorch op runs
 * per projection. A row of x
 * holding inf or NaN cannot be quantized: the call returns NOT_FINITE and the caller computes
 * that call another way.
 *
 * int4 (int4_weight_matmul): group-wise 4-bit codes with one float scale per (row, group of a
 * multiple of 32 columns), two codes a byte in the layout of pack_int4_codes in
 * services/engine/models/narrow_native.py. x goes to int16 as for int8; each 32-column chunk
 * unpacks 16 bytes into 32 int16 codes (mask, shift, minus 8), the same vpmaddwd products sum
 * per group in int32, and each group's sum enters a float accumulator times its scale. The
 * unpacking makes this compute-bound on one AVX2 core: about the speed of the int8 kernel at
 * one row (half the bytes, twice the work per weight), and no faster than torch's int4 kernel
 * at 16 rows. (Unpacking a block once into a scratch buffer for all rows of x measured slower.)
 *
 * bfloat16 (bf16_weight_matmul): a bfloat16 weight is the top half of a float32, so widening
 * is a shift; float32 x, float32 FMAs. It lets a quantized variant keep its bfloat16 vocabulary
 * table as it came (half the bytes a float32 copy reads) and still compute the tied output
 * projection in float32 - PyTorch's own bfloat16 GEMM runs at ~4 GFLOP/s on AVX2.
 *
 * Both read four weight rows together with two rows of x (each weight widened once per pair)
 * and prefetch the rows ahead: the scan over W is what bounds a decode step, and the hardware
 * prefetcher alone left it at half the memory bandwidth. Output rows are split over up to
 * MAX_THREADS threads. Built by services/engine/native.py (like paged_decode.c) and called
 * through ctypes, which releases the GIL.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ROWS_PER_BLOCK 4
#define KCHUNK 2048
#define PREFETCH_ROWS 4 /* one block ahead: measured best of 4, 8 and 16 rows */
#define MAX_THREADS 8

enum { OK = 0, BAD_ARGUMENT = 1, NO_MEMORY = 2, NOT_FINITE = 3 };

typedef struct Job Job;
struct Job {
    void (*run_block)(const Job *, int64_t first); /* one block of output rows, every row of x */
    const int16_t *xq; const float *x_scale; int64_t m, k, k_padded; /* int8: x quantized */
    const int8_t *w; const float *scale; /* int8: weight codes and row scales */
    const float *x; const uint16_t *w16; /* bfloat16: float32 x, the weight's bits */
    const uint8_t *w4; const float *group_scale; int64_t group_size; /* int4: nibbles, [n, groups] scales */
    const float *bias; float *y; int64_t n;
    int64_t first_row, last_row;
};

/* Exponent bits all ones: inf or NaN. Tested on the bits because -ffast-math may assume
 * that no float is ever non-finite and drop isfinite(). */
static int is_non_finite(float value) {
    uint32_t bits; memcpy(&bits, &value, sizeof bits);
    return (bits & 0x7f800000u) == 0x7f800000u;
}

/* Largest |x| of a row, or -1 when the row holds inf or NaN. */
static float row_magnitude(const float *src, int64_t k) {
    float largest = 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    __m256 top = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), exponent);
        if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(bits, exponent))) return -1.0f;
        top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude_bits));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int lane = 0; lane < 8; lane++) largest = lanes[lane] > largest ? lanes[lane] : largest;
#endif
    for (; i < k; i++) {
        if (is_non_finite(src[i])) return -1.0f;
        float magnitude = fabsf(src[i]);
        largest = magnitude > largest ? magnitude : largest;
    }
    return largest;
}

/* Symmetric codes in [-levels, levels] per row of x (x times 1 / step, rounded to nearest
 * even) and each row's step, max |x| / levels. */
static int quantize_rows(const float *x, int64_t m, int64_t k, int64_t k_padded, float levels, int16_t *xq,
                         float *x_scale) {
    for (int64_t row = 0; row < m; row++) {
        const float *src = x + row * k;
        float largest = row_magnitude(src, k);
        if (largest < 0.0f) return NOT_FINITE;
        float step = largest > 0.0f ? largest / levels : 1.0f; /* an all-zero row: codes 0 */
        float inverse = 1.0f / step;
        int16_t *dst = xq + row * k_padded;
        int64_t i = 0;
#ifdef __AVX2__
        const __m256 scale = _mm256_set1_ps(inverse);
        for (; i + 16 <= k; i += 16) {
            __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + i), scale));
            __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + i + 8), scale));
            /* packs works per 128-bit lane: put the four 64-bit quarters back in order. */
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xd8);
            _mm256_storeu_si256((__m256i *)(dst + i), packed);
        }
#endif
        for (; i < k; i++) dst[i] = (int16_t)lrintf(src[i] * inverse);
        for (; i < k_padded; i++) dst[i] = 0;
        x_scale[row] = step;
    }
    return OK;
}

#ifdef __AVX2__
/* The eight int32 lanes summed in float: each fits int32, their sum may not. */
static inline float lane_sum(__m256i v) {
    __m256 f = _mm256_cvtepi32_ps(v);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i widen16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}

/* Dot products of up to four weight rows with x rows a and b over [0, k_vector). */
static void dot_block(const int8_t *const rows[ROWS_PER_BLOCK], const int16_t *a, const int16_t *b, int64_t k,
                      int64_t k_vector, int prefetch, float out_a[ROWS_PER_BLOCK], float out_b[ROWS_PER_BLOCK]) {
    const int pair = a != b;
    for (int64_t c0 = 0; c0 < k_vector; c0 += KCHUNK) {
        int64_t c1 = c0 + KCHUNK < k_vector ? c0 + KCHUNK : k_vector;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t i = c0; i < c1; i += 16) {
            /* The four rows are contiguous: a cache line ahead per 16 columns covers them all. */
            if (prefetch) _mm_prefetch((const char *)rows[0] + PREFETCH_ROWS * k + 4 * i, _MM_HINT_T0);
            __m256i p = _mm256_loadu_si256((const __m256i *)(a + i));
            __m256i v0 = widen16(rows[0] + i), v1 = widen16(rows[1] + i);
            __m256i v2 = widen16(rows[2] + i), v3 = widen16(rows[3] + i);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(v0, p));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(v1, p));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(v2, p));
            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(v3, p));
            if (pair) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(b + i));
                b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(v0, q));
                b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(v1, q));
                b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(v2, q));
                b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(v3, q));
            }
        }
        out_a[0] += lane_sum(a0); out_a[1] += lane_sum(a1); out_a[2] += lane_sum(a2); out_a[3] += lane_sum(a3);
        out_b[0] += lane_sum(b0); out_b[1] += lane_sum(b1); out_b[2] += lane_sum(b2); out_b[3] += lane_sum(b3);
    }
}
#define VECTOR_WIDTH 16
#else
#define VECTOR_WIDTH 1 /* no AVX2: the scalar loop below does every column */
#endif

static void run_int8_block(const Job *j, int64_t first) {
    int64_t count = j->n - first < ROWS_PER_BLOCK ? j->n - first : ROWS_PER_BLOCK;
    const int8_t *rows[ROWS_PER_BLOCK];
    for (int r = 0; r < ROWS_PER_BLOCK; r++) rows[r] = j->w + (first + (r < count ? r : 0)) * j->k;
    int64_t k_vector = VECTOR_WIDTH > 1 ? j->k & ~(int64_t)(VECTOR_WIDTH - 1) : 0;
    for (int64_t row = 0; row < j->m; row += 2) {
        const int16_t *a = j->xq + row * j->k_padded;
        const int16_t *b = row + 1 < j->m ? a + j->k_padded : a;
        float out_a[ROWS_PER_BLOCK] = {0}, out_b[ROWS_PER_BLOCK] = {0};
#ifdef __AVX2__
        dot_block(rows, a, b, j->k, k_vector, row == 0 && first + 2 * ROWS_PER_BLOCK <= j->n, out_a, out_b);
#endif
        for (int64_t i = k_vector; i < j->k; i++) {
            for (int r = 0; r < ROWS_PER_BLOCK; r++) {
                out_a[r] += (float)(rows[r][i] * a[i]);
                out_b[r] += (float)(rows[r][i] * b[i]);
            }
        }
        for (int64_t r = 0; r < count; r++) {
            int64_t column = first + r;
            float add = j->bias ? j->bias[column] : 0.0f;
            j->y[row * j->n + column] = out_a[r] * j->x_scale[row] * j->scale[column] + add;
            if (b != a) j->y[(row + 1) * j->n + column] = out_b[r] * j->x_scale[row + 1] * j->scale[column] + add;
        }
    }
}

#ifdef __AVX2__
static inline __m256 widen_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float float_lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Dot products of four bfloat16 weight rows with float32 x rows a and b over [0, k_vector). */
static void bf16_dot_block(const uint16_t *const rows[ROWS_PER_BLOCK], const float *a, const float *b, int64_t k,
                           int64_t k_vector, int prefetch, float out_a[ROWS_PER_BLOCK], float out_b[ROWS_PER_BLOCK]) {
    const int pair = a != b;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < k_vector; i += 8) {
        /* 8 columns of 4 contiguous rows: one cache line ahead covers them. */
        if (prefetch) _mm_prefetch((const char *)(rows[0] + PREFETCH_ROWS * k + 4 * i), _MM_HINT_T0);
        __m256 p = _mm256_loadu_ps(a + i);
        __m256 v0 = widen_bf16(rows[0] + i), v1 = widen_bf16(rows[1] + i);
        __m256 v2 = widen_bf16(rows[2] + i), v3 = widen_bf16(rows[3] + i);
        a0 = _mm256_fmadd_ps(v0, p, a0); a1 = _mm256_fmadd_ps(v1, p, a1);
        a2 = _mm256_fmadd_ps(v2, p, a2); a3 = _mm256_fmadd_ps(v3, p, a3);
        if (pair) {
            __m256 q = _mm256_loadu_ps(b + i);
            b0 = _mm256_fmadd_ps(v0, q, b0); b1 = _mm256_fmadd_ps(v1, q, b1);
            b2 = _mm256_fmadd_ps(v2, q, b2); b3 = _mm256_fmadd_ps(v3, q, b3);
        }
    }
    out_a[0] = float_lane_sum(a0); out_a[1] = float_lane_sum(a1); out_a[2] = float_lane_sum(a2); out_a[3] = float_lane_sum(a3);
    out_b[0] = float_lane_sum(b0); out_b[1] = float_lane_sum(b1); out_b[2] = float_lane_sum(b2); out_b[3] = float_lane_sum(b3);
}
/* Two bfloat16 weight rows against six x rows: twelve accumulators, so that each weight is
 * widened once per six rows of x (at 16 rows and more the widening, not memory, bounded the
 * four-by-two pass above). */
#define WIDE_ROWS 6
static void bf16_dot_2x6(const uint16_t *r0, const uint16_t *r1, const float *x, int64_t k, int64_t k_vector,
                         int prefetch_ahead, float out[2][WIDE_ROWS]) {
    __m256 acc0[WIDE_ROWS], acc1[WIDE_ROWS];
    for (int m = 0; m < WIDE_ROWS; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k_vector; i += 8) {
        /* The first pass over a block fetches the next block's 4 contiguous rows: a line per 8 columns. */
        if (prefetch_ahead) _mm_prefetch((const char *)(r0 + PREFETCH_ROWS * k + 4 * i), _MM_HINT_T0);
        __m256 w0 = widen_bf16(r0 + i), w1 = widen_bf16(r1 + i);
        for (int m = 0; m < WIDE_ROWS; m++) {
            __m256 v = _mm256_loadu_ps(x + m * k + i);
            acc0[m] = _mm256_fmadd_ps(w0, v, acc0[m]);
            acc1[m] = _mm256_fmadd_ps(w1, v, acc1[m]);
        }
    }
    for (int m = 0; m < WIDE_ROWS; m++) {
        out[0][m] = float_lane_sum(acc0[m]);
        out[1][m] = float_lane_sum(acc1[m]);
    }
}
#define BF16_VECTOR_WIDTH 8
#else
#define BF16_VECTOR_WIDTH 1
#endif

static inline float bf16_value(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16; float value; memcpy(&value, &wide, sizeof value); return value;
}

static void run_bf16_block(const Job *j, int64_t first) {
    int64_t count = j->n - first < ROWS_PER_BLOCK ? j->n - first : ROWS_PER_BLOCK;
    const uint16_t *rows[ROWS_PER_BLOCK];
    for (int r = 0; r < ROWS_PER_BLOCK; r++) rows[r] = j->w16 + (first + (r < count ? r : 0)) * j->k;
    int64_t k_vector = BF16_VECTOR_WIDTH > 1 ? j->k & ~(int64_t)(BF16_VECTOR_WIDTH - 1) : 0;
    int64_t row = 0;
#ifdef __AVX2__
    for (; row + WIDE_ROWS <= j->m; row += WIDE_ROWS) {
        const float *x = j->x + row * j->k;
        for (int half = 0; half < ROWS_PER_BLOCK; half += 2) {
            float out[2][WIDE_ROWS];
            int prefetch = row == 0 && half == 0 && first + 2 * ROWS_PER_BLOCK <= j->n;
            bf16_dot_2x6(rows[half], rows[half + 1], x, j->k, k_vector, prefetch, out);
            for (int64_t r = half; r < half + 2 && r < count; r++) {
                for (int m = 0; m < WIDE_ROWS; m++) {
                    float sum = out[r - half][m];
                    for (int64_t i = k_vector; i < j->k; i++) sum += bf16_value(rows[r][i]) * x[m * j->k + i];
                    j->y[(row + m) * j->n + first + r] = sum + (j->bias ? j->bias[first + r] : 0.0f);
                }
            }
        }
    }
#endif
    for (; row < j->m; row += 2) {
        const float *a = j->x + row * j->k;
        const float *b = row + 1 < j->m ? a + j->k : a;
        float out_a[ROWS_PER_BLOCK] = {0}, out_b[ROWS_PER_BLOCK] = {0};
#ifdef __AVX2__
        bf16_dot_block(rows, a, b, j->k, k_vector, row == 0 && first + 2 * ROWS_PER_BLOCK <= j->n, out_a, out_b);
#endif
        for (int64_t i = k_vector; i < j->k; i++) {
            for (int r = 0; r < ROWS_PER_BLOCK; r++) {
                out_a[r] += bf16_value(rows[r][i]) * a[i];
                out_b[r] += bf16_value(rows[r][i]) * b[i];
            }
        }
        for (int64_t r = 0; r < count; r++) {
            int64_t column = first + r;
            float add = j->bias ? j->bias[column] : 0.0f;
            j->y[row * j->n + column] = out_a[r] + add;
            if (b != a) j->y[(row + 1) * j->n + column] = out_b[r] + add;
        }
    }
}

#ifdef __AVX2__
/* 32 int4 codes (16 bytes: column j low nibble, column 16 + j high nibble) as two int16 vectors. */
static inline void unpack_int4(const uint8_t *p, __m256i *low, __m256i *high) {
    const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    *low = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(bytes, mask), eight));
    *high = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight));
}

/* Four int4 rows against x rows a and b: per group, integer sums, then times the group's scale
 * into float lanes. Each chunk of codes is unpacked once per pair of x rows. */
static void int4_dot_block(const uint8_t *const rows[ROWS_PER_BLOCK], const float *const scales[ROWS_PER_BLOCK],
                           const int16_t *a, const int16_t *b, int64_t k, int64_t group_size, int prefetch,
                           float out_a[ROWS_PER_BLOCK], float out_b[ROWS_PER_BLOCK]) {
    const int pair = a != b;
    __m256 fa[ROWS_PER_BLOCK], fb[ROWS_PER_BLOCK];
    for (int r = 0; r < ROWS_PER_BLOCK; r++) fa[r] = fb[r] = _mm256_setzero_ps();
    for (int64_t g0 = 0, group = 0; g0 < k; g0 += group_size, group++) {
        __m256i ia[ROWS_PER_BLOCK], ib[ROWS_PER_BLOCK];
        for (int r = 0; r < ROWS_PER_BLOCK; r++) ia[r] = ib[r] = _mm256_setzero_si256();
        for (int64_t i = g0; i < g0 + group_size; i += 32) {
            /* 32 columns of 4 contiguous rows are 64 bytes: one cache line ahead per chunk. */
            if (prefetch) _mm_prefetch((const char *)rows[0] + PREFETCH_ROWS * k / 2 + 2 * i, _MM_HINT_T0);
            __m256i p0 = _mm256_loadu_si256((const __m256i *)(a + i));
            __m256i p1 = _mm256_loadu_si256((const __m256i *)(a + i + 16));
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(b + i));
            __m256i q1 = _mm256_loadu_si256((const __m256i *)(b + i + 16));
            for (int r = 0; r < ROWS_PER_BLOCK; r++) {
                __m256i low, high;
                unpack_int4(rows[r] + i / 2, &low, &high);
                ia[r] = _mm256_add_epi32(ia[r], _mm256_add_epi32(_mm256_madd_epi16(low, p0), _mm256_madd_epi16(high, p1)));
                if (pair)
                    ib[r] = _mm256_add_epi32(ib[r], _mm256_add_epi32(_mm256_madd_epi16(low, q0), _mm256_madd_epi16(high, q1)));
            }
        }
        for (int r = 0; r < ROWS_PER_BLOCK; r++) {
            __m256 step = _mm256_set1_ps(scales[r][group]);
            fa[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r]), step, fa[r]);
            fb[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib[r]), step, fb[r]);
        }
    }
    for (int r = 0; r < ROWS_PER_BLOCK; r++) {
        out_a[r] = float_lane_sum(fa[r]);
        out_b[r] = float_lane_sum(fb[r]);
    }
}
#endif

static inline int int4_code(const uint8_t *row, int64_t column) {
    uint8_t byte = row[(column / 32) * 16 + column % 16];
    return (column % 32 < 16 ? byte & 0x0f : byte >> 4) - 8;
}

static void run_int4_block(const Job *j, int64_t first) {
    int64_t count = j->n - first < ROWS_PER_BLOCK ? j->n - first : ROWS_PER_BLOCK;
    int64_t groups = j->k / j->group_size;
    const uint8_t *rows[ROWS_PER_BLOCK];
    const float *scales[ROWS_PER_BLOCK];
    for (int r = 0; r < ROWS_PER_BLOCK; r++) {
        int64_t row = first + (r < count ? r : 0);
        rows[r] = j->w4 + row * (j->k / 2);
        scales[r] = j->group_scale + row * groups;
    }
    for (int64_t row = 0; row < j->m; row += 2) {
        const int16_t *a = j->xq + row * j->k_padded;
        const int16_t *b = row + 1 < j->m ? a + j->k_padded : a;
        float out_a[ROWS_PER_BLOCK] = {0}, out_b[ROWS_PER_BLOCK] = {0};
#ifdef __AVX2__
        int4_dot_block(rows, scales, a, b, j->k, j->group_size, row == 0 && first + 2 * ROWS_PER_BLOCK <= j->n,
                       out_a, out_b);
#else
        for (int r = 0; r < ROWS_PER_BLOCK; r++)
            for (int64_t i = 0; i < j->k; i++) {
                float step = scales[r][i / j->group_size];
                out_a[r] += step * (float)(int4_code(rows[r], i) * a[i]);
                out_b[r] += step * (float)(int4_code(rows[r], i) * b[i]);
            }
#endif
        for (int64_t r = 0; r < count; r++) {
            int64_t column = first + r;
            float add = j->bias ? j->bias[column] : 0.0f;
            j->y[row * j->n + column] = out_a[r] * j->x_scale[row] + add;
            if (b != a) j->y[(row + 1) * j->n + column] = out_b[r] * j->x_scale[row + 1] + add;
        }
    }
}

static void *run_rows(void *argument) {
    const Job *j = argument;
    for (int64_t first = j->first_row; first < j->last_row; first += ROWS_PER_BLOCK) j->run_block(j, first);
    return NULL;
}

/* Splits the output rows of ``job`` over threads (each copy gets its first_row and last_row). */
static int run_threads(Job job, int num_threads) {
    int64_t blocks = (job.n + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > blocks) num_threads = (int)blocks;
    int64_t per_thread = (blocks + num_threads - 1) / num_threads * ROWS_PER_BLOCK;
    Job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = job;
        jobs[t].first_row = t * per_thread;
        jobs[t].last_row = jobs[t].first_row + per_thread < job.n ? jobs[t].first_row + per_thread : job.n;
    }
    for (int t = 1; t < num_threads; t++) started[t] = pthread_create(&threads[t], NULL, run_rows, &jobs[t]) == 0;
    run_rows(&jobs[0]);
    /* Rows of threads that failed to start are run here. */
    for (int t = 1; t < num_threads; t++) {
        if (started[t]) pthread_join(threads[t], NULL);
        else run_rows(&jobs[t]);
    }
    return OK;
}

/* x [m, k] float32, w [n, k] int8 (row-major), scale [n] float32, bias [n] float32 or NULL,
 * y [m, n] float32; x quantized per row to activation_levels (32767: int16, 127: w8a8's int8).
 * Output rows are split over up to MAX_THREADS threads. */
int int8_weight_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                       const float *bias, float *y, int64_t n, int num_threads, int activation_levels) {
    if (m < 1 || k < 1 || n < 1 || activation_levels < 1 || activation_levels > 32767) return BAD_ARGUMENT;
    int64_t k_padded = (k + 15) & ~(int64_t)15;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(m * k_padded));
    float *x_scale = malloc(sizeof(float) * (size_t)m);
    int status = xq && x_scale ? quantize_rows(x, m, k, k_padded, (float)activation_levels, xq, x_scale) : NO_MEMORY;
    if (status == OK) {
        Job job = {.run_block = run_int8_block, .xq = xq, .x_scale = x_scale, .m = m, .k = k, .k_padded = k_padded,
                   .w = w, .scale = scale, .bias = bias, .y = y, .n = n};
        status = run_threads(job, num_threads);
    }
    free(xq);
    free(x_scale);
    return status;
}

/* x [m, k] float32, w [n, k / 2] int4 nibbles (see int4_code), group_scale [n, k / group_size]
 * float32, bias [n] or NULL, y [m, n] float32; group_size a multiple of 32 dividing k. */
int int4_weight_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, const float *group_scale,
                       int64_t group_size, const float *bias, float *y, int64_t n, int num_threads) {
    if (m < 1 || k < 1 || n < 1 || group_size < 32 || group_size % 32 || k % group_size) return BAD_ARGUMENT;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(m * k));
    float *x_scale = malloc(sizeof(float) * (size_t)m);
    int status = xq && x_scale ? quantize_rows(x, m, k, k, 32767.0f, xq, x_scale) : NO_MEMORY;
    if (status == OK) {
        Job job = {.run_block = run_int4_block, .xq = xq, .x_scale = x_scale, .m = m, .k = k, .k_padded = k,
                   .w4 = w, .group_scale = group_scale, .group_size = group_size, .bias = bias, .y = y, .n = n};
        status = run_threads(job, num_threads);
    }
    free(xq);
    free(x_scale);
    return status;
}

/* x [m, k] float32, w [n, k] bfloat16 bits (row-major), bias [n] float32 or NULL, y [m, n] float32. */
int bf16_weight_matmul(const float *x, int64_t m, int64_t k, const uint16_t *w, const float *bias, float *y,
                       int64_t n, int num_threads) {
    if (m < 1 || k < 1 || n < 1) return BAD_ARGUMENT;
    Job job = {.run_block = run_bf16_block, .x = x, .m = m, .k = k, .w16 = w, .bias = bias, .y = y, .n = n};
    return run_threads(job, num_threads);
}
