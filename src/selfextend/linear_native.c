/* Products of float32 activations with int8 weights in blocks of 32 along the input, each block with its own
   float16 scale (llama.cpp's Q8_0 layout, for the weights only).

   out[t, r] = bias[r] + sum_k scale[r, k / 32] * q[r, k] * x[t, k]: the weights are widened to float32 and
   every product and sum is float32, so the activations keep their precision. A decode step reads every weight
   once, so its time is the bytes read: 1.0625 bytes per weight here against four for float32. Each token's sum
   runs in the same order whatever the other tokens in the call. Threads are OpenMP's (torch's runtime), over
   the output rows. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half.h"

#define QBLOCK 32    /* weights per scale */
#define MAX_ROWS 4   /* output rows per register tile */
#define MAX_TOKENS 2 /* tokens per register tile */
#define PREFETCH_TILES 1 /* how far ahead the weights are fetched */

#if defined(__AVX2__)
#include <immintrin.h>
/* the compilers widen an int8 vector a lane at a time from the extensions' conversions: x86 has one instruction */
static inline v8f widen8(const int8_t *p) {
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline v8f widen8(const int8_t *p) {
    v8f v;
    for (int i = 0; i < 8; i++)
        v[i] = p[i];
    return v;
}
#endif

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(v8f v) { /* a fixed order */
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* `rows` output rows from r for `tokens` tokens from t, constants where it is inlined so the accumulators stay
   in registers. Each block of 32 products is summed, then added times the block's scale; every (row, token)
   runs the same sequence of operations whatever the tile, so no token depends on the others in its call. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t xs, const int8_t *q,
                                                       const uint16_t *scale, const float *bias, float *out,
                                                       int64_t os, int64_t r, int64_t t, int64_t in,
                                                       int64_t blocks, int rows, int tokens) {
    v8f acc[MAX_ROWS][MAX_TOKENS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < tokens; j++)
            acc[i][j] = (v8f){0};
    const int64_t body = in - in % QBLOCK;
    /* the next tile's rows, fetched into every cache level while these are read (a prefetch past the end is
       harmless). On an AVX-512 Intel VM, weights read from memory: the LM head 7.9 ms against 9.9 two tiles on and
       13.3 with no prefetch, a 16K step 1.11x faster than two tiles on (docs/results.md, session 31); one tile on
       with the non-temporal hint made a step's products 10-15% slower on an earlier machine */
    const int8_t *ahead = q + (r + PREFETCH_TILES * rows) * in;
    for (int64_t k = 0; k < body; k += QBLOCK) {
        for (int64_t c = 0; c < QBLOCK * rows; c += 64)
            __builtin_prefetch(ahead + k * rows + c, 0, 3);
        v8f part[MAX_ROWS][MAX_TOKENS];
        for (int c = 0; c < QBLOCK; c += 8) {
            v8f wv[MAX_ROWS];
            for (int i = 0; i < rows; i++)
                wv[i] = widen8(q + (r + i) * in + k + c);
            for (int j = 0; j < tokens; j++) {
                const v8f xv = load8(x + (t + j) * xs + k + c);
                for (int i = 0; i < rows; i++)
                    part[i][j] = c ? part[i][j] + wv[i] * xv : wv[i] * xv;
            }
        }
        for (int i = 0; i < rows; i++) {
            const float sc = widen_half(scale[(r + i) * blocks + k / QBLOCK]);
            for (int j = 0; j < tokens; j++)
                acc[i][j] += part[i][j] * sc;
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < tokens; j++) {
            float s = sum8(acc[i][j]), tail = 0; /* a last, partial block */
            for (int64_t k = body; k < in; k++)
                tail += (float)q[(r + i) * in + k] * x[(t + j) * xs + k];
            if (body < in)
                s += tail * widen_half(scale[(r + i) * blocks + blocks - 1]);
            out[(t + j) * os + r + i] = bias ? s + bias[r + i] : s;
        }
}

#define TILE(rows, tokens) tile(x, xs, q, scale, bias, out, os, r, t, in, blocks, rows, tokens)

/* rows r..r+rows of every token: one token (a decode step) four rows at a time, more tokens two by two */
static inline __attribute__((always_inline)) void rows_of(const float *x, int64_t m, int64_t xs, const int8_t *q,
                                                          const uint16_t *scale, const float *bias, float *out,
                                                          int64_t os, int64_t r, int64_t in, int64_t blocks,
                                                          int rows) {
    int64_t t = 0;
    if (m == 1 && rows == MAX_ROWS) {
        TILE(MAX_ROWS, 1);
        return;
    }
    for (int64_t i = 0; i < rows; i += 2, r += 2) {
        const int pair = rows - i >= 2;
        for (t = 0; t + MAX_TOKENS <= m; t += MAX_TOKENS)
            pair ? TILE(2, MAX_TOKENS) : TILE(1, MAX_TOKENS);
        if (t < m)
            pair ? TILE(2, 1) : TILE(1, 1);
    }
}

/* out [m, out_rows] (row stride os) = x [m, in] (row stride xs) times the int8 weights q [out_rows, in] with
   scale [out_rows, ceil(in / 32)], plus bias (or NULL) */
void se_linear_int8(const float *x, int64_t m, int64_t xs, const int8_t *q, const uint16_t *scale, int64_t out_rows,
                    int64_t in, const float *bias, float *out, int64_t os) {
    const int64_t blocks = (in + QBLOCK - 1) / QBLOCK, groups = out_rows / MAX_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++)
        rows_of(x, m, xs, q, scale, bias, out, os, g * MAX_ROWS, in, blocks, MAX_ROWS);
    for (int64_t r = groups * MAX_ROWS; r < out_rows; r++)
        rows_of(x, m, xs, q, scale, bias, out, os, r, in, blocks, 1);
}

/* out [rows, in] = the float32 weights the int8 rows q [rows, in] with scale [rows, ceil(in / 32)] stand for: each
   code times its block's scale, one float32 product (the same bits as widening the codes and the scales in torch
   and multiplying), written once. A long call's matrix product is torch's on these; in one pass this is a third
   of the traffic of widening in torch. */
void se_widen_int8(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t in, float *out) {
    const int64_t blocks = (in + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const float sc = widen_half(scale[r * blocks + b]);
            const int64_t end = b * QBLOCK + QBLOCK < in ? b * QBLOCK + QBLOCK : in;
            for (int64_t k = b * QBLOCK; k < end; k++)
                out[r * in + k] = (float)q[r * in + k] * sc;
        }
}
