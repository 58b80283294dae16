/* Shared by the narrow-weight kernels (narrow_int8.c, narrow_int4.c, narrow_bf16.c): the work
 * description, row quantization, the split over threads and the store of finished sums.
 * See narrow_matmul.c for what they have in common and why. */
#ifndef TOKENLINE_NARROW_MATMUL_H
#define TOKENLINE_NARROW_MATMUL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ROWS_PER_BLOCK 4
#define PREFETCH_ROWS 4 /* one block ahead: measured best of 4, 8 and 16 rows */
#define MAX_THREADS 8
#define INT16_LEVELS 32767.0f

enum { OK = 0, BAD_ARGUMENT = 1, NO_MEMORY = 2, NOT_FINITE = 3 };

typedef struct Job Job;
struct Job {
    void (*run_block)(const Job *, int64_t first); /* one block of output rows, every row of x */
    const int16_t *xq; const float *x_scale; int64_t m, k, k_padded; /* int8, int4: x quantized */
    const int8_t *w; const float *scale; /* int8: weight codes and row scales */
    const float *x; const uint16_t *w16; /* bfloat16: float32 x, the weight's bits */
    const uint8_t *w4; const float *group_scale; int64_t group_size; /* int4: nibbles, [n, groups] scales */
    const int32_t *x_group_sum; /* int4: [m, k / group_size] sums of x's codes per group */
    const float *bias; float *y; int64_t n;
    int64_t first_row, last_row;
};

/* Runs ``job`` over every output row, split over up to MAX_THREADS threads. */
int narrow_run_threads(Job job, int num_threads);

/* Quantizes x [m, k] to ``levels`` per row into the job (rows padded to a multiple of 16) and,
 * for a job with a group_size, sums each group's codes; then runs it. NOT_FINITE where a row
 * holds inf or NaN, NO_MEMORY where allocation fails. */
int narrow_run_quantized(Job job, const float *x, float levels, int num_threads);

/* Stores the finished sums of output rows [first, first + count) for x rows ``row`` and, when
 * ``pair``, ``row + 1``: times the row's step (quantized x) and the column's scale (int8), plus
 * the bias, each where the job has one. */
void narrow_store_pair(const Job *j, int64_t first, int64_t count, int64_t row, int pair, const float *out_a,
                       const float *out_b);

static inline int64_t narrow_block_count(const Job *j, int64_t first) {
    return j->n - first < ROWS_PER_BLOCK ? j->n - first : ROWS_PER_BLOCK;
}

#ifdef __AVX2__
static inline float float_lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
