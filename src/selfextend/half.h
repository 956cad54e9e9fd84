/* IEEE half-precision (float16) bits widened to float32, exactly: the int8 weights' scales (linear_native.c) and a
   float16 KV cache (attention/few_native.c); and float32 narrowed to float16, rounded to nearest even as torch
   rounds it (the cache's writes, cache_native.c). One instruction with F16C or on Arm; elsewhere a portable
   formula. */
#ifndef SELFEXTEND_HALF_H
#define SELFEXTEND_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32))); /* eight floats: GCC/Clang vector extensions, any ISA */

#if defined(__F16C__)
#include <immintrin.h>
static inline float widen_half(uint16_t h) { return _cvtsh_ss(h); }
static inline v8f widen_half8(const uint16_t *p) { return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
#if defined(__ARM_FP16_FORMAT_IEEE)
static inline float widen_half(uint16_t h) {
    __fp16 v;
    memcpy(&v, &h, sizeof v);
    return v;
}
#else
static inline float widen_half(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const float magnitude = exponent == 0    ? ldexpf((float)mantissa, -24) /* zero and subnormals */
                            : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                             : ldexpf((float)(mantissa | 0x400), exponent - 25);
    return h & 0x8000 ? -magnitude : magnitude;
}
#endif
static inline v8f widen_half8(const uint16_t *p) {
    v8f v;
    for (int i = 0; i < 8; i++) v[i] = widen_half(p[i]);
    return v;
}
#endif

#if defined(__F16C__)
static inline uint16_t narrow_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#elif defined(__ARM_FP16_FORMAT_IEEE)
static inline uint16_t narrow_half(float f) {
    __fp16 v = (__fp16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}
#else
static inline uint16_t narrow_half(float f) { /* integer arithmetic only: no contraction can change it */
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, m = x & 0x7fffff;
    if (e == 0xff)
        return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0)); /* infinity; NaN as torch writes it */
    const int32_t exp = (int32_t)e - 112;              /* the float16 exponent field */
    if (exp >= 31)
        return (uint16_t)(sign | 0x7c00);
    uint32_t h, rest, half_way;
    if (exp <= 0) { /* a float16 subnormal (or zero): units of 2^-24 */
        if (exp < -10)
            return (uint16_t)sign;
        const int shift = 14 - exp;
        h = (m | 0x800000) >> shift, rest = (m | 0x800000) & ((1u << shift) - 1), half_way = 1u << (shift - 1);
    } else {
        h = ((uint32_t)exp << 10) | (m >> 13), rest = m & 0x1fff, half_way = 0x1000;
    }
    if (rest > half_way || (rest == half_way && (h & 1)))
        h++; /* a carry into the exponent rounds up to the next binade, or to infinity */
    return (uint16_t)(sign | h);
}
#endif

#endif
