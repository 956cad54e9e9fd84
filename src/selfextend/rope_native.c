/* A decode step's rotations in one call each, the same bits as torch's operations give: transformers' rotate-half
   RoPE (se_rope) and SelfExtend's further rotation to grouped positions (se_turn, rotary.rotate). torch runs each
   as a dozen operations per layer. */
#include <math.h>
#include <stdint.h>

#include "half.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁), each product and the sum rounded as torch's three
   operations round them (no fused multiply-add) */
static void rotate(const float *x, int64_t xb, int64_t xh, int64_t xn, const float *cos, const float *sin,
                   int64_t cb, int64_t cn, float *out, int64_t b, int64_t h, int64_t n, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < h; j++)
            for (int64_t t = 0; t < n; t++) {
                const float *row = x + i * xb + j * xh + t * xn, *c = cos + i * cb + t * cn, *s = sin + i * cb + t * cn;
                float *y = out + ((i * h + j) * n + t) * d;
                for (int64_t e = 0; e < half; e++) {
                    const float direct = row[e] * c[e], turned = (-row[e + half]) * s[e];
                    y[e] = direct + turned;
                }
                for (int64_t e = half; e < d; e++) {
                    const float direct = row[e] * c[e], turned = row[e - half] * s[e];
                    y[e] = direct + turned;
                }
            }
}

/* q [b, hq, n, d] and k [b, hk, n, d] (strides in elements; unit-stride rows), cos and sin [b, n, d] alike, into
   contiguous q_out and k_out. */
void se_rope(const float *q, int64_t qb, int64_t qh, int64_t qn, const float *k, int64_t kb, int64_t kh, int64_t kn,
             const float *cos, const float *sin, int64_t cb, int64_t cn, float *q_out, float *k_out, int64_t b,
             int64_t hq, int64_t hk, int64_t n, int64_t d) {
    rotate(q, qb, qh, qn, cos, sin, cb, cn, q_out, b, hq, n, d);
    rotate(k, kb, kh, kn, cos, sin, cb, cn, k_out, b, hk, n, d);
}

/* rotary.rotate (SelfExtend's grouped queries and keys, a decode step's few) in one call: each pair (x[e], x[e + d/2])
   turned by its position's angle, x₁·cos − x₂·sin and x₂·cos + x₁·sin, the second product fused into the sum (one
   rounding) as torch's addcmul_ fuses it, so the result is the same bits. x [b, h, n, d] (strides in elements;
   unit-stride rows) float32, or float16 when `half` (widened exactly, the result rounded to float16 once, as torch's
   .float() ... .to(float16)); cos and sin [b, n, d/2] alike; out [b, h, n, d] contiguous, x's dtype. */
void se_turn(const void *x, int64_t xb, int64_t xh, int64_t xn, const float *cos, const float *sin, int64_t cb,
             int64_t cn, void *out, int64_t b, int64_t h, int64_t n, int64_t d, int64_t half) {
    const int64_t pairs = d / 2;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < h; j++)
            for (int64_t t = 0; t < n; t++) {
                const int64_t in = i * xb + j * xh + t * xn, at = ((i * h + j) * n + t) * d;
                const float *c = cos + i * cb + t * cn, *s = sin + i * cb + t * cn;
                for (int64_t e = 0; e < pairs; e++) {
                    float x1, x2;
                    if (half) {
                        x1 = widen_half(((const uint16_t *)x)[in + e]);
                        x2 = widen_half(((const uint16_t *)x)[in + e + pairs]);
                    } else {
                        x1 = ((const float *)x)[in + e];
                        x2 = ((const float *)x)[in + e + pairs];
                    }
                    const float y1 = fmaf(-x2, s[e], x1 * c[e]), y2 = fmaf(x1, s[e], x2 * c[e]);
                    if (half) {
                        ((uint16_t *)out)[at + e] = narrow_half(y1);
                        ((uint16_t *)out)[at + e + pairs] = narrow_half(y2);
                    } else {
                        ((float *)out)[at + e] = y1;
                        ((float *)out)[at + e + pairs] = y2;
                    }
                }
            }
}
