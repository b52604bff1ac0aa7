/* y (M, N) = x (M, K) @ W.T for a few rows x in float32 and W in 4-bit codes, each weight dequantized once
 * for all the rows (engine/int4_rows.py builds and loads this; see there for why).
 *
 * Layout (engine/int4_rows.py: pack), blocks of 32 outputs:
 *   codes  uint8  (N / 32, K, 16): byte j of (b, k) holds output b*32+j in its low nibble and output
 *                                  b*32+16+j in its high nibble, code q in 0..15
 *   scales uint16 (N / 32, K / G, 2, 32): bf16 bits of scale s and zero z per output and group of G inputs
 *   weight = (q - 8) * s + z
 *
 * Compiled with -march=native, for AVX-512 or AVX2 with FMA (elsewhere the build fails and the kernel is not used).
 *
 * int4_amx_matmul, where the CPU has AMX (Intel Sapphire Rapids and later): the same product on the tile unit.
 * Per block of 32 outputs and chunk of 32 inputs, the weights are dequantized with AVX-512 into two bf16 tiles
 * (16 input pairs x 16 outputs, the tile unit's pair layout) and multiplied by up to 16 rows of bf16
 * activations with TDPBF16PS into float32 accumulator tiles: the multiplications cost next to nothing, so the
 * time is the dequantization, the same for 1 row as for 16. Its own layout (int4_rows.py: pack_pairs):
 *   codes uint8 (N / 32, K / 2, 32): for input pair p, 16 bytes for outputs 0-15 of the block, then 16 for
 *         16-31; in each, byte j holds (output j / 2, input 2p + j % 2) in its low nibble and (output
 *         8 + j / 2, the same input) in its high nibble
 *   scales as above.
 * Parallel over the blocks of outputs with OpenMP; the process's libgomp is PyTorch's own (same soname,
 * already loaded), so the caller's existing team runs it and no second team is made.
 */
#define _GNU_SOURCE /* syscall() */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AVX512F__)
#define ROW_CHUNK 8 /* 2 x 8 accumulators of 16 floats: half of AVX-512's 32 registers */

static inline __m512 bf16_to_float(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* one block of 32 outputs for R rows (R a constant in each instantiation: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void block_rows(const float *x, int64_t ldx, const uint8_t *codes,
                                                             const uint16_t *scales, float *y, int64_t ldy,
                                                             int64_t K, int64_t group, const int R) {
    __m512 acc0[ROW_CHUNK], acc1[ROW_CHUNK];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    const __m512i low = _mm512_set1_epi32(15);
    const __m512 eight = _mm512_set1_ps(-8.0f);
    for (int64_t g = 0; g < K / group; g++) {
        const uint16_t *sz = scales + g * 64;
        __m512 s0 = bf16_to_float(sz), s1 = bf16_to_float(sz + 16);
        __m512 m0 = _mm512_fmadd_ps(eight, s0, bf16_to_float(sz + 32)); /* w = q s + (z - 8 s) */
        __m512 m1 = _mm512_fmadd_ps(eight, s1, bf16_to_float(sz + 48));
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + k * 16)));
            __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), s0, m0);
            __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s1, m1);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m512 a = _mm512_set1_ps(x[r * ldx + k]);
                acc0[r] = _mm512_fmadd_ps(a, w0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(a, w1, acc1[r]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(y + r * ldy, acc0[r]);
        _mm512_storeu_ps(y + r * ldy + 16, acc1[r]);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#define ROW_CHUNK 3 /* 4 x 3 accumulators of 8 floats: 12 of AVX2's 16 registers */

static inline __m256 bf16_to_float(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline __attribute__((always_inline)) void block_rows(const float *x, int64_t ldx, const uint8_t *codes,
                                                             const uint16_t *scales, float *y, int64_t ldy,
                                                             int64_t K, int64_t group, const int R) {
    __m256 acc[ROW_CHUNK][4];
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            acc[r][c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi32(15);
    const __m256 eight = _mm256_set1_ps(-8.0f);
    for (int64_t g = 0; g < K / group; g++) {
        const uint16_t *sz = scales + g * 64;
        __m256 s[4], m[4];
        for (int c = 0; c < 4; c++) {
            s[c] = bf16_to_float(sz + 8 * c);
            m[c] = _mm256_fmadd_ps(eight, s[c], bf16_to_float(sz + 32 + 8 * c));
        }
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(codes + k * 16));
            __m256i qa = _mm256_cvtepu8_epi32(bytes), qb = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
            __m256 w[4];
            w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(qa, low)), s[0], m[0]);
            w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(qb, low)), s[1], m[1]);
            w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(qa, 4)), s[2], m[2]);
            w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(qb, 4)), s[3], m[3]);
#pragma GCC unroll 3
            for (int r = 0; r < R; r++) {
                __m256 a = _mm256_set1_ps(x[r * ldx + k]);
                for (int c = 0; c < 4; c++)
                    acc[r][c] = _mm256_fmadd_ps(a, w[c], acc[r][c]);
            }
        }
    }
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            _mm256_storeu_ps(y + r * ldy + 8 * c, acc[r][c]);
}

#else
#error "the int4-rows kernel needs AVX-512 or AVX2 with FMA"
#endif

#define ROWS_CASE(R) \
    case R: block_rows(x, K, codes, scales, y, N, K, group, R); break;

static void block(const float *x, const uint8_t *codes, const uint16_t *scales, float *y, int64_t rows, int64_t N,
                  int64_t K, int64_t group) {
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
int int4_rows_matmul(const float *x, const uint8_t *codes, const uint16_t *scales, float *y, int64_t M, int64_t N,
                     int64_t K, int64_t group, int threads) {
    if (M < 1 || N % 32 || group < 1 || K % group)
        return -1;
    const int64_t blocks = N / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block_codes = codes + b * K * 16;
        const uint16_t *block_scales = scales + b * (K / group) * 64;
        for (int64_t r0 = 0; r0 < M; r0 += ROW_CHUNK) {
            int64_t rows = M - r0 < ROW_CHUNK ? M - r0 : ROW_CHUNK;
            block(x + r0 * K, block_codes, block_scales, y + r0 * N + b * 32, rows, N, K, group);
        }
    }
    return 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* the kernel may use the tile unit only once Linux has granted this process the tile state: 0 when granted */
int int4_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* y (M, N) float32 = x (M, K) bf16 @ W.T, M <= 16; returns 0, or -1 for a shape it does not take */
int int4_amx_matmul(const uint16_t *x, const uint8_t *codes, const uint16_t *scales, float *y, int64_t M, int64_t N,
                    int64_t K, int64_t group, int threads) {
    if (M < 1 || M > 16 || N % 32 || group < 32 || group % 32 || K % group)
        return -1;
    const int64_t blocks = N / 32;
#pragma omp parallel num_threads(threads)
    {
        tile_config config;
        memset(&config, 0, sizeof config);
        config.palette_id = 1;
        for (int t = 0; t < 3; t++) { /* tiles 0, 1: accumulators (M x 16 float32); 2: activations (M x 32 bf16) */
            config.rows[t] = (uint8_t)M;
            config.colsb[t] = 64;
        }
        for (int t = 3; t < 5; t++) { /* 3, 4: the weights of outputs 0-15 and 16-31 (16 input pairs) */
            config.rows[t] = 16;
            config.colsb[t] = 64;
        }
        _tile_loadconfig(&config);
        uint16_t weights[2][16 * 32] __attribute__((aligned(64)));
        const __m512i low = _mm512_set1_epi32(15);
        const __m512 eight = _mm512_set1_ps(-8.0f);
        const __m512i pairs_low = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512i pairs_high = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *block_codes = codes + b * K * 16;
            const uint16_t *block_scales = scales + b * (K / group) * 64;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t k0 = 0; k0 < K; k0 += 32) {
                const uint16_t *sz = block_scales + (k0 / group) * 64;
                for (int half = 0; half < 2; half++) {
                    __m512 s = bf16_to_float(sz + 16 * half);
                    __m512 m = _mm512_fmadd_ps(eight, s, bf16_to_float(sz + 32 + 16 * half)); /* z - 8 s */
                    __m512 s_low = _mm512_permutexvar_ps(pairs_low, s), s_high = _mm512_permutexvar_ps(pairs_high, s);
                    __m512 m_low = _mm512_permutexvar_ps(pairs_low, m), m_high = _mm512_permutexvar_ps(pairs_high, m);
                    for (int p = 0; p < 16; p++) {
                        const uint8_t *at = block_codes + (k0 / 2 + p) * 32 + half * 16;
                        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at));
                        __m512 w_low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), s_low, m_low);
                        __m512 w_high = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s_high, m_high);
                        _mm512_store_si512((__m512i *)(weights[half] + p * 32), (__m512i)_mm512_cvtne2ps_pbh(w_high, w_low));
                    }
                }
                _tile_loadd(2, x + k0, K * 2);
                _tile_loadd(3, weights[0], 64);
                _tile_loadd(4, weights[1], 64);
                _tile_dpbf16ps(0, 2, 3);
                _tile_dpbf16ps(1, 2, 4);
            }
            _tile_stored(0, y + b * 32, N * 4);
            _tile_stored(1, y + b * 32 + 16, N * 4);
        }
        _tile_release();
    }
    return 0;
}
#else
int int4_amx_init(void) { return -1; } /* no AMX here: never a candidate */

int int4_amx_matmul(const uint16_t *x, const uint8_t *codes, const uint16_t *scales, float *y, int64_t M, int64_t N,
                    int64_t K, int64_t group, int threads) {
    (void)x, (void)codes, (void)scales, (void)y, (void)M, (void)N, (void)K, (void)group, (void)threads;
    return -1;
}
#endif
