// Matmuls of bfloat16 weights with float32 activations for x86 CPUs with AVX2 and FMA, built and loaded by
// engine/fast/avx2.py. Why they exist: on a CPU without AVX512-BF16 or AMX, torch has no fast kernel for this
// case. Measured on a 2-core AVX2-only EPYC: torch.mv over bfloat16 reaches 10-13 GB/s of weights and float32
// matrix-vector products 7-9 GB/s, where a plain read of the weights gives 15-18 GB/s; at 16 rows torch's
// emulated bfloat16 matmul is 2x slower than its float32 one.
//
// y[r][j] = sum_i x[r][i] * W[j][i]: x is [rows, k] float32, y is [rows, n] float32, and W [n, k] bfloat16
// (the top 16 bits of a float32) comes packed in blocks of 16 output features, k-major within a block:
// packed[b][i][c] = W[16 b + c][i] (engine/fast/avx2.py packs it once). A block then streams through memory in
// order, and one k step of it is two vectors of 8 output features.
//
// Each y[r][j] is one vector lane accumulating x[r][i] * W[j][i] with FMAs for i = 0, 1, ..., k - 1 in order,
// whatever the row count or the tiling: a row's result does not depend on the batch it is in (greedy batch
// == alone holds exactly).
//
// Rows go in tiles of up to 6: 12 accumulators (6 rows x 2 vectors), 2 weight registers and a broadcast of
// x[r][i] fill the 16 AVX2 registers, and each weight is widened once for 6 rows. One row is bound by memory,
// more rows by the FMAs.

#include <immintrin.h>
#include <stdint.h>

#define WIDTH 16      // output features per packed block
#define MAX_TILE 6    // activation rows per tile
#define ROW_CHUNK 48  // activation rows kept hot in cache while every block passes over them

static inline __m256 widen_bf16(const uint16_t *p) {
    __m128i halves = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// Rows [0, R) of x (row stride k) against one packed block; writes y[r][0 .. 16) (row stride n). R is a
// constant at each call site below, so the compiler unrolls the row loops and keeps acc in registers.
static inline __attribute__((always_inline)) void tile(const float *x, const uint16_t *block, float *y, int64_t k,
                                                       int64_t n, const int R) {
    __m256 low[MAX_TILE], high[MAX_TILE];
    for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; ++i) {
        const __m256 w_low = widen_bf16(block + i * WIDTH), w_high = widen_bf16(block + i * WIDTH + 8);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * k + i);
            low[r] = _mm256_fmadd_ps(w_low, xv, low[r]);
            high[r] = _mm256_fmadd_ps(w_high, xv, high[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(y + r * n, low[r]);
        _mm256_storeu_ps(y + r * n + 8, high[r]);
    }
}

static void rows_times_block(const float *x, int64_t rows, const uint16_t *block, float *y, int64_t k, int64_t n) {
    int64_t r = 0;
    for (; r + MAX_TILE <= rows; r += MAX_TILE) tile(x + r * k, block, y + r * n, k, n, MAX_TILE);
    switch (rows - r) {
        case 5: tile(x + r * k, block, y + r * n, k, n, 5); break;
        case 4: tile(x + r * k, block, y + r * n, k, n, 4); break;
        case 3: tile(x + r * k, block, y + r * n, k, n, 3); break;
        case 2: tile(x + r * k, block, y + r * n, k, n, 2); break;
        case 1: tile(x + r * k, block, y + r * n, k, n, 1); break;
        default: break;
    }
}

// n must be a multiple of WIDTH (avx2.py checks). Blocks are split between the threads; rows go in chunks so
// that a chunk of x stays in cache while the thread's blocks pass over it.
void linear_bf16(const float *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n, float *y, int threads) {
    const int64_t blocks = n / WIDTH;
#pragma omp parallel num_threads(threads)
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_CHUNK) {
        const int64_t count = rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; ++b)
            rows_times_block(x + r0 * k, count, packed + b * k * WIDTH, y + r0 * n + b * WIDTH, k, n);
    }
}
