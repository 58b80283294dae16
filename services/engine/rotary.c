/* Rotary position embedding of float32 heads, "rotate half" layout: the first and second halves
 * of each head vector are the (real, imaginary) parts, rotated by the token's angles.
 *
 * PyTorch runs it as eight operators (two slices, four multiplies, a subtraction and an
 * addition, the concatenation): ~17 us per layer at one token, where the arithmetic takes well
 * under one. Here it is one call that reads the heads where they lie in the fused q/k/v
 * projection's output and writes them contiguous. Built and called like the other kernels
 * (services/engine/native.py); the loops are left to the compiler's vectorizer.
 */
#include <stdint.h>

/* x: token t's head h at x + t * token_stride + h * head_dim; cos, sin: [tokens, head_dim / 2];
 * out: [tokens, heads, head_dim] contiguous. */
void rotate_heads(const float *x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
                  const float *cos, const float *sin, float *out) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *first = x + t * token_stride + h * head_dim, *second = first + half;
            float *low = out + (t * heads + h) * head_dim, *high = low + half;
            for (int64_t i = 0; i < half; i++) {
                low[i] = first[i] * c[i] - second[i] * s[i];
                high[i] = second[i] * c[i] + first[i] * s[i];
            }
        }
    }
}
