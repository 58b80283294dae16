/* Group-wise int4 weights (int4_weight_matmul): 4-bit codes with one float scale per (row,
 * group of a multiple of 32 columns), two codes a byte in the layout of pack_int4_codes in
 * services/engine/models/narrow_native.py.
 *
 * x goes to int16 as for int8. The kernel multiplies x by the nibbles as stored, code + 8, and
 * subtracts 8 times each group's sum of x's codes once per group: a 32-column chunk unpacks as
 * one widening of its 16 bytes, one mask (low nibbles) and one shift (high nibbles), with no
 * sign to restore. The vpmaddwd products sum per group in int32 and each group's sum enters a
 * float accumulator times its scale. Unpacking the chunk once per pair of x rows still makes
 * this compute-bound on one AVX2 core; it is what the 8 bits saved per weight cost. (Unpacking
 * a block once into a scratch buffer for all rows of x measured slower.)
 */
#include "narrow_matmul.h"

#ifdef __AVX2__
/* 32 nibbles (16 bytes: column j low, column 16 + j high) as two int16 vectors of code + 8. */
static inline void unpack_int4(const uint8_t *p, __m256i *low, __m256i *high) {
    __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *low = _mm256_and_si256(wide, _mm256_set1_epi16(0x0f));
    *high = _mm256_srli_epi16(wide, 4);
}

/* Four int4 rows against x rows a and, when ``pair``, b (a constant once inlined, so that a
 * lone row does no work for b): per group, integer sums, the offset of the stored codes taken
 * off, then times the group's scale into float lanes. */
static inline __attribute__((always_inline)) void int4_dot_rows(
    const uint8_t *const rows[ROWS_PER_BLOCK], const float *const scales[ROWS_PER_BLOCK], const int16_t *a,
    const int16_t *b, const int32_t *sum_a, const int32_t *sum_b, int64_t k, int64_t group_size, int prefetch,
    const int pair, float out_a[ROWS_PER_BLOCK], float out_b[ROWS_PER_BLOCK]) {
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
            __m256i q0 = pair ? _mm256_loadu_si256((const __m256i *)(b + i)) : p0;
            __m256i q1 = pair ? _mm256_loadu_si256((const __m256i *)(b + i + 16)) : p1;
            for (int r = 0; r < ROWS_PER_BLOCK; r++) {
                __m256i low, high;
                unpack_int4(rows[r] + i / 2, &low, &high);
                ia[r] = _mm256_add_epi32(ia[r], _mm256_add_epi32(_mm256_madd_epi16(low, p0), _mm256_madd_epi16(high, p1)));
                if (pair)
                    ib[r] = _mm256_add_epi32(ib[r], _mm256_add_epi32(_mm256_madd_epi16(low, q0), _mm256_madd_epi16(high, q1)));
            }
        }
        /* The stored codes are code + 8: take 8 times the group's sum of x off, in one lane. */
        __m256i offset_a = _mm256_setr_epi32(-8 * sum_a[group], 0, 0, 0, 0, 0, 0, 0);
        __m256i offset_b = pair ? _mm256_setr_epi32(-8 * sum_b[group], 0, 0, 0, 0, 0, 0, 0) : offset_a;
        for (int r = 0; r < ROWS_PER_BLOCK; r++) {
            __m256 step = _mm256_set1_ps(scales[r][group]);
            fa[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia[r], offset_a)), step, fa[r]);
            if (pair) fb[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ib[r], offset_b)), step, fb[r]);
        }
    }
    for (int r = 0; r < ROWS_PER_BLOCK; r++) {
        out_a[r] = float_lane_sum(fa[r]);
        out_b[r] = pair ? float_lane_sum(fb[r]) : 0.0f;
    }
}

static void int4_dot_block(const uint8_t *const rows[ROWS_PER_BLOCK], const float *const scales[ROWS_PER_BLOCK],
                           const int16_t *a, const int16_t *b, const int32_t *sum_a, const int32_t *sum_b,
                           int64_t k, int64_t group_size, int prefetch, float out_a[ROWS_PER_BLOCK],
                           float out_b[ROWS_PER_BLOCK]) {
    if (a != b) int4_dot_rows(rows, scales, a, b, sum_a, sum_b, k, group_size, prefetch, 1, out_a, out_b);
    else int4_dot_rows(rows, scales, a, a, sum_a, sum_a, k, group_size, prefetch, 0, out_a, out_b);
}
#endif

static inline int int4_code(const uint8_t *row, int64_t column) {
    uint8_t byte = row[(column / 32) * 16 + column % 16];
    return (column % 32 < 16 ? byte & 0x0f : byte >> 4) - 8;
}

static void run_int4_block(const Job *j, int64_t first) {
    int64_t count = narrow_block_count(j, first);
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
        const int32_t *sum_a = j->x_group_sum + row * groups;
        const int32_t *sum_b = b != a ? sum_a + groups : sum_a;
        int4_dot_block(rows, scales, a, b, sum_a, sum_b, j->k, j->group_size,
                       row == 0 && first + 2 * ROWS_PER_BLOCK <= j->n, out_a, out_b);
#else
        for (int r = 0; r < ROWS_PER_BLOCK; r++)
            for (int64_t i = 0; i < j->k; i++) {
                float step = scales[r][i / j->group_size];
                out_a[r] += step * (float)(int4_code(rows[r], i) * a[i]);
                out_b[r] += step * (float)(int4_code(rows[r], i) * b[i]);
            }
#endif
        narrow_store_pair(j, first, count, row, b != a, out_a, out_b);
    }
}

/* x [m, k] float32, w [n, k / 2] int4 nibbles (see int4_code), group_scale [n, k / group_size]
 * float32, bias [n] or NULL, y [m, n] float32; group_size a multiple of 32 dividing k. */
int int4_weight_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, const float *group_scale,
                       int64_t group_size, const float *bias, float *y, int64_t n, int num_threads) {
    if (m < 1 || k < 1 || n < 1 || group_size < 32 || group_size % 32 || k % group_size) return BAD_ARGUMENT;
    Job job = {.run_block = run_int4_block, .m = m, .k = k, .w4 = w, .group_scale = group_scale,
               .group_size = group_size, .bias = bias, .y = y, .n = n};
    return narrow_run_quantized(job, x, INT16_LEVELS, num_threads);
}
