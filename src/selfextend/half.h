/* IEEE half-precision (float16) bits widened to float32, exactly: the int8 weights' scales (linear_native.c) and a
   float16 KV cache (attention/few_native.c). One instruction with F16C or on Arm; elsewhere a portable formula. */
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

#endif
