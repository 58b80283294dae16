/* Decode attention that reads the paged KV cache in place (CPU).
 *
 * One query token per sequence attends to its sequence's first context_len cached
 * tokens, found through its block table; nothing is gathered or padded. Online
 * softmax (running max and sum) over one block at a time, float32 accumulation.
 * Work items are (sequence, kv head) pairs: the kv head's group of query heads
 * shares each key and value row read from memory (grouped-query attention).
 *
 * The running max starts at -FLT_MAX, not -inf: the kernel is built with -ffast-math (so
 * that expf vectorizes through glibc's libmvec), which assumes every value is finite.
 *
 * Built by services/engine/native.py with the system C compiler and called through
 * ctypes (which releases the GIL); plain C with no dependencies so it compiles in a
 * fraction of a second. Layouts match services/engine/attention_batch.py.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

typedef struct {
    const void *q; int64_t q_row_stride; /* elements between two tokens' query rows */
    const void *k_cache; const void *v_cache; /* [kv_heads, num_blocks, block_size, head_dim] */
    const int64_t *block_tables; int64_t table_stride; const int64_t *context_lens;
    void *out; /* [n, heads, head_dim] contiguous */
    int64_t n, heads, kv_heads, head_dim, block_size, num_blocks, window;
    float scale; int is_bf16;
    int64_t first_item, item_step;
} Job;

static inline float bf16_load(const uint16_t *p) {
    uint32_t bits = ((uint32_t)*p) << 16; float f; memcpy(&f, &bits, 4); return f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even, as torch does */
    uint32_t bits; memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Row ``offset`` of a cache or query tensor as float32: in place for a float32 tensor,
 * widened into ``buffer`` for bfloat16. */
static inline const float *row_at(const Job *j, const void *base, int64_t offset, int64_t D, float *buffer) {
    if (!j->is_bf16) return (const float *)base + offset;
    const uint16_t *src = (const uint16_t *)base + offset;
    for (int64_t d = 0; d < D; d++) buffer[d] = bf16_load(src + d);
    return buffer;
}

/* Blocks lie wherever the allocator put them, so the hardware prefetcher, which follows
 * sequential addresses, stalls at every block boundary: ask for the next block's keys and
 * values while this one is computed (1.2x on 32 sequences of 330 tokens, SmolLM2's heads). */
static void prefetch_block(const Job *j, int64_t offset) {
    const int64_t element = j->is_bf16 ? 2 : 4;
    const int64_t bytes = j->block_size * j->head_dim * element;
    const char *k = (const char *)j->k_cache + offset * element;
    const char *v = (const char *)j->v_cache + offset * element;
    for (int64_t line = 0; line < bytes; line += 64) {
        __builtin_prefetch(k + line, 0, 3);
        __builtin_prefetch(v + line, 0, 3);
    }
}

static inline __attribute__((always_inline)) void attend_item(const Job *j, int64_t item, const int64_t D) {
    const int64_t seq = item / j->kv_heads, kvh = item % j->kv_heads;
    const int64_t group = j->heads / j->kv_heads, BS = j->block_size;
    const int64_t len = j->context_lens[seq];
    const int64_t start = (j->window > 0 && len > j->window) ? len - j->window : 0;
    const int64_t *table = j->block_tables + seq * j->table_stride;
    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
    float row_max[MAX_GROUP], row_sum[MAX_GROUP], score[MAX_GROUP][64];
    float k_buffer[64][MAX_HEAD_DIM], v_buffer[64][MAX_HEAD_DIM];
    const float *k_rows[64], *v_rows[64];
    int64_t g, d, t;
    for (g = 0; g < group; g++) {
        const float *query = row_at(j, j->q, seq * j->q_row_stride + (kvh * group + g) * D, D, q[g]);
        for (d = 0; d < D; d++) q[g][d] = query[d] * j->scale;
        memset(acc[g], 0, (size_t)D * sizeof(float));
        row_max[g] = -FLT_MAX; row_sum[g] = 0.0f;
    }
    for (int64_t pos = start - start % BS; pos < len; pos += BS) {
        const int64_t block = table[pos / BS];
        const int64_t lo = pos < start ? start - pos : 0;
        const int64_t hi = (len - pos) < BS ? (len - pos) : BS;
        const int64_t base = ((kvh * j->num_blocks + block) * BS) * D;
        if (pos + BS < len) prefetch_block(j, ((kvh * j->num_blocks + table[pos / BS + 1]) * BS) * D);
        for (t = lo; t < hi; t++) {
            k_rows[t] = row_at(j, j->k_cache, base + t * D, D, k_buffer[t]);
            v_rows[t] = row_at(j, j->v_cache, base + t * D, D, v_buffer[t]);
        }
        for (g = 0; g < group; g++) {
            float block_max = -FLT_MAX;
            for (t = lo; t < hi; t++) {
                float s = 0.0f;
                for (d = 0; d < D; d++) s += q[g][d] * k_rows[t][d];
                score[g][t] = s;
                if (s > block_max) block_max = s;
            }
            const float new_max = block_max > row_max[g] ? block_max : row_max[g];
            const float rescale = expf(row_max[g] - new_max);
            row_sum[g] *= rescale;
            for (d = 0; d < D; d++) acc[g][d] *= rescale;
            for (t = lo; t < hi; t++) {
                score[g][t] = expf(score[g][t] - new_max);
                row_sum[g] += score[g][t];
            }
            row_max[g] = new_max;
        }
        for (t = lo; t < hi; t++) {
            const float *v_row = v_rows[t];
            for (g = 0; g < group; g++) {
                const float p = score[g][t];
                for (d = 0; d < D; d++) acc[g][d] += p * v_row[d];
            }
        }
    }
    for (g = 0; g < group; g++) {
        const float inv = row_sum[g] > 0.0f ? 1.0f / row_sum[g] : 0.0f;
        const int64_t offset = (seq * j->heads + kvh * group + g) * D;
        if (j->is_bf16) {
            uint16_t *dst = (uint16_t *)j->out + offset;
            for (d = 0; d < D; d++) dst[d] = bf16_store(acc[g][d] * inv);
        } else {
            float *dst = (float *)j->out + offset;
            for (d = 0; d < D; d++) dst[d] = acc[g][d] * inv;
        }
    }
}

static void *run_items(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t items = j->n * j->kv_heads;
    /* A head size known at compile time lets the compiler unroll every row loop. */
    if (j->head_dim == 64) {
        for (int64_t item = j->first_item; item < items; item += j->item_step) attend_item(j, item, 64);
    } else if (j->head_dim == 128) {
        for (int64_t item = j->first_item; item < items; item += j->item_step) attend_item(j, item, 128);
    } else {
        for (int64_t item = j->first_item; item < items; item += j->item_step) attend_item(j, item, j->head_dim);
    }
    return NULL;
}

/* Returns 0 on success, 1 when a dimension exceeds the kernel's fixed buffers. */
int paged_decode_attention(
    const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
    const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens, void *out,
    int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
    int64_t window, float scale, int is_bf16, int num_threads) {
    if (heads / kv_heads > MAX_GROUP || head_dim > MAX_HEAD_DIM || block_size > 64) return 1;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 8) num_threads = 8;
    if (num_threads > n * kv_heads) num_threads = (int)(n * kv_heads);
    Job jobs[8];
    pthread_t threads[8];
    for (int i = 0; i < num_threads; i++) {
        Job job = {q, q_row_stride, k_cache, v_cache, block_tables, table_stride, context_lens, out,
                   n, heads, kv_heads, head_dim, block_size, num_blocks, window, scale, is_bf16,
                   i, num_threads};
        jobs[i] = job;
    }
    int started = 0;
    for (int i = 1; i < num_threads; i++) {
        if (pthread_create(&threads[i], NULL, run_items, &jobs[i]) != 0) break;
        started = i;
    }
    /* Items of threads that failed to start are run here, after our own. */
    run_items(&jobs[0]);
    for (int i = started + 1; i < num_threads; i++) run_items(&jobs[i]);
    for (int i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    return 0;
}
