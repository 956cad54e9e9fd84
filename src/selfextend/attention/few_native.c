/* Softmax attention of a few query rows over many keys, float32, each key and value read once: a decode step's
   partials (partial.attend's few-row case), with each row's log-sum-exp for the merge.

   query [b, hq, n, d] and key/value [b, hkv, m, d] come with their strides (the head dimension unit-stride);
   an optional bool mask broadcast to [b, 1, n, m] with its strides (0 where broadcast). The hq / hkv query
   heads sharing a KV head, times the n queries, are that head's R rows: each key is read once for all R.
   Work items are (batch, KV head, chunk of keys), chunks small enough that every thread gets work, so one row
   spreads over every thread; a row's chunks are merged by log-sum-exp. out [b, hq, n, d] and lse [b, hq, n]
   are contiguous; a row that sees no key gets output 0 and lse -inf. Keys and values may be float16 (a float16 KV
   cache): each is widened to float32 (exactly) as it is loaded, before the same float32 arithmetic, so the result
   is bit for bit that of the widened cache, for half the bytes. se_attend_two takes two key sets, each with
   its own queries (a decode step's neighbor keys and its grouped keys), and merges them in the same pass. Threads
   are OpenMP's, the runtime torch itself uses. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../half.h"
#include "native_exp.h"

#define CHUNK 512 /* keys per work item, halved (down to MIN_CHUNK) until every thread has two */
#define MIN_CHUNK 64
#define SUB 16    /* keys whose logits are taken before their values are added (their values stay in L1) */
#define GROUP 4   /* rows read against each key or value vector at once */
#define KEYS_AHEAD 32 /* keys fetched this far ahead of their logits: the hardware prefetcher alone left the logits
                         waiting on their keys (a 16K-key float16 call 1.5-1.9 -> 1.1-1.3 ms, same bits) */
#define MAX_SEGMENTS 2 /* key sets with their own queries in one call */

typedef struct {
    const float *q;
    const void *k, *v; /* float32, or float16 bits where `half` */
    const uint8_t *mask;
    int64_t qb, qh, qn, kb, kh, km, vb, vh, vm, mb, mn, mm;
    int64_t hq, hkv, n, m, d, rows, padded, half;
    float scale;
} Args;

static inline v8f load8(const float *p) {
    v8f x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store8(float *p, v8f x) { memcpy(p, &x, sizeof x); }

static inline float sum8(v8f x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

static inline v8f max8(v8f a, v8f b) {
    const v8i greater = a > b;
    return (v8f)(((v8i)a & greater) | ((v8i)b & ~greater));
}

/* e where the logit x was a key's (e^-87 where x is -inf would add a hidden key's value, however little) */
static inline v8f seen(v8f x, v8f e) { return (v8f)((v8i)e & ~(x == -INFINITY)); }

/* The products' vectors: 16 floats where the CPU has AVX-512, else 8. Half the instructions for the same bytes:
   on an AVX-512 Intel VM a 16K-key float16 call read from memory took 1.09 ms against 1.17 in 8 lanes, 40K keys
   2.29 against 2.54 (medians of four rounds, benchmarks/decode_kernel.py): its reads and its arithmetic barely
   overlap (docs/results.md, session 33). */
#if defined(__AVX512F__)
#define LANES 16
typedef float vf __attribute__((vector_size(64)));
static inline vf widen_halves(const uint16_t *p) {
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline float sum_lanes(vf x) {
    const v8f low = {x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]};
    const v8f high = {x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]};
    return sum8(low + high);
}
#else
#define LANES 8
typedef v8f vf;
static inline vf widen_halves(const uint16_t *p) { return widen_half8(p); }
static inline float sum_lanes(vf x) { return sum8(x); }
#endif

static inline vf load_lanes(const float *p) {
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store_lanes(float *p, vf x) { memcpy(p, &x, sizeof x); }

/* eight keys' or values' entries from element i of row `p`, float32 or (`half`) float16 widened exactly */
static inline __attribute__((always_inline)) v8f load_kv8(const void *p, int64_t i, const int half) {
    return half ? widen_half8((const uint16_t *)p + i) : load8((const float *)p + i);
}

/* LANES keys' or values' entries from element i of row `p`, float32 or (`half`) float16 widened exactly */
static inline __attribute__((always_inline)) vf load_kv(const void *p, int64_t i, const int half) {
    return half ? widen_halves((const uint16_t *)p + i) : load_lanes((const float *)p + i);
}

static inline __attribute__((always_inline)) float kv_at(const void *p, int64_t i, const int half) {
    return half ? widen_half(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) const void *kv_row(const void *p, int64_t row, int64_t stride,
                                                                 const int half) {
    return (const char *)p + row * stride * (half ? 2 : 4);
}

/* the logits of GROUP rows from r0 (Q [padded][d]) against keys `key` and, when `two`, `key2`, into x[r][s] and
   x[r][s + 1]: each (row, key) sum is the same sequence of operations either way (so the same bits), but two keys
   give eight independent sums to interleave where one gives four, which wait on their own latency */
static inline __attribute__((always_inline)) void logits_of(const Args *A, const float *Q, const void *key,
                                                            const void *key2, int64_t r0, int64_t s, float *x,
                                                            const int half, const int two) {
    const int64_t d = A->d, body = d - d % LANES;
    const float *q = Q + r0 * d;
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t c = 0; c < body; c += LANES) {
        const vf q0 = load_lanes(q + c), q1 = load_lanes(q + d + c), q2 = load_lanes(q + 2 * d + c),
                 q3 = load_lanes(q + 3 * d + c);
        const vf kv = load_kv(key, c, half);
        a0 += q0 * kv;
        a1 += q1 * kv;
        a2 += q2 * kv;
        a3 += q3 * kv;
        if (two) {
            const vf kv2 = load_kv(key2, c, half);
            b0 += q0 * kv2;
            b1 += q1 * kv2;
            b2 += q2 * kv2;
            b3 += q3 * kv2;
        }
    }
    float t[GROUP] = {sum_lanes(a0), sum_lanes(a1), sum_lanes(a2), sum_lanes(a3)};
    float u[GROUP] = {sum_lanes(b0), sum_lanes(b1), sum_lanes(b2), sum_lanes(b3)};
    int64_t rest = body;
    if (LANES > 8 && rest + 8 <= d) { /* eight more as eight lanes (d = 72, 80, ...) */
        const v8f kv = load_kv8(key, rest, half), kv2 = two ? load_kv8(key2, rest, half) : kv;
        for (int g = 0; g < GROUP; g++) {
            t[g] += sum8(load8(q + g * d + rest) * kv);
            if (two) u[g] += sum8(load8(q + g * d + rest) * kv2);
        }
        rest += 8;
    }
    for (int64_t c = rest; c < d; c++)
        for (int g = 0; g < GROUP; g++) t[g] += q[g * d + c] * kv_at(key, c, half);
    for (int g = 0; g < GROUP; g++) x[(r0 + g) * SUB + s] = t[g] * A->scale;
    if (two) {
        for (int64_t c = rest; c < d; c++)
            for (int g = 0; g < GROUP; g++) u[g] += q[g * d + c] * kv_at(key2, c, half);
        for (int g = 0; g < GROUP; g++) x[(r0 + g) * SUB + s + 1] = u[g] * A->scale;
    }
}

/* logits x[r][s] = scale · Q[r] · k_(j0 + s) for the padded rows Q [padded][d] and `count` keys, two keys at a time;
   -inf where the mask hides the pair and past `count`. The keys' values are prefetched meanwhile (add_values reads
   them a column strip at a time, which the hardware prefetcher does not follow), and the keys KEYS_AHEAD on (a
   prefetch past the last key is harmless). */
static inline __attribute__((always_inline)) void take_logits(const Args *A, const float *Q, const void *K,
                                                              const void *V, int64_t b, int64_t j0, int64_t count,
                                                              float *x, const int half) {
    const int64_t row_bytes = A->d * (half ? 2 : 4);
    for (int64_t s = 0; s < count; s += 2) {
        const int two = s + 1 < count;
        const void *key = kv_row(K, j0 + s, A->km, half), *key2 = two ? kv_row(K, j0 + s + 1, A->km, half) : key;
        for (int64_t i = 0; i <= two; i++) {
            const char *value = kv_row(V, j0 + s + i, A->vm, half);
            const char *ahead = kv_row(K, j0 + s + i + KEYS_AHEAD, A->km, half);
            for (int64_t c = 0; c < row_bytes; c += 64) {
                __builtin_prefetch(value + c); /* read by add_values next */
                __builtin_prefetch(ahead + c);
            }
        }
        for (int64_t r0 = 0; r0 < A->padded; r0 += GROUP) {
            if (two)
                logits_of(A, Q, key, key2, r0, s, x, half, 1);
            else
                logits_of(A, Q, key, key2, r0, s, x, half, 0);
        }
    }
    for (int64_t r = 0; r < A->padded; r++)
        for (int64_t s = count; s < SUB; s++) x[r * SUB + s] = -INFINITY;
    if (A->mask)
        for (int64_t r = 0; r < A->rows; r++) {
            const uint8_t *seen = A->mask + b * A->mb + (r % A->n) * A->mn + j0 * A->mm;
            for (int64_t s = 0; s < count; s++)
                if (!seen[s * A->mm]) x[r * SUB + s] = -INFINITY;
        }
}

/* o[g] += sum_s w[g][s] · v_(j0 + s) in dimensions c .. c + vecs · LANES for GROUP rows, held in registers */
static inline __attribute__((always_inline)) void add_strip(const Args *A, const float *w, const void *V, int64_t j0,
                                                            int64_t count, float *o, int64_t c, const int half,
                                                            const int vecs) {
    const int64_t d = A->d;
    vf a[GROUP][2];
    for (int g = 0; g < GROUP; g++)
        for (int i = 0; i < vecs; i++) a[g][i] = load_lanes(o + g * d + c + i * LANES);
    for (int64_t s = 0; s < count; s++) {
        const void *value = kv_row(V, j0 + s, A->vm, half);
        for (int i = 0; i < vecs; i++) {
            const vf v = load_kv(value, c + i * LANES, half);
            for (int g = 0; g < GROUP; g++) a[g][i] += w[g * SUB + s] * v;
        }
    }
    for (int g = 0; g < GROUP; g++)
        for (int i = 0; i < vecs; i++) store_lanes(o + g * d + c + i * LANES, a[g][i]);
}

/* acc[r] += sum_s p[r][s] · v_(j0 + s) for the padded rows, a strip of 2 · LANES dimensions at a time (then one
   of LANES, then one dimension at a time) */
static inline __attribute__((always_inline)) void add_values(const Args *A, const float *p, const void *V,
                                                             int64_t j0, int64_t count, float *acc, const int half) {
    const int64_t d = A->d;
    for (int64_t r0 = 0; r0 < A->padded; r0 += GROUP) {
        float *o = acc + r0 * d;
        const float *w = p + r0 * SUB;
        int64_t c = 0;
        for (; c + 2 * LANES <= d; c += 2 * LANES) add_strip(A, w, V, j0, count, o, c, half, 2);
        if (c + LANES <= d) {
            add_strip(A, w, V, j0, count, o, c, half, 1);
            c += LANES;
        }
        for (; c < d; c++)
            for (int g = 0; g < GROUP; g++)
                for (int64_t s = 0; s < count; s++)
                    o[g * d + c] += w[g * SUB + s] * kv_at(kv_row(V, j0 + s, A->vm, half), c, half);
    }
}

/* One item: its rows' unnormalized softmax state over keys [lo, hi): max top[r], sum total[r], acc[r][d]. Q is
   the padded rows' copy, x scratch for SUB logits per padded row. Inlined twice: float32 and float16 keys. */
static inline __attribute__((always_inline)) void attend_as(const Args *A, int64_t b, int64_t h, int64_t lo,
                                                            int64_t hi, const float *Q, float *x, float *top,
                                                            float *total, float *acc, const int half) {
    const int64_t d = A->d;
    const void *K = kv_row(A->k, b * A->kb + h * A->kh, 1, half), *V = kv_row(A->v, b * A->vb + h * A->vh, 1, half);
    for (int64_t r = 0; r < A->padded; r++) {
        top[r] = -INFINITY;
        total[r] = 0.0f;
    }
    memset(acc, 0, A->padded * d * sizeof(float));
    for (int64_t j0 = lo; j0 < hi; j0 += SUB) {
        const int64_t count = hi - j0 < SUB ? hi - j0 : SUB;
        take_logits(A, Q, K, V, b, j0, count, x, half);
        for (int64_t r = 0; r < A->padded; r++) {
            float *p = x + r * SUB;
            const v8f p0 = load8(p), p1 = load8(p + 8);
            const v8f most = max8(p0, p1);
            float peak = -INFINITY;
            for (int i = 0; i < 8; i++) peak = most[i] > peak ? most[i] : peak;
            if (r >= A->rows || peak == -INFINITY) { /* a padding row, or every key here hidden: adds nothing */
                memset(p, 0, SUB * sizeof(float));
                continue;
            }
            if (peak > top[r]) {
                if (top[r] > -INFINITY) {
                    const float shrink = exp_one(top[r] - peak);
                    total[r] *= shrink;
                    for (int64_t c = 0; c < d; c++) acc[r * d + c] *= shrink;
                }
                top[r] = peak;
            }
            const v8f e0 = seen(p0, exp_nonpositive(p0 - top[r])), e1 = seen(p1, exp_nonpositive(p1 - top[r]));
            store8(p, e0);
            store8(p + 8, e1);
            total[r] += sum8(e0 + e1);
        }
        add_values(A, x, V, j0, count, acc, half);
    }
}

static void attend(const Args *A, int64_t b, int64_t h, int64_t lo, int64_t hi, const float *Q, float *x, float *top,
                   float *total, float *acc) {
    if (A->half)
        attend_as(A, b, h, lo, hi, Q, x, top, total, acc, 1);
    else
        attend_as(A, b, h, lo, hi, Q, x, top, total, acc, 0);
}

/* Attention of every row over the keys of `count` segments, each with its own queries, keys and values (a
   decode step's neighbor keys and grouped keys), merged into out and lse. Work items are (batch, KV head,
   segment, chunk of the segment's keys), a segment without keys one empty item. Returns 0, or -1 if memory ran
   out. */
static int64_t attend_segments(const Args *S, int64_t count, float *out, float *lse, int64_t b) {
    const int64_t hq = S->hq, hkv = S->hkv, n = S->n, d = S->d, g = hq / hkv, rows = S->rows, padded = S->padded;
    int64_t chunk = CHUNK, keys_chunks;
    for (;; chunk /= 2) {
        keys_chunks = 0;
        for (int64_t i = 0; i < count; i++) keys_chunks += (S[i].m + chunk - 1) / chunk;
        if (chunk <= MIN_CHUNK || b * hkv * keys_chunks >= 2 * omp_get_max_threads()) break;
    }
    int64_t first[MAX_SEGMENTS + 1]; /* segment i's items: first[i]..first[i + 1] - 1 of each (batch, KV head) */
    first[0] = 0;
    for (int64_t i = 0; i < count; i++) first[i + 1] = first[i] + (S[i].m > 0 ? (S[i].m + chunk - 1) / chunk : 1);
    const int64_t chunks = first[count], items = b * hkv * chunks;
    const int64_t state = padded * (2 + d); /* per item: top, total, acc */
    float *states = malloc(items * state * sizeof(float));
    if (!states) return -1;
    int64_t failed = 0;
#pragma omp parallel reduction(+ : failed)
    {
        float *Q = malloc(padded * (d + SUB) * sizeof(float)), *x = Q ? Q + padded * d : NULL;
        int64_t last = -1; /* the (batch, KV head, segment) whose rows Q holds */
        if (!Q) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!Q) continue;
            const int64_t pair = item / chunks, j = item % chunks, bi = pair / hkv, h = pair % hkv;
            int64_t i = 0;
            while (j >= first[i + 1]) i++;
            const Args *A = S + i;
            if (pair * count + i != last) {
                memset(Q, 0, padded * d * sizeof(float));
                for (int64_t r = 0; r < rows; r++)
                    memcpy(Q + r * d, A->q + bi * A->qb + (h * g + r / n) * A->qh + (r % n) * A->qn,
                           d * sizeof(float));
                last = pair * count + i;
            }
            float *st = states + item * state;
            const int64_t lo = (j - first[i]) * chunk, hi = lo + chunk < A->m ? lo + chunk : A->m;
            attend(A, bi, h, lo, hi, Q, x, st, st + padded, st + 2 * padded);
        }
        free(Q);
    }
    if (failed) {
        free(states);
        return -1;
    }
    /* merge each row's items by log-sum-exp */
#pragma omp parallel for schedule(static)
    for (int64_t pair = 0; pair < b * hkv; pair++) {
        const int64_t bi = pair / hkv, h = pair % hkv;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t row = (bi * hq + h * g + r / n) * n + r % n;
            float *o = out + row * d, peak = -INFINITY, sum = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float t = states[(pair * chunks + c) * state + r];
                peak = t > peak ? t : peak;
            }
            memset(o, 0, d * sizeof(float));
            if (peak == -INFINITY) {
                lse[row] = -INFINITY;
                continue;
            }
            for (int64_t c = 0; c < chunks; c++) {
                const float *st = states + (pair * chunks + c) * state;
                if (st[r] == -INFINITY) continue;
                const float w = exp_one(st[r] - peak);
                sum += st[padded + r] * w;
                for (int64_t i = 0; i < d; i++) o[i] += st[2 * padded + r * d + i] * w;
            }
            for (int64_t i = 0; i < d; i++) o[i] /= sum;
            lse[row] = peak + logf(sum);
        }
    }
    free(states);
    return 0;
}

/* The floats in this build's product vectors (16 where built for AVX-512): so a test can see the wide path taken */
int64_t se_lanes(void) { return LANES; }

/* Attention of every row into out and lse (keys and values float16 where `half`). Returns 0, or -1 if memory ran
   out. */
int64_t se_attend_few(const float *q, int64_t qb, int64_t qh, int64_t qn, const void *k, int64_t kb, int64_t kh,
                      int64_t km, const void *v, int64_t vb, int64_t vh, int64_t vm, const uint8_t *mask, int64_t mb,
                      int64_t mn, int64_t mm, float *out, float *lse, int64_t b, int64_t hq, int64_t hkv, int64_t n,
                      int64_t m, int64_t d, int64_t half, float scale) {
    const int64_t rows = hq / hkv * n, padded = (rows + GROUP - 1) / GROUP * GROUP;
    const Args A = {q, k, v, mask, qb, qh, qn, kb, kh, km, vb, vh, vm, mb, mn, mm, hq, hkv, n, m, d, rows, padded,
                    half, scale};
    return attend_segments(&A, 1, out, lse, b);
}

/* Attention of every row over two key sets without a mask, each with its own queries (strides as se_attend_few's;
   the second's after `_2`; both sets' keys and values float16 where `half`): one softmax over both, as merging
   their two partials would give. */
int64_t se_attend_two(const float *q, int64_t qb, int64_t qh, int64_t qn, const void *k, int64_t kb, int64_t kh,
                      int64_t km, const void *v, int64_t vb, int64_t vh, int64_t vm, int64_t m, const float *q_2,
                      int64_t qb_2, int64_t qh_2, int64_t qn_2, const void *k_2, int64_t kb_2, int64_t kh_2,
                      int64_t km_2, const void *v_2, int64_t vb_2, int64_t vh_2, int64_t vm_2, int64_t m_2,
                      float *out, float *lse, int64_t b, int64_t hq, int64_t hkv, int64_t n, int64_t d, int64_t half,
                      float scale) {
    const int64_t rows = hq / hkv * n, padded = (rows + GROUP - 1) / GROUP * GROUP;
    const Args S[2] = {{q, k, v, NULL, qb, qh, qn, kb, kh, km, vb, vh, vm, 0, 0, 0, hq, hkv, n, m, d, rows, padded,
                        half, scale},
                       {q_2, k_2, v_2, NULL, qb_2, qh_2, qn_2, kb_2, kh_2, km_2, vb_2, vh_2, vm_2, 0, 0, 0, hq, hkv, n,
                        m_2, d, rows, padded, half, scale}};
    return attend_segments(S, 2, out, lse, b);
}
