/* y (M, N) = x (M, K) @ W.T for a few rows x in float32 and W in int8 codes with a scale per output, each
 * weight converted once for all the rows (engine/int8_rows.py builds and loads this; see there for why).
 *
 * Layout (engine/int8_rows.py: pack), blocks of 32 outputs:
 *   codes  int8  (N / 32, K, 32): byte j of (b, k) is the code of output b*32+j for input k
 *   scales float (N): weight = code * scale
 * The codes are exact in float32; the products are summed in float32 and scaled once per output at the end.
 *
 * Compiled with -march=native, for AVX-512 or AVX2 with FMA (elsewhere the build fails and the kernel is not
 * used); parallel over the blocks of outputs with OpenMP on the caller's team (PyTorch's libgomp).
 * The signature is int4_rows_matmul's (engine/native.py: bind_matmul), ``group`` unused.
 */
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define ROW_CHUNK 8 /* 2 x 8 accumulators of 16 floats: half of AVX-512's 32 registers */

static inline __attribute__((always_inline)) void block_rows(const float *x, int64_t ldx, const int8_t *codes,
                                                             const float *scales, float *y, int64_t ldy, int64_t K,
                                                             const int R) {
    __m512 acc0[ROW_CHUNK], acc1[ROW_CHUNK];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k++) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + k * 32))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + k * 32 + 16))));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_set1_ps(x[r * ldx + k]);
            acc0[r] = _mm512_fmadd_ps(a, w0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(a, w1, acc1[r]);
        }
    }
    __m512 s0 = _mm512_loadu_ps(scales), s1 = _mm512_loadu_ps(scales + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(y + r * ldy, _mm512_mul_ps(acc0[r], s0));
        _mm512_storeu_ps(y + r * ldy + 16, _mm512_mul_ps(acc1[r], s1));
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#define ROW_CHUNK 3 /* 4 x 3 accumulators of 8 floats: 12 of AVX2's 16 registers */

static inline __attribute__((always_inline)) void block_rows(const float *x, int64_t ldx, const int8_t *codes,
                                                             const float *scales, float *y, int64_t ldy, int64_t K,
                                                             const int R) {
    __m256 acc[ROW_CHUNK][4];
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 w[4];
        for (int c = 0; c < 4; c++)
            w[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(codes + k * 32 + 8 * c))));
#pragma GCC unroll 3
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_set1_ps(x[r * ldx + k]);
            for (int c = 0; c < 4; c++)
                acc[r][c] = _mm256_fmadd_ps(a, w[c], acc[r][c]);
        }
    }
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            _mm256_storeu_ps(y + r * ldy + 8 * c, _mm256_mul_ps(acc[r][c], _mm256_loadu_ps(scales + 8 * c)));
}

#else
#error "the int8-rows kernel needs AVX-512 or AVX2 with FMA"
#endif

#define ROWS_CASE(R) \
    case R: block_rows(x, K, codes, scales, y, N, K, R); break;

static void block(const float *x, const int8_t *codes, const float *scales, float *y, int64_t rows, int64_t N,
                  int64_t K) {
    switch (rows) {
        ROWS_CASE(1)
        ROWS_CASE(2)
        ROWS_CASE(3)
#if ROW_CHUNK > 3
        ROWS_CASE(4)
        ROWS_CASE(5)
        ROWS_CASE(6)
        ROWS_CASE(7)
        ROWS_CASE(8)
#endif
    }
}

/* returns 0, or -1 when the shape is not one this kernel takes */
int int8_rows_matmul(const float *x, const int8_t *codes, const float *scales, float *y, int64_t M, int64_t N,
                     int64_t K, int64_t group, int threads) {
    (void)group;
    if (M < 1 || N % 32 || K < 1)
        return -1;
    const int64_t blocks = N / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t r0 = 0; r0 < M; r0 += ROW_CHUNK) {
            int64_t rows = M - r0 < ROW_CHUNK ? M - r0 : ROW_CHUNK;
            block(x + r0 * K, codes + b * K * 32, scales + b * 32, y + r0 * N + b * 32, rows, N, K);
        }
    }
    return 0;
}
