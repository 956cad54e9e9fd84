/* SelfExtend attention read in place from a paged KV cache (vLLM's CPU layout), float32, in one call per layer.

   The same attention as paged.py's `paged_attention` (and the oracle): query at position i, key at j <= i,
   neighbor logits q_i . k_j when i - j < W, grouped logits g(q_i) . g(k_j) otherwise, one softmax over the
   row. The grouped vectors come from the rotated ones by a further rotation whose cos/sin tables by position
   the caller builds (rotary.py's one formula); this file only applies them. Without the per-layer chain of
   small torch operations a decode step is a handful of microseconds of attention instead of a millisecond.

   Layouts (float32; block and head strides given, each block's matrix contiguous):
     keys      per block and KV head [d][block_size], stored transposed (as vLLM CPU_ATTN's vec layouts);
     values    per block and KV head [block_size][d], with the keys' block and head strides;
     grouped   the kept grouped keys, per block and head [d][block_size] like the keys (or NULL: rotate
               the keys read here with the key table);
     tables    cos/sin [positions, d/2], pairs (x[k], x[k + d/2]) as Hugging Face's rotate-half.
   Work items are (row, query, kv head, chunk of CHUNK keys): a single long row still spreads over all threads;
   a row's chunks are merged by log-sum-exp. Threads are OpenMP's, the runtime torch itself uses. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_exp.h"

#define CHUNK 512

/* Rotations round as torch's `rotate` does (x1·cos rounded, then one fused multiply-add of x2·sin), so kept
   grouped keys are bit-for-bit the ones the torch paths compute. */
#if defined(__clang__)
#define UNFUSED
#define NO_CONTRACT _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define UNFUSED __attribute__((optimize("fp-contract=off")))
#define NO_CONTRACT
#else
#define UNFUSED
#define NO_CONTRACT
#endif

typedef struct {
    const float *query, *keys, *values, *grouped, *qcos, *qsin, *kcos, *ksin;
    float *out;
    const int32_t *table, *seq_lens, *query_start;
    int64_t qts, qhs, ots, ohs, kvb, kvh, gb, gh, ts, hq, h, d, bs, window;
    float scale;
} Args;

typedef struct {
    int32_t row, t, kh, chunk, chunks;
    int64_t partial; /* index of its (max, sum, acc) in the scratch, or -1: a single chunk writes the output */
} Item;

#define LANES 16 /* accumulators held in registers: 16 floats, two AVX2 vectors */

/* out[a][s] = sum_k q[a][k] * T[k][s] for the g vectors q [g][d] and the block T [d][bs]; LANES slots at a
   time, summed in registers (an accumulator in memory would wait on its own store at every k) */
static void block_dots(const float *q, int64_t g, int64_t d, const float *T, int64_t bs, float *out) {
    for (int64_t a = 0; a < g; a++) {
        const float *qa = q + a * d;
        int64_t s0 = 0;
        for (; s0 + LANES <= bs; s0 += LANES) {
            float acc[LANES] = {0};
            for (int64_t k = 0; k < d; k++) {
                const float x = qa[k], *t = T + k * bs + s0;
#pragma omp simd
                for (int l = 0; l < LANES; l++) acc[l] += x * t[l];
            }
            for (int l = 0; l < LANES; l++) out[a * bs + s0 + l] = acc[l];
        }
        for (int64_t s = s0; s < bs; s++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < d; k++) acc += qa[k] * T[k * bs + s];
            out[a * bs + s] = acc;
        }
    }
}

/* o[k] += sum_{s in [s0, s1)} p[s] * V[s][k] for a block's values V [bs][d]; LANES dimensions at a time */
static void add_values(const float *p, const float *V, int64_t s0, int64_t s1, int64_t d, float *o) {
    int64_t k0 = 0;
    for (; k0 + LANES <= d; k0 += LANES) {
        float acc[LANES] = {0};
        for (int64_t s = s0; s < s1; s++) {
            const float w = p[s], *v = V + s * d + k0;
#pragma omp simd
            for (int l = 0; l < LANES; l++) acc[l] += w * v[l];
        }
        for (int l = 0; l < LANES; l++) o[k0 + l] += acc[l];
    }
    for (int64_t k = k0; k < d; k++)
        for (int64_t s = s0; s < s1; s++) o[k] += p[s] * V[s * d + k];
}

/* rotate the pairs of x [d] by the angles at row p of a table (cos, sin [., d/2]) into y */
UNFUSED static void rotate_vector(const float *x, const float *cos, const float *sin, int64_t p, int64_t d, float *y) {
    NO_CONTRACT
    const int64_t half = d / 2;
    const float *c = cos + p * half, *s = sin + p * half;
    for (int64_t k = 0; k < half; k++) {
        y[k] = fmaf(-x[k + half], s[k], x[k] * c[k]);
        y[k + half] = fmaf(x[k], s[k], x[k + half] * c[k]);
    }
}

/* the block's keys T [d][bs], stored at positions start.., rotated to their grouped positions into R */
UNFUSED static void rotate_block(const float *T, const Args *A, int64_t start, float *R) {
    NO_CONTRACT
    const int64_t half = A->d / 2, bs = A->bs;
    for (int64_t k = 0; k < half; k++) {
        for (int64_t s = 0; s < bs; s++) {
            const float c = A->kcos[(start + s) * half + k], sn = A->ksin[(start + s) * half + k];
            const float x1 = T[k * bs + s], x2 = T[(k + half) * bs + s];
            R[k * bs + s] = fmaf(-x2, sn, x1 * c);
            R[(k + half) * bs + s] = fmaf(x1, sn, x2 * c);
        }
    }
}

/* One item: its queries' unnormalized softmax state over keys [lo, hi): max m[g], sum l[g], acc[g][d]. */
static int64_t attend(const Args *A, const Item *it, float *scratch, float *m, float *l, float *acc) {
    const int64_t d = A->d, bs = A->bs, g = A->hq / A->h, W = A->window;
    const int64_t row = it->row, n = A->seq_lens[row], q0 = A->query_start[row];
    const int64_t ql = A->query_start[row + 1] - q0, i = n - ql + it->t, token = q0 + it->t;
    const int64_t lo = (int64_t)it->chunk * CHUNK, hi = lo + CHUNK < i + 1 ? lo + CHUNK : i + 1;
    float *logits = scratch, *near = logits + g * CHUNK, *far = near + g * bs, *qn = far + g * bs;
    float *qg = qn + g * d, *rotated = qg + g * d;
    int64_t keys_rotated = 0;
    for (int64_t a = 0; a < g; a++) {
        const float *q = A->query + token * A->qts + (it->kh * g + a) * A->qhs;
        for (int64_t k = 0; k < d; k++) qn[a * d + k] = q[k];
        rotate_vector(qn + a * d, A->qcos, A->qsin, i, d, qg + a * d);
    }
    for (int64_t b = lo / bs; b * bs < hi; b++) {
        const int64_t start = b * bs, block = A->table[row * A->ts + b];
        const int64_t s0 = (lo > start ? lo : start) - start, s1 = (hi < start + bs ? hi : start + bs) - start;
        const float *KT = A->keys + block * A->kvb + it->kh * A->kvh;
        const int any_near = i - (start + s1 - 1) < W, any_far = i - (start + s0) >= W;
        if (any_near) block_dots(qn, g, d, KT, bs, near);
        if (any_far) {
            const float *GT;
            if (A->grouped) {
                GT = A->grouped + block * A->gb + it->kh * A->gh;
            } else {
                rotate_block(KT, A, start, rotated);
                GT = rotated;
                if (it->kh == 0) keys_rotated += s1 - s0; /* counted once per key, not per KV head */
            }
            block_dots(qg, g, d, GT, bs, far);
        }
        /* slots [s0, split) are far (i - j >= W), [split, s1) near */
        const int64_t split = i - W - start + 1 < s0 ? s0 : (i - W - start + 1 > s1 ? s1 : i - W - start + 1);
        for (int64_t a = 0; a < g; a++) {
            float *x = logits + a * CHUNK + start - lo;
            const float *f = far + a * bs, *e = near + a * bs;
            for (int64_t s = s0; s < split; s++) x[s] = f[s] * A->scale;
            for (int64_t s = split; s < s1; s++) x[s] = e[s] * A->scale;
        }
    }
    for (int64_t a = 0; a < g; a++) {
        float *x = logits + a * CHUNK, top = -INFINITY, sum = 0.0f;
        const int64_t count = hi - lo, whole = count - count % LANES;
        float tops[LANES];
        for (int v = 0; v < LANES; v++) tops[v] = -INFINITY;
        for (int64_t j = 0; j < whole; j += LANES)
            for (int v = 0; v < LANES; v++) tops[v] = x[j + v] > tops[v] ? x[j + v] : tops[v];
        for (int64_t j = whole; j < count; j++) top = x[j] > top ? x[j] : top;
        for (int v = 0; v < LANES; v++) top = tops[v] > top ? tops[v] : top;
        v8f sums = {0};
        int64_t j = 0;
        for (; j + 8 <= count; j += 8) {
            v8f e;
            memcpy(&e, x + j, sizeof e);
            e = exp_nonpositive(e - top);
            memcpy(x + j, &e, sizeof e);
            sums += e;
        }
        for (; j < count; j++) {
            x[j] = exp_one(x[j] - top);
            sum += x[j];
        }
        for (int v = 0; v < 8; v++) sum += sums[v];
        m[a] = top;
        l[a] = sum;
        for (int64_t k = 0; k < d; k++) acc[a * d + k] = 0.0f;
    }
    for (int64_t b = lo / bs; b * bs < hi; b++) {
        const int64_t start = b * bs, block = A->table[row * A->ts + b];
        const int64_t s0 = (lo > start ? lo : start) - start, s1 = (hi < start + bs ? hi : start + bs) - start;
        const float *V = A->values + block * A->kvb + it->kh * A->kvh;
        for (int64_t a = 0; a < g; a++) add_values(logits + a * CHUNK + start - lo, V, s0, s1, d, acc + a * d);
    }
    return keys_rotated;
}

static float *output_row(const Args *A, int64_t row, int64_t t, int64_t head) {
    return A->out + (A->query_start[row] + t) * A->ots + head * A->ohs;
}

/* SelfExtend attention of the queries of `rows` (their tokens' rows of `query`) into the same rows of `out`.
   Returns the keys rotated here (0 with kept grouped keys), or -1 if memory ran out. */
int64_t se_paged_attention(const float *query, int64_t qts, int64_t qhs, float *out, int64_t ots, int64_t ohs,
                           const float *keys, const float *values, int64_t kvb, int64_t kvh,
                           const float *grouped, int64_t gb, int64_t gh, const int32_t *table, int64_t ts,
                           const int32_t *seq_lens, const int32_t *query_start, const int32_t *rows, int64_t n_rows,
                           int64_t hq, int64_t h, int64_t d, int64_t bs, const float *qcos, const float *qsin,
                           const float *kcos, const float *ksin, int64_t window, float scale) {
    const Args A = {query, keys, values, grouped, qcos, qsin, kcos, ksin, out, table, seq_lens, query_start,
                    qts, qhs, ots, ohs, kvb, kvh, gb, gh, ts, hq, h, d, bs, window, scale};
    const int64_t g = hq / h;
    int64_t n_items = 0, n_partials = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = rows[r], ql = query_start[row + 1] - query_start[row];
        for (int64_t t = 0; t < ql; t++) {
            const int64_t chunks = (seq_lens[row] - ql + t + 1 + CHUNK - 1) / CHUNK;
            n_items += chunks * h;
            n_partials += chunks > 1 ? chunks * h : 0;
        }
    }
    Item *items = malloc((n_items ? n_items : 1) * sizeof(Item));
    float *partials = malloc((n_partials ? n_partials : 1) * (2 + d) * g * sizeof(float));
    if (!items || !partials) {
        free(items);
        free(partials);
        return -1;
    }
    int64_t next = 0, next_partial = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        const int32_t row = rows[r], ql = query_start[row + 1] - query_start[row];
        for (int32_t t = 0; t < ql; t++) {
            const int32_t chunks = (seq_lens[row] - ql + t + 1 + CHUNK - 1) / CHUNK;
            for (int32_t kh = 0; kh < h; kh++)
                for (int32_t c = 0; c < chunks; c++)
                    items[next++] = (Item){row, t, kh, c, chunks, chunks > 1 ? next_partial++ : -1};
        }
    }
    int64_t keys_rotated = 0, failed = 0;
    const int64_t scratch_size = g * CHUNK + 2 * g * bs + 2 * g * d + d * bs + (2 + d) * g;
#pragma omp parallel reduction(+ : keys_rotated, failed)
    {
        float *scratch = malloc(scratch_size * sizeof(float));
        if (!scratch) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < n_items; x++) {
            if (!scratch) continue;
            const Item *it = items + x;
            float *state = it->partial >= 0 ? partials + it->partial * (2 + d) * g : scratch + scratch_size - (2 + d) * g;
            float *m = state, *l = m + g, *acc = l + g;
            keys_rotated += attend(&A, it, scratch, m, l, acc);
            if (it->partial < 0)
                for (int64_t a = 0; a < g; a++) {
                    float *o = output_row(&A, it->row, it->t, it->kh * g + a);
                    for (int64_t k = 0; k < d; k++) o[k] = acc[a * d + k] / l[a];
                }
        }
        free(scratch);
    }
    /* merge each multi-chunk (row, query, kv head) by log-sum-exp: its chunks are consecutive items */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t x = 0; x < n_items; x++) {
        const Item *it = items + x;
        if (it->partial < 0 || it->chunk != 0) continue;
        for (int64_t a = 0; a < g; a++) {
            float top = -INFINITY, sum = 0.0f;
            for (int64_t c = 0; c < it->chunks; c++) {
                const float mc = partials[(it->partial + c) * (2 + d) * g + a];
                top = mc > top ? mc : top;
            }
            float *o = output_row(&A, it->row, it->t, it->kh * g + a);
            for (int64_t k = 0; k < d; k++) o[k] = 0.0f;
            for (int64_t c = 0; c < it->chunks; c++) {
                const float *state = partials + (it->partial + c) * (2 + d) * g;
                const float w = exp_one(state[a] - top);
                sum += state[g + a] * w;
                for (int64_t k = 0; k < d; k++) o[k] += state[2 * g + a * d + k] * w;
            }
            for (int64_t k = 0; k < d; k++) o[k] /= sum;
        }
    }
    free(items);
    free(partials);
    return failed ? -1 : keys_rotated;
}

/* Write the grouped keys of a step's new tokens into the kept cache (per block and head [d][bs]) at their slots:
   token t of request r sits at position seq_lens[r] - q_r + (t - query_start[r]); slots < 0 are padding.
   Returns the keys written. */
int64_t se_write_grouped(const float *key, int64_t kts, int64_t khs, const int64_t *slots, const int32_t *query_start,
                         const int32_t *seq_lens, int64_t n_requests, const float *kcos, const float *ksin,
                         float *grouped, int64_t gb, int64_t gh, int64_t h, int64_t d, int64_t bs) {
    int64_t written = 0;
    float y[1024];
    for (int64_t r = 0; r < n_requests; r++) {
        const int64_t q0 = query_start[r], ql = query_start[r + 1] - q0;
        for (int64_t t = q0; t < q0 + ql; t++) {
            const int64_t slot = slots[t], position = seq_lens[r] - ql + (t - q0);
            if (slot < 0) continue;
            for (int64_t kh = 0; kh < h; kh++) {
                float *G = grouped + (slot / bs) * gb + kh * gh + slot % bs;
                rotate_vector(key + t * kts + kh * khs, kcos, ksin, position, d, y);
                for (int64_t k = 0; k < d; k++) G[k * bs] = y[k];
            }
            written++;
        }
    }
    return written;
}
