/* Projections y = x W^T (* scale) (+ bias) whose weight is narrower than float32 - int8 codes
 * with one float scale per output row, group-wise int4, or bfloat16 - read at memory speed on
 * an AVX2 core. Each kind has its file (narrow_int8.c, narrow_int4.c, narrow_bf16.c); this one
 * holds what they share: the quantization of x to int16 (int8, int4), the split of the output
 * rows over threads and the store of the finished sums.
 *
 * All read four weight rows together with two rows of x (each weight widened once per pair)
 * and prefetch the rows ahead: the scan over W is what bounds a decode step, and the hardware
 * prefetcher alone left it at half the memory bandwidth. Built into one library by
 * services/engine/native.py (like paged_decode.c) and called through ctypes, which releases
 * the GIL.
 */
#include <pthread.h>

#include "narrow_matmul.h"

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

/* Sum of each group's codes, per row of x: what the int4 kernel subtracts 8 times, as it
 * multiplies x by the nibbles as stored (code + 8) and so saves a subtraction per weight. */
static void sum_groups(const int16_t *xq, int64_t m, int64_t k, int64_t k_padded, int64_t group_size,
                       int32_t *sums) {
    int64_t groups = k / group_size;
    for (int64_t row = 0; row < m; row++) {
        const int16_t *codes = xq + row * k_padded;
        for (int64_t g = 0; g < groups; g++) {
            int32_t total = 0;
            for (int64_t i = g * group_size; i < (g + 1) * group_size; i++) total += codes[i];
            sums[row * groups + g] = total;
        }
    }
}

int narrow_run_quantized(Job job, const float *x, float levels, int num_threads) {
    job.k_padded = (job.k + 15) & ~(int64_t)15;
    int64_t groups = job.group_size > 0 ? job.k / job.group_size : 0;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(job.m * job.k_padded));
    float *x_scale = malloc(sizeof(float) * (size_t)job.m);
    int32_t *sums = groups ? malloc(sizeof(int32_t) * (size_t)(job.m * groups)) : NULL;
    int status = xq && x_scale && (sums || !groups) ? OK : NO_MEMORY;
    if (status == OK) status = quantize_rows(x, job.m, job.k, job.k_padded, levels, xq, x_scale);
    if (status == OK) {
        if (groups) sum_groups(xq, job.m, job.k, job.k_padded, job.group_size, sums);
        job.xq = xq;
        job.x_scale = x_scale;
        job.x_group_sum = sums;
        status = narrow_run_threads(job, num_threads);
    }
    free(xq);
    free(x_scale);
    free(sums);
    return status;
}

void narrow_store_pair(const Job *j, int64_t first, int64_t count, int64_t row, int pair, const float *out_a,
                       const float *out_b) {
    for (int64_t r = 0; r < count; r++) {
        int64_t column = first + r;
        float add = j->bias ? j->bias[column] : 0.0f;
        float column_scale = j->scale ? j->scale[column] : 1.0f;
        float step_a = j->x_scale ? j->x_scale[row] : 1.0f;
        j->y[row * j->n + column] = out_a[r] * step_a * column_scale + add;
        if (pair) {
            float step_b = j->x_scale ? j->x_scale[row + 1] : 1.0f;
            j->y[(row + 1) * j->n + column] = out_b[r] * step_b * column_scale + add;
        }
    }
}

static void *run_rows(void *argument) {
    const Job *j = argument;
    for (int64_t first = j->first_row; first < j->last_row; first += ROWS_PER_BLOCK) j->run_block(j, first);
    return NULL;
}

/* Splits the output rows of ``job`` over threads (each copy gets its first_row and last_row). */
int narrow_run_threads(Job job, int num_threads) {
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
