/* A few positions of keys or values written into a float16 KV cache in one call: float32 rows narrowed to
   float16 (rounded to nearest even, as torch's copy rounds them), and how many were past float16's range, which
   the caller refuses. torch takes two operations to check the range and one to copy, each costing more than the
   writing itself at a decode step's one position per layer. */
#include <math.h>
#include <stdint.h>

#include "half.h"

#define HALF_MAX 65504.0f

/* src and dst are [b, h, t, d] with strides (in elements) for b, h and t, and unit-stride rows of d. */
int64_t se_store_half(const float *src, int64_t sb, int64_t sh, int64_t st, uint16_t *dst, int64_t db, int64_t dh,
                      int64_t dt, int64_t b, int64_t h, int64_t t, int64_t d) {
    int64_t past = 0;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < h; j++)
            for (int64_t k = 0; k < t; k++) {
                const float *x = src + i * sb + j * sh + k * st;
                uint16_t *y = dst + i * db + j * dh + k * dt;
                int64_t c = 0;
#if defined(__F16C__)
                for (; c + 8 <= d; c += 8) {
                    const __m256 v = _mm256_loadu_ps(x + c);
                    const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
                    past += __builtin_popcount(
                        _mm256_movemask_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(HALF_MAX), _CMP_GT_OQ)));
                    _mm_storeu_si128((__m128i *)(y + c), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
                }
#endif
                for (; c < d; c++) {
                    past += fabsf(x[c]) > HALF_MAX;
                    y[c] = narrow_half(x[c]);
                }
            }
    return past;
}
