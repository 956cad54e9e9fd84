/* RMSNorm of float32 rows in one call: out = (x · (1 / sqrt(mean(x²) + eps))) · w, the operations and roundings
   of transformers' RMSNorm modules (Gemma's w being 1 + its weight) but for the order of the sum of squares.
   torch runs it as about ten operations; a decode step of Gemma 3 runs six norms a layer, so those calls, not
   the arithmetic, were the time. Many rows (a prefill chunk) spread over OpenMP's threads, torch's runtime. */
#include <math.h>
#include <stdint.h>

#define LANES 16        /* partial sums of squares, added in a fixed order at the end */
#define PARALLEL 65536  /* elements from which rows are shared out among threads */

static void norm_row(const float *x, int64_t d, const float *w, float eps, float *out) {
    float acc[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= d; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += x[c + l] * x[c + l];
    float sum = 0;
    for (int l = 0; l < LANES; l++)
        sum += acc[l];
    for (; c < d; c++)
        sum += x[c] * x[c];
    const float inverse = 1.0f / sqrtf(sum / (float)d + eps);
    for (c = 0; c < d; c++)
        out[c] = (x[c] * inverse) * w[c];
}

void se_rms_norm(const float *x, int64_t rows, int64_t x_stride, int64_t d, const float *w, float eps, float *out,
                 int64_t out_stride) {
    if (rows * d < PARALLEL) { /* a decode step's few rows: no thread team to wake */
        for (int64_t r = 0; r < rows; r++)
            norm_row(x + r * x_stride, d, w, eps, out + r * out_stride);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        norm_row(x + r * x_stride, d, w, eps, out + r * out_stride);
}
