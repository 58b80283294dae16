/* bfloat16 weights (bf16_weight_matmul).
 *
 * A bfloat16 weight is the top half of a float32, so widening is a shift; float32 x, float32
 * FMAs. It lets a quantized variant keep its bfloat16 vocabulary table as it came (half the
 * bytes a float32 copy reads) and still compute the tied output projection in float32 -
 * PyTorch's own bfloat16 GEMM runs at ~4 GFLOP/s on AVX2.
 */
#include "narrow_matmul.h"

#ifdef __AVX2__
static inline __m256 widen_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
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
    int64_t count = narrow_block_count(j, first);
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
        narrow_store_pair(j, first, count, row, b != a, out_a, out_b);
    }
}

/* x [m, k] float32, w [n, k] bfloat16 bits (row-major), bias [n] float32 or NULL, y [m, n] float32. */
int bf16_weight_matmul(const float *x, int64_t m, int64_t k, const uint16_t *w, const float *bias, float *y,
                       int64_t n, int num_threads) {
    if (m < 1 || k < 1 || n < 1) return BAD_ARGUMENT;
    Job job = {.run_block = run_bf16_block, .x = x, .m = m, .k = k, .w16 = w, .bias = bias, .y = y, .n = n};
    return narrow_run_threads(job, num_threads);
}
