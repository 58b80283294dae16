/* int8 weights, one float scale per output row (int8_weight_matmul).
 *
 * Why not torch's _weight_int8pack_mm: on an AVX2 core without VNNI it widens each weight to
 * float and so runs compute-bound at 5-6 GB/s of weight, slower than the memory can deliver; a
 * decode step (one to a few rows of x) then gains little from weights four times smaller. Here
 * each row of x is first quantized to int16 with its own scale (max |x| / 32767, a relative step
 * of 3e-5: far below the int8 weight's own error, and finer than the bfloat16 activations the
 * torch kernel takes). The products then run on integers: 16 weights sign-extended to int16 and
 * multiplied-and-pair-added against x by one vpmaddwd into int32 lanes, which is two to three
 * times the work per instruction of the float path and keeps a single core at memory speed.
 * Each int32 lane holds at most KCHUNK / 8 products of |w| <= 127 and |x| <= 32767, below 2^31;
 * lanes and chunks are summed in float.
 *
 * w8a8 asks for 127 levels instead of 32767: its int8 activation codes, as quantize_per_token
 * in services/engine/models/quantized.py makes them (symmetric per row, round half to even; x
 * times the step's reciprocal here, x divided by the step there, so a value on an exact half
 * may land one code apart), quantized here so that no PyTorch op runs per projection. A row of
 * x holding inf or NaN cannot be quantized: the call returns NOT_FINITE and the caller computes
 * that call another way.
 */
#include "narrow_matmul.h"

#define KCHUNK 2048

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
    int64_t count = narrow_block_count(j, first);
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
        narrow_store_pair(j, first, count, row, b != a, out_a, out_b);
    }
}

/* x [m, k] float32, w [n, k] int8 (row-major), scale [n] float32, bias [n] float32 or NULL,
 * y [m, n] float32; x quantized per row to activation_levels (32767: int16, 127: w8a8's int8). */
int int8_weight_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                       const float *bias, float *y, int64_t n, int num_threads, int activation_levels) {
    if (m < 1 || k < 1 || n < 1 || activation_levels < 1 || activation_levels > 32767) return BAD_ARGUMENT;
    Job job = {.run_block = run_int8_block, .m = m, .k = k, .w = w, .scale = scale, .bias = bias, .y = y, .n = n};
    return narrow_run_quantized(job, x, (float)activation_levels, num_threads);
}
