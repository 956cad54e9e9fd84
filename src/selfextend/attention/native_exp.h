/* e^x on eight floats at a time, shared by the attention kernels (paged_native.c, few_native.c). */
#ifndef SELFEXTEND_NATIVE_EXP_H
#define SELFEXTEND_NATIVE_EXP_H

#include <stdint.h>

typedef float v8f __attribute__((vector_size(32))); /* eight floats: GCC/Clang vector extensions, any ISA */
typedef int32_t v8i __attribute__((vector_size(32)));

/* e^x for eight x <= 0 (Cephes' expf: a degree-5 polynomial on x - n·ln 2, scaled by 2^n), within 1.01 ulp of
   e^x over [-87, 0] (measured on 8M points); written on vectors because libm's expf is one call per element and
   loops over it do not vectorize */
static inline v8f exp_nonpositive(v8f x) {
    const v8i low = x < -87.0f; /* e^-87 ~ 1.6e-38: nothing in a sum with a term of 1 */
    x = (v8f)(((v8i)x & ~low) | ((v8i)(x - x + -87.0f) & low));
    const v8f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* nearest integer: + 1.5 * 2^23 */
    v8f r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const v8f y = p * (r * r) + r + 1.0f;
    return y * (v8f)((__builtin_convertvector(n, v8i) + 127) << 23);
}

static inline float exp_one(float x) {
    const v8f v = {x, x, x, x, x, x, x, x};
    return exp_nonpositive(v)[0];
}

#endif
