/* One decode step's attention for several rows of a float32 sink cache, read in place: each row's new key
 * and value are written into its next slot, then its query heads attend over its slots up to that one
 * (engine/decode_attention.py builds and loads this; see there for why).
 *
 * Shapes (float32; strides in floats, the last dimension contiguous):
 *   q      (B, Hkv * G, D)          row stride q_row: query head h * G + g reads kv head h (grouped-query)
 *   k_new  (B, Hkv, D), v_new alike row strides new_row (k) and vnew_row (v)
 *   k, v   (rows, Hkv, P, D)        the layer's whole buffers: row stride cache_row, head stride cache_head,
 *                                   slot stride D; batch row b is buffer row rows[b]
 *   slots  int64 (B,)               batch row b's new slot; it attends over slots 0 .. slots[b]
 *   out    (B, Hkv * G, D)          contiguous
 *
 * Per (row, kv head), and per part of its slots where there are fewer of those than 2 per thread (so that a
 * single row keeps every thread busy), the G queries share each key and value read: blocks of 64 slots, an
 * online softmax over them (running maximum and sum, as in flash attention), partial results merged at the
 * end. exp is a polynomial (Cephes' expf, relative error ~1e-7) on GCC vectors of 8 floats, which compile to
 * AVX2 or AVX-512 alike; parallel with OpenMP on the caller's team (PyTorch's libgomp, as int4_rows.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* v8f at any float's address */
typedef int32_t v8i __attribute__((vector_size(32)));

#define BLOCK 64    /* slots per softmax block */
#define MAX_G 16    /* query heads per kv head */
#define MAX_DV 32   /* D / 8: head dimensions up to 256 */

static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

static inline float sum8(v8f a) {
    a += __builtin_shuffle(a, (v8i){4, 5, 6, 7, 0, 1, 2, 3});
    a += __builtin_shuffle(a, (v8i){2, 3, 0, 1, 6, 7, 4, 5});
    a += __builtin_shuffle(a, (v8i){1, 0, 3, 2, 5, 4, 7, 6});
    return a[0];
}

/* e^x for x <= 0 (Cephes expf: x = n ln2 + f, |f| <= ln2 / 2, e^f by a degree-7 polynomial, times 2^n) */
static inline v8f exp8(v8f x) {
    v8i low = x < splat(-87.0f);
    x = (v8f)((low & (v8i)splat(-87.0f)) | (~low & (v8i)x));
    const v8f magic = splat(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    v8f n = (x * splat(1.44269504088896341f) + magic) - magic;
    v8f f = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v8f p = splat(1.9875691500e-4f);
    p = p * f + splat(1.3981999507e-3f);
    p = p * f + splat(8.3334519073e-3f);
    p = p * f + splat(4.1665795894e-2f);
    p = p * f + splat(1.6666665459e-1f);
    p = p * f + splat(5.0000001201e-1f);
    p = p * f * f + f + splat(1.0f);
    v8i scale = __builtin_convertvector(n, v8i) << 23;
    return (v8f)((v8i)p + scale);
}

/* slots [from, to) of one (row, kv head): running maxima m, sums l and unnormalised outputs acc (G, D) per
 * query. Scores query by query over a block of slots, 4 slots at a time (independent sums, and a block's keys
 * stay in L1 across the queries); then each query's weighted values over the block. Inlined with DV a
 * constant for the common head sizes, so that a query's and an output's vectors stay in registers. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *k, const float *v,
                                                         int64_t from, int64_t to, int64_t G, const int64_t DV,
                                                         float scale, float *m, float *l, float *acc) {
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * G * DV * 8);
    float score[BLOCK + 8] __attribute__((aligned(32)));
    for (int64_t start = from; start < to; start += BLOCK) {
        const int64_t n = to - start < BLOCK ? to - start : BLOCK, padded = (n + 7) & ~(int64_t)7;
        const float *keys = k + start * DV * 8, *values = v + start * DV * 8;
        for (int64_t g = 0; g < G; g++) {
            v8f qv[MAX_DV];
            for (int64_t j = 0; j < DV; j++)
                qv[j] = *(const v8u *)(q + (g * DV + j) * 8) * splat(scale);
            int64_t s = 0;
            for (; s + 4 <= n; s += 4) {
                const float *key = keys + s * DV * 8;
                v8f d0 = qv[0] * *(const v8u *)key, d1 = qv[0] * *(const v8u *)(key + DV * 8);
                v8f d2 = qv[0] * *(const v8u *)(key + 2 * DV * 8), d3 = qv[0] * *(const v8u *)(key + 3 * DV * 8);
                for (int64_t j = 1; j < DV; j++) {
                    d0 += qv[j] * *(const v8u *)(key + 8 * j);
                    d1 += qv[j] * *(const v8u *)(key + DV * 8 + 8 * j);
                    d2 += qv[j] * *(const v8u *)(key + 2 * DV * 8 + 8 * j);
                    d3 += qv[j] * *(const v8u *)(key + 3 * DV * 8 + 8 * j);
                }
                score[s] = sum8(d0);
                score[s + 1] = sum8(d1);
                score[s + 2] = sum8(d2);
                score[s + 3] = sum8(d3);
            }
            for (; s < n; s++) {
                const float *key = keys + s * DV * 8;
                v8f d = qv[0] * *(const v8u *)key;
                for (int64_t j = 1; j < DV; j++)
                    d += qv[j] * *(const v8u *)(key + 8 * j);
                score[s] = sum8(d);
            }
            float top = m[g];
            for (s = 0; s < n; s++)
                top = score[s] > top ? score[s] : top;
            const float shrink = m[g] == -INFINITY ? 0.0f : expf(m[g] - top);
            m[g] = top;
            v8f total = splat(0.0f);
            for (s = 0; s < padded; s += 8) {
                v8f e = exp8(*(v8f *)&score[s] - splat(top));
                if (s + 8 > n) { /* slots past the block's end weigh nothing */
                    for (int64_t i = n - s; i < 8; i++)
                        e[i] = 0.0f;
                }
                *(v8f *)&score[s] = e;
                total += e;
            }
            l[g] = l[g] * shrink + sum8(total);
            v8f out[MAX_DV];
            float *o = acc + g * DV * 8;
            for (int64_t j = 0; j < DV; j++)
                out[j] = *(v8u *)(o + 8 * j) * splat(shrink);
            for (s = 0; s < n; s++) {
                const v8f w = splat(score[s]);
                const float *value = values + s * DV * 8;
                for (int64_t j = 0; j < DV; j++)
                    out[j] += w * *(const v8u *)(value + 8 * j);
            }
            for (int64_t j = 0; j < DV; j++)
                *(v8u *)(o + 8 * j) = out[j];
        }
    }
}

int decode_attention(const float *q, int64_t q_row, const float *k_new, int64_t new_row, const float *v_new,
                     int64_t vnew_row, float *k, float *v, int64_t cache_row, int64_t cache_head,
                     const int64_t *rows, const int64_t *slots, float *out, int64_t B, int64_t Hkv, int64_t G,
                     int64_t D, float scale, int threads) {
    if (D % 8 || D / 8 > MAX_DV || G < 1 || G > MAX_G)
        return -1;
    const int64_t DV = D / 8, pairs = B * Hkv;
    int64_t parts = pairs >= 2 * threads ? 1 : (2 * threads + pairs - 1) / pairs;
    float *partial = NULL; /* per (pair, part, query): max, sum, D outputs */
    if (parts > 1 && !(partial = malloc(sizeof(float) * pairs * parts * G * (D + 2))))
        parts = 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) { /* the new key and value into their slot */
            int64_t b = pair / Hkv, h = pair % Hkv;
            int64_t at = rows[b] * cache_row + h * cache_head + slots[b] * D;
            memcpy(k + at, k_new + b * new_row + h * D, sizeof(float) * D);
            memcpy(v + at, v_new + b * vnew_row + h * D, sizeof(float) * D);
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < pairs * parts; task++) {
            int64_t pair = task / parts, part = task % parts, b = pair / Hkv, h = pair % Hkv;
            int64_t length = slots[b] + 1, from = length * part / parts, to = length * (part + 1) / parts;
            int64_t at = rows[b] * cache_row + h * cache_head;
            float m[MAX_G], l[MAX_G], acc[MAX_G * MAX_DV * 8] __attribute__((aligned(32)));
            const float *query = q + b * q_row + h * G * D;
            if (DV == 8) /* head size 64 */
                attend(query, k + at, v + at, from, to, G, 8, scale, m, l, acc);
            else if (DV == 16) /* 128 */
                attend(query, k + at, v + at, from, to, G, 16, scale, m, l, acc);
            else
                attend(query, k + at, v + at, from, to, G, DV, scale, m, l, acc);
            for (int64_t g = 0; g < G; g++) {
                float *dst = parts > 1 ? partial + ((pair * parts + part) * G + g) * (D + 2) + 2
                                       : out + (pair * G + g) * D;
                float norm = parts > 1 ? 1.0f : 1.0f / l[g];
                for (int64_t j = 0; j < DV; j++)
                    *(v8u *)(dst + 8 * j) = *(v8u *)(acc + (g * DV + j) * 8) * splat(norm);
                if (parts > 1) {
                    dst[-2] = m[g];
                    dst[-1] = l[g];
                }
            }
        }
        if (parts > 1) {
#pragma omp for schedule(static)
            for (int64_t query = 0; query < pairs * G; query++) { /* merge the parts of each query */
                int64_t pair = query / G, g = query % G;
                float top = -INFINITY, total = 0.0f;
                for (int64_t part = 0; part < parts; part++) {
                    float pm = partial[((pair * parts + part) * G + g) * (D + 2)];
                    top = pm > top ? pm : top;
                }
                float *dst = out + query * D;
                memset(dst, 0, sizeof(float) * D);
                for (int64_t part = 0; part < parts; part++) {
                    const float *src = partial + ((pair * parts + part) * G + g) * (D + 2);
                    if (src[1] == 0.0f)
                        continue; /* an empty part */
                    float w = expf(src[0] - top);
                    total += w * src[1];
                    for (int64_t d = 0; d < D; d++)
                        dst[d] += w * src[2 + d];
                }
                for (int64_t d = 0; d < D; d++)
                    dst[d] /= total;
            }
        }
    }
    free(partial);
    return 0;
}
