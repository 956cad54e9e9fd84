/* transformers' rotate-half RoPE of a decode step's queries and keys in one call: x·cos + rotate_half(x)·sin with
   rotate_half(x) = (−x₂, x₁), each product and the sum rounded as torch's three operations round them (no fused
   multiply-add), so the result is the same bits. torch runs it as a dozen operations per layer. */
#include <stdint.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

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
