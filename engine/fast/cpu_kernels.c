// Matmuls of bfloat16 or int4 weights with float32 activations, the rest of a decode step (RMSNorm, RoPE,
// attention, SiLU) and a decode step's whole layer stack, for x86 CPUs with AVX2 and FMA (the matmul tiles in
// 512-bit registers where cpu_kernels.py builds with AVX512F, bfloat16 activations too where it builds with
// AVX512-BF16, a prefill matmul on AMX tiles where it builds with AMX-BF16); built and loaded by
// engine/fast/cpu_kernels.py. Why they exist: on a CPU without AVX512-BF16 or
// AMX, torch has no fast kernel for these cases: its matrix-vector products read the weights well below the
// memory's bandwidth, and its emulated bfloat16 matmul is slower than its float32 one beyond a row
// (bench/levers.md).
//
// y[r][j] = sum_i x[r][i] * W[j][i]: x is [rows, k] float32, y is [rows, n] float32, and W [n, k] comes packed
// in blocks of 16 output features, k-major within a block (engine/fast/cpu_kernels.py packs it once; the formats
// are described at `enum format`). A block then streams through memory in order, and one k step of it widens to
// two vectors of 8 output features (one of 16 in the AVX512 build).
//
// Each y[r][j] is one vector lane accumulating x[r][i] * W[j][i] with FMAs for i = 0, 1, ..., k - 1 in order,
// whatever the row count or the tiling: a row's result does not depend on the batch it is in (greedy batch
// == alone holds exactly).
//
// Rows go in tiles of up to 6 (bfloat16) or 4 (int4): 2 accumulators a row, the weight vectors and a broadcast
// of x[r][i] fill the 16 AVX2 registers (12 rows of one accumulator in the AVX512 build's 32), and each weight
// is widened once for the whole tile. One row is bound by memory, more rows by the FMAs.

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WIDTH 16      // output features per packed block
// Activation rows kept hot in cache while every block passes over them. Fewer for PAIRS, whose tiles load a
// broadcast of x at every instruction: a chunk of 24 rows of pairs stays in L1, and timed faster than 48 on the
// model's shapes.
#define ROW_CHUNK 48
#define PAIRS_ROW_CHUNK 24
#define INT4_GROUP 32 // input features sharing an int4 scale and minimum

// The formats of a packed block of WIDTH output features (k of them each):
// - BF16: k x 16 bfloat16, weights[i][c] = W[c][i];
// - INT4: k x 8 bytes (byte j: feature j in its low nibble, feature 8 + j in its high one), and per group of
//   INT4_GROUP inputs 16 scales then 16 minimums in bfloat16: W[c][i] = q * scale + minimum, computed with one
//   FMA, so a weight's value is the same in every path.
// - F32: k x 16 float32, an int4 block widened into a thread's scratch buffer (see widens_once).
// - PAIRS (the AVX512-BF16 build): k / 2 x 16 pairs of bfloat16, pairs[i][c] = (W[c][2i], W[c][2i + 1]), for
//   activations in bfloat16 pairs too (see linear_bf16_pairs).
// decode_shape.format holds BF16, INT4 or PAIRS.
enum format { BF16, INT4, F32, PAIRS };
struct block {
    const uint16_t *bf16;
    const uint8_t *q4;
    const uint16_t *scale_min;
    const float *f32;
    const uint32_t *pairs;
};

// Activation rows per tile: accumulators (2 a row), the weight vectors, the broadcast x and, for int4, the
// group's scales and minimums must fit the 16 AVX2 registers. Built with AVX512 (cpu_kernels.py does where the CPU has
// it), a block's 16 features are one register: an accumulator a row, 32 registers, 12 rows for every format.
#ifdef __AVX512F__
#define MAX_TILE 12
static inline int tile_rows(enum format format) { return (void)format, MAX_TILE; }
#else
#define MAX_TILE 6
static inline int tile_rows(enum format format) { return format == INT4 ? 4 : MAX_TILE; }
#endif
static const __m256i NIBBLE = {0x0000000F0000000F, 0x0000000F0000000F, 0x0000000F0000000F, 0x0000000F0000000F};

static inline __m256 widen_bf16(const uint16_t *p) {
    __m128i halves = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

static inline void group_scales(struct block w, int64_t start, __m256 *scale_low, __m256 *scale_high,
                                __m256 *min_low, __m256 *min_high) {
    const uint16_t *sm = w.scale_min + start / INT4_GROUP * 2 * WIDTH;
    *scale_low = widen_bf16(sm), *scale_high = widen_bf16(sm + 8);
    *min_low = widen_bf16(sm + 16), *min_high = widen_bf16(sm + 24);
}

static inline void widen_int4(struct block w, int64_t i, __m256 scale_low, __m256 scale_high, __m256 min_low,
                              __m256 min_high, __m256 *w_low, __m256 *w_high) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w.q4 + i * 8)));
    *w_low = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, NIBBLE)), scale_low, min_low);
    *w_high = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), scale_high, min_high);
}

// An int4 block widened to float32 into scratch (k x 16): the same values the tiles compute in registers.
static void widen_int4_block(struct block w, int64_t k, float *scratch) {
    __m256 scale_low, scale_high, min_low, min_high, w_low, w_high;
    for (int64_t i = 0; i < k; ++i) {
        if (i % INT4_GROUP == 0) group_scales(w, i, &scale_low, &scale_high, &min_low, &min_high);
        widen_int4(w, i, scale_low, scale_high, min_low, min_high, &w_low, &w_high);
        _mm256_storeu_ps(scratch + i * WIDTH, w_low);
        _mm256_storeu_ps(scratch + i * WIDTH + 8, w_high);
    }
}

// Whether an int4 block is widened once into scratch for all its rows rather than in registers per tile: the
// scratch pays off only once enough rows share it (at 16 rows and fewer the two were within noise). bfloat16
// widens in registers: cheaper than a scratch buffer's stores and loads at every row count.
static inline int widens_once(enum format format, int64_t rows) { return format == INT4 && rows >= 24; }

#ifdef __AVX512F__
// The AVX512 build of tile() and one_row_two_blocks() below. Lane c of a 512-bit register is lane c % 8 of the
// AVX2 build's low (c < 8) or high vector: the same widening and the same FMAs in the same order, so both builds
// give bitwise the same results (tested).
static inline __m512 widen_bf16_16(const uint16_t *p) {
    const __m256i halves = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

static inline void group_scales_16(struct block w, int64_t start, __m512 *scale, __m512 *minimum) {
    const uint16_t *sm = w.scale_min + start / INT4_GROUP * 2 * WIDTH;
    *scale = widen_bf16_16(sm), *minimum = widen_bf16_16(sm + WIDTH);
}

static inline __m512 widen_int4_16(struct block w, int64_t i, __m512 scale, __m512 minimum) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w.q4 + i * 8)));
    const __m256i low = _mm256_and_si256(q, NIBBLE), high = _mm256_srli_epi32(q, 4);
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), scale, minimum);
}

// Step i of a block: 16 features' weights as float32, or, for PAIRS, pair i of 16 features' bfloat16 as they are.
static inline __m512 widen_16(struct block w, int64_t i, __m512 scale, __m512 minimum, const enum format format) {
    if (format == INT4) return widen_int4_16(w, i, scale, minimum);
    if (format == BF16) return widen_bf16_16(w.bf16 + i * WIDTH);
    if (format == PAIRS) return _mm512_loadu_ps((const float *)(w.pairs + i * WIDTH));
    return _mm512_loadu_ps(w.f32 + i * WIDTH);
}

// acc + w * x, lane by lane; for PAIRS, x is a pair of bfloat16 in each lane (a float's bits) and both products
// of the pair are added (VDPBF16PS).
static inline __m512 accumulate_16(__m512 acc, __m512 w, __m512 x, const enum format format) {
#ifdef __AVX512BF16__
    if (format == PAIRS) return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
#else
    (void)format;
#endif
    return _mm512_fmadd_ps(w, x, acc);
}

static inline __attribute__((always_inline)) void tile(const float *x, struct block w, float *y, int64_t k,
                                                       int64_t n, const int R, const enum format format) {
    __m512 acc[MAX_TILE];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t group = format == INT4 ? INT4_GROUP : k;
    for (int64_t start = 0; start < k; start += group) {
        __m512 scale = _mm512_setzero_ps(), minimum = scale;
        if (format == INT4) group_scales_16(w, start, &scale, &minimum);
#pragma GCC unroll 4
        for (int64_t i = start; i < start + group; ++i) {
            const __m512 wv = widen_16(w, i, scale, minimum, format);
            for (int r = 0; r < R; ++r) acc[r] = accumulate_16(acc[r], wv, _mm512_set1_ps(x[r * k + i]), format);
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, acc[r]);
}

static inline __attribute__((always_inline)) void one_row_two_blocks(const float *x, struct block w0,
                                                                    struct block w1, float *y, int64_t k,
                                                                    const enum format format) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    const int64_t group = format == INT4 ? INT4_GROUP : k;
    for (int64_t start = 0; start < k; start += group) {
        __m512 scale0 = _mm512_setzero_ps(), minimum0 = scale0, scale1 = scale0, minimum1 = scale0;
        if (format == INT4) {
            group_scales_16(w0, start, &scale0, &minimum0);
            group_scales_16(w1, start, &scale1, &minimum1);
        }
#pragma GCC unroll 4
        for (int64_t i = start; i < start + group; ++i) {
            const __m512 xv = _mm512_set1_ps(x[i]);
            acc0 = accumulate_16(acc0, widen_16(w0, i, scale0, minimum0, format), xv, format);
            acc1 = accumulate_16(acc1, widen_16(w1, i, scale1, minimum1, format), xv, format);
        }
    }
    _mm512_storeu_ps(y, acc0), _mm512_storeu_ps(y + WIDTH, acc1);
}
#else
// Rows [0, R) of x (row stride k) against one packed block; writes y[r][0 .. 16) (row stride n). R and format
// are constants at each call site below, so the compiler unrolls the row loops and keeps acc in registers.
static inline __attribute__((always_inline)) void tile(const float *x, struct block w, float *y, int64_t k,
                                                       int64_t n, const int R, const enum format format) {
    __m256 low[MAX_TILE], high[MAX_TILE];
    for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_ps();
    const int64_t group = format == INT4 ? INT4_GROUP : k;
    for (int64_t start = 0; start < k; start += group) {
        __m256 scale_low = _mm256_setzero_ps(), scale_high = scale_low, min_low = scale_low, min_high = scale_low;
        if (format == INT4) group_scales(w, start, &scale_low, &scale_high, &min_low, &min_high);
#pragma GCC unroll 4
        for (int64_t i = start; i < start + group; ++i) {
            __m256 w_low, w_high;
            if (format == INT4) {
                widen_int4(w, i, scale_low, scale_high, min_low, min_high, &w_low, &w_high);
            } else if (format == BF16) {
                w_low = widen_bf16(w.bf16 + i * WIDTH), w_high = widen_bf16(w.bf16 + i * WIDTH + 8);
            } else {
                w_low = _mm256_loadu_ps(w.f32 + i * WIDTH), w_high = _mm256_loadu_ps(w.f32 + i * WIDTH + 8);
            }
            for (int r = 0; r < R; ++r) {
                const __m256 xv = _mm256_broadcast_ss(x + r * k + i);
                low[r] = _mm256_fmadd_ps(w_low, xv, low[r]);
                high[r] = _mm256_fmadd_ps(w_high, xv, high[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(y + r * n, low[r]);
        _mm256_storeu_ps(y + r * n + 8, high[r]);
    }
}

// One row against two blocks at once. In a one-row product each accumulator is a chain of dependent FMAs (4
// cycles each); one block gives only 2 chains, two blocks give 4. Each lane accumulates exactly as in tile().
// More chains in flight hide the FMA latency: one-row decode steps are faster so (bench/levers.md, "Earlier
// measurements"). (The AVX512 build's version above has 2 chains of 16 lanes, as many lanes in flight.)
static inline __attribute__((always_inline)) void one_row_two_blocks(const float *x, struct block w0,
                                                                    struct block w1, float *y, int64_t k,
                                                                    const enum format format) {
    __m256 low0 = _mm256_setzero_ps(), high0 = low0, low1 = low0, high1 = low0;
    const int64_t group = format == INT4 ? INT4_GROUP : k;
    for (int64_t start = 0; start < k; start += group) {
        __m256 s0_low = _mm256_setzero_ps(), s0_high = s0_low, m0_low = s0_low, m0_high = s0_low;
        __m256 s1_low = s0_low, s1_high = s0_low, m1_low = s0_low, m1_high = s0_low;
        if (format == INT4) {
            group_scales(w0, start, &s0_low, &s0_high, &m0_low, &m0_high);
            group_scales(w1, start, &s1_low, &s1_high, &m1_low, &m1_high);
        }
#pragma GCC unroll 4
        for (int64_t i = start; i < start + group; ++i) {
            __m256 a_low, a_high, b_low, b_high;
            if (format == INT4) {
                widen_int4(w0, i, s0_low, s0_high, m0_low, m0_high, &a_low, &a_high);
                widen_int4(w1, i, s1_low, s1_high, m1_low, m1_high, &b_low, &b_high);
            } else {
                a_low = widen_bf16(w0.bf16 + i * WIDTH), a_high = widen_bf16(w0.bf16 + i * WIDTH + 8);
                b_low = widen_bf16(w1.bf16 + i * WIDTH), b_high = widen_bf16(w1.bf16 + i * WIDTH + 8);
            }
            const __m256 xv = _mm256_broadcast_ss(x + i);
            low0 = _mm256_fmadd_ps(a_low, xv, low0), high0 = _mm256_fmadd_ps(a_high, xv, high0);
            low1 = _mm256_fmadd_ps(b_low, xv, low1), high1 = _mm256_fmadd_ps(b_high, xv, high1);
        }
    }
    _mm256_storeu_ps(y, low0), _mm256_storeu_ps(y + 8, high0);
    _mm256_storeu_ps(y + WIDTH, low1), _mm256_storeu_ps(y + WIDTH + 8, high1);
}
#endif

// Every row against one block, in tiles. format must be a constant where this is inlined (tile() needs it).
static inline __attribute__((always_inline)) void rows_in_tiles(const float *x, int64_t rows, struct block w,
                                                                float *y, int64_t k, int64_t n,
                                                                const enum format format) {
    const int most = tile_rows(format);
    int64_t r = 0;
    for (; r + most <= rows; r += most) tile(x + r * k, w, y + r * n, k, n, most, format);
#define TILE_OF(R) \
    case R: tile(x + r * k, w, y + r * n, k, n, R, format); break;
    switch (rows - r) {
#if MAX_TILE > 6
        TILE_OF(11) TILE_OF(10) TILE_OF(9) TILE_OF(8) TILE_OF(7) TILE_OF(6)
#endif
        TILE_OF(5) TILE_OF(4) TILE_OF(3) TILE_OF(2) TILE_OF(1)
        default: break;
    }
#undef TILE_OF
}

// With a scratch buffer (widens_once), an int4 block is widened once and the tiles run on float32.
static inline __attribute__((always_inline)) void rows_times_block(const float *x, int64_t rows, struct block w,
                                                                   float *y, int64_t k, int64_t n,
                                                                   const enum format packed, float *scratch) {
    if (packed == INT4 && scratch != NULL) {
        widen_int4_block(w, k, scratch);
        w.f32 = scratch;
        rows_in_tiles(x, rows, w, y, k, n, F32);
    } else {
        rows_in_tiles(x, rows, w, y, k, n, packed);
    }
}

// Block b of a packed weight of k inputs.
static inline struct block block_at(struct block w, int64_t b, int64_t k) {
    const struct block block = {
        w.bf16 ? w.bf16 + b * k * WIDTH : NULL,
        w.q4 ? w.q4 + b * k * (WIDTH / 2) : NULL,
        w.scale_min ? w.scale_min + b * (k / INT4_GROUP) * 2 * WIDTH : NULL,
        NULL,
        w.pairs ? w.pairs + b * k * WIDTH : NULL,
    };
    return block;
}

// This thread's share of y = x W^T, inside a parallel region: blocks are split between the threads, and rows
// go in chunks so that a chunk of x stays in cache while the thread's blocks pass over it. n is a multiple of
// WIDTH (cpu_kernels.py checks). The parallel regions are in the exported functions below, one per format: GCC
// outlines a region before it inlines, so a region shared by the formats would see `format` as a variable,
// and the tiles' accumulators would go through the stack at every FMA (several times slower).
static inline __attribute__((always_inline)) void thread_share(const float *x, int64_t rows, int64_t k,
                                                               struct block w, int64_t n, float *y,
                                                               const enum format format) {
    const int64_t blocks = n / WIDTH;
    if (rows == 1) {  // blocks in pairs (one_row_two_blocks); an odd last one alone
#pragma omp for schedule(static) nowait
        for (int64_t pair = 0; pair < (blocks + 1) / 2; ++pair) {
            const int64_t b = 2 * pair;
            if (b + 1 < blocks)
                one_row_two_blocks(x, block_at(w, b, k), block_at(w, b + 1, k), y + b * WIDTH, k, format);
            else
                tile(x, block_at(w, b, k), y + b * WIDTH, k, n, 1, format);
        }
        return;
    }
    float *scratch = widens_once(format, rows) ? malloc(sizeof(float) * (size_t)(k * WIDTH)) : NULL;
    const int64_t chunk = format == PAIRS ? PAIRS_ROW_CHUNK : ROW_CHUNK;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t count = rows - r0 < chunk ? rows - r0 : chunk;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; ++b)
            rows_times_block(x + r0 * k, count, block_at(w, b, k), y + r0 * n + b * WIDTH, k, n, format, scratch);
    }
    free(scratch);
}

void linear_bf16(const float *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n, float *y, int threads) {
    const struct block w = {packed, NULL, NULL, NULL, NULL};
#pragma omp parallel num_threads(threads)
    thread_share(x, rows, k, w, n, y, BF16);
}

// k must be a multiple of INT4_GROUP (cpu_kernels.py checks).
void linear_int4(const float *x, int64_t rows, int64_t k, const uint8_t *q4, const uint16_t *scale_min, int64_t n,
                 float *y, int threads) {
    const struct block w = {NULL, q4, scale_min, NULL, NULL};
#pragma omp parallel num_threads(threads)
    thread_share(x, rows, k, w, n, y, INT4);
}

#ifdef __AVX512BF16__
// ---- bfloat16 activations too (the AVX512-BF16 build) -----------------------------------------------------
// VDPBF16PS multiplies 16 pairs of bfloat16 and adds both products of each pair to a float32 lane: twice the
// multiplies of a float32 FMA, so a compute-bound prefill runs up to twice as fast, and a one-row step reads the
// same bfloat16 weights without widening them. The activations are rounded to bfloat16 once per call, to nearest
// even as torch rounds them (VCVTNEPS2BF16, which reads a subnormal as zero). Each y[r][j] is one lane adding
// pair after pair, i = 0, 1, ..., k / 2 - 1 in order, in the tiles above: a row's result is the same alone or in
// any batch.
//
// y = bf16(x) W^T: x is [rows, k] float32, y [rows, n] float32; W comes packed per 16 output features as
// [k / 2][16][2] bfloat16 (cpu_kernels.py's pack_pairs; the AMX kernel's layout too). k is a multiple of WIDTH
// (cpu_kernels.py checks). Returns 0, or -1 where the rounded activations' scratch could not be allocated.
int linear_bf16_pairs(const float *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n, float *y,
                      int threads) {
    float *pairs = malloc(sizeof(float) * (size_t)(rows * k / 2));  // a pair of bfloat16 in each float's bits
    if (pairs == NULL) return -1;
    const struct block w = {NULL, NULL, NULL, NULL, (const uint32_t *)packed};
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * k; i += WIDTH)
            _mm256_storeu_si256((__m256i *)(pairs + i / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
        thread_share(pairs, rows, k / 2, w, n, y, PAIRS);
    }
    free(pairs);
    return 0;
}
#endif

// ---- the rest of a decode step: RMSNorm, and attention for one new token per row ---------------------------
// torch runs each of these as several small ops with a dispatch each (F.rms_norm is 8, SDPA's CPU kernel sets up
// a flash-attention tiling for a single query): on the 2-core EPYC they took about half of a one-row step.

static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float sum_of_squares(const float *x, int64_t dim) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float total = lanes_sum(acc);
    for (; i < dim; ++i) total += x[i] * x[i];
    return total;
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, rows of dim floats (both contiguous).
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        const float scale = 1.0f / sqrtf(sum_of_squares(xr, dim) / (float)dim + eps);
        const __m256 vscale = _mm256_set1_ps(scale);
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vscale),
                                                  _mm256_loadu_ps(weight + i)));
        for (; i < dim; ++i) o[i] = xr[i] * scale * weight[i];
    }
}

// exp(x), 8 lanes: Cephes' expf (2^n * a degree-5 polynomial on [-ln2/2, ln2/2]), relative error about 1e-7.
// x is clamped to [-87, 88]: below it returns about 0 (softmax's scores minus their maximum), above, about 1.7e38
// (SiLU of a large negative input then comes out about -0, as it should).
static inline __m256 exp_clamped(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// scores[p] <- exp(scores[p] - max) / sum over p < count: the softmax of one head's scores, in place.
static void softmax(float *scores, int64_t count) {
    float top = -INFINITY;
    for (int64_t p = 0; p < count; ++p) top = scores[p] > top ? scores[p] : top;
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vsum = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= count; p += 8) {
        const __m256 e = exp_clamped(_mm256_sub_ps(_mm256_loadu_ps(scores + p), vtop));
        _mm256_storeu_ps(scores + p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (p < count) {  // the last partial vector, padded with -inf (exp 0)
        float tail[8];
        for (int i = 0; i < 8; ++i) tail[i] = p + i < count ? scores[p + i] - top : -INFINITY;
        const __m256 e = exp_clamped(_mm256_loadu_ps(tail));
        _mm256_storeu_ps(tail, e);
        vsum = _mm256_add_ps(vsum, e);
        for (int i = 0; p + i < count; ++i) scores[p + i] = tail[i];
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / lanes_sum(vsum));
    for (p = 0; p + 8 <= count; p += 8) _mm256_storeu_ps(scores + p, _mm256_mul_ps(_mm256_loadu_ps(scores + p), inverse));
    for (; p < count; ++p) scores[p] *= _mm256_cvtss_f32(inverse);
}

#define HEADS_AT_ONCE 3  // query heads sharing each key and value read: 3 x 4 accumulators fill the registers

// H query heads (a constant at each call site: 1 to HEADS_AT_ONCE) that read the same cached KV head: each
// key and value is loaded once for all of them, and each head keeps two FMA chains per key. q: H heads
// q_head floats apart; scores: H rows of `stride` floats; out: H heads of head_dim floats, contiguous.
// head_dim is a multiple of 8.
static inline __attribute__((always_inline)) void heads_scores(const float *q, int64_t q_head, const float *k,
                                                               int64_t kv_position, int64_t count,
                                                               int64_t head_dim, float scale, float *scores,
                                                               int64_t stride, const int H) {
    for (int64_t p = 0; p < count; ++p) {
        const float *kp = k + p * kv_position;
        __m256 even[HEADS_AT_ONCE], odd[HEADS_AT_ONCE];
        for (int h = 0; h < H; ++h) even[h] = odd[h] = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= head_dim; d += 16) {
            const __m256 k0 = _mm256_loadu_ps(kp + d), k1 = _mm256_loadu_ps(kp + d + 8);
            for (int h = 0; h < H; ++h) {
                even[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * q_head + d), k0, even[h]);
                odd[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * q_head + d + 8), k1, odd[h]);
            }
        }
        if (d < head_dim) {
            const __m256 k0 = _mm256_loadu_ps(kp + d);
            for (int h = 0; h < H; ++h) even[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * q_head + d), k0, even[h]);
        }
        for (int h = 0; h < H; ++h) scores[h * stride + p] = lanes_sum(_mm256_add_ps(even[h], odd[h])) * scale;
    }
}

// out[h][d0 .. d0 + 8 V) = sum_p scores[h][p] v[p][d0 ..]: V vectors (a constant: 1 to 4) of each value.
static inline __attribute__((always_inline)) void heads_values(const float *scores, int64_t stride, const float *v,
                                                               int64_t kv_position, int64_t count, float *out,
                                                               int64_t head_dim, int64_t d0, const int H,
                                                               const int V) {
    __m256 acc[HEADS_AT_ONCE][4];
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < V; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < count; ++p) {
        const float *vp = v + p * kv_position + d0;
        for (int c = 0; c < V; ++c) {
            const __m256 value = _mm256_loadu_ps(vp + 8 * c);
            for (int h = 0; h < H; ++h)
                acc[h][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + h * stride + p), value, acc[h][c]);
        }
    }
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < V; ++c) _mm256_storeu_ps(out + h * head_dim + d0 + 8 * c, acc[h][c]);
}

static inline __attribute__((always_inline)) void heads_attend(const float *q, int64_t q_head, const float *k,
                                                               const float *v, int64_t kv_position,
                                                               int64_t count, int64_t head_dim, float scale,
                                                               float *scores, int64_t stride, float *out,
                                                               const int H) {
    heads_scores(q, q_head, k, kv_position, count, head_dim, scale, scores, stride, H);
    for (int h = 0; h < H; ++h) softmax(scores + h * stride, count);
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
        switch (head_dim - d0 >= 32 ? 4 : (head_dim - d0) / 8) {
            case 4: heads_values(scores, stride, v, kv_position, count, out, head_dim, d0, H, 4); break;
            case 3: heads_values(scores, stride, v, kv_position, count, out, head_dim, d0, H, 3); break;
            case 2: heads_values(scores, stride, v, kv_position, count, out, head_dim, d0, H, 2); break;
            default: heads_values(scores, stride, v, kv_position, count, out, head_dim, d0, H, 1); break;
        }
    }
}

// One query token per row against that row's cached keys and values, softmax(q k / sqrt(head_dim)) v, for
// heads query heads sharing kv_heads key/value heads (query head h reads kv head h / (heads / kv_heads)).
// Row r attends its first visible[r] positions. Strides are in floats; head_dim is contiguous everywhere and
// a multiple of 8 (cpu_kernels.py checks). q: [rows, heads, head_dim]; keys, values: [rows, kv_heads, positions,
// head_dim]; out: [rows, heads * head_dim]. A task is one row's KV head and the query heads reading it.
// Returns 0, or -1 when a thread's scores buffer could not be allocated (out is then incomplete).
int attention_decode(const float *q, int64_t q_row, int64_t q_head, const float *keys, const float *values,
                     int64_t kv_row, int64_t kv_head, int64_t kv_position, const int64_t *visible, float *out,
                     int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_visible,
                     int threads) {
    const int64_t groups = heads / kv_heads, stride = max_visible + 8;
    const float scale = 1.0f / sqrtf((float)head_dim);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(HEADS_AT_ONCE * stride));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * kv_heads; ++task) {
            if (scores == NULL) continue;  // every thread must still reach the worksharing loop
            const int64_t r = task / kv_heads, g = task % kv_heads, count = visible[r];
            const float *k = keys + r * kv_row + g * kv_head, *v = values + r * kv_row + g * kv_head;
            for (int64_t h = g * groups; h < (g + 1) * groups; h += HEADS_AT_ONCE) {
                const float *qh = q + r * q_row + h * q_head;
                float *o = out + (r * heads + h) * head_dim;
                switch ((g + 1) * groups - h >= HEADS_AT_ONCE ? HEADS_AT_ONCE : (g + 1) * groups - h) {
                    case 3: heads_attend(qh, q_head, k, v, kv_position, count, head_dim, scale, scores, stride, o, 3); break;
                    case 2: heads_attend(qh, q_head, k, v, kv_position, count, head_dim, scale, scores, stride, o, 2); break;
                    default: heads_attend(qh, q_head, k, v, kv_position, count, head_dim, scale, scores, stride, o, 1); break;
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

// ---- RoPE and SiLU, the last ops of a layer that torch ran in several dispatches each ------------------------

// transformers' x * cos + rotate_half(x) * sin for `heads` heads of each token, in place: x holds `tokens` tokens
// `token_stride` floats apart, their first `heads` heads rotated (q's and k's: the fused QKV output). cos and
// sin_signed are [positions, head_dim] (engine/fast/model.py's rope_tables: sin with its first half negated,
// so rotate_half(x) * sin == roll(x, head_dim / 2) * sin_signed). Built with -ffp-contract=off: the two
// products are rounded before the sum, as torch's ops round them.
void rope(float *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim, const int64_t *positions,
          const float *cos, const float *sin_signed) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + positions[t] * head_dim, *s = sin_signed + positions[t] * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *head = x + t * token_stride + h * head_dim;
            float rotated[head_dim];
            for (int64_t i = 0; i < head_dim; ++i) rotated[i] = head[i < half ? i + half : i - half] * s[i];
            for (int64_t i = 0; i < head_dim; ++i) head[i] = head[i] * c[i] + rotated[i];
        }
    }
}

// out[r][j] = silu(gate_up[r][j]) * gate_up[r][n + j] for rows of 2n floats (gate then up) into rows of n.
void silu_mul(const float *gate_up, int64_t rows, int64_t n, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = gate_up + r * 2 * n, *up = gate + n;
        float *o = out + r * n;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 g = _mm256_loadu_ps(gate + j);
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_clamped(_mm256_sub_ps(zero, g))));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
        }
        for (; j < n; ++j) {
            float g[8] = {0}, result[8];
            g[0] = -gate[j];
            _mm256_storeu_ps(result, exp_clamped(_mm256_loadu_ps(g)));
            o[j] = gate[j] / (1.0f + result[0]) * up[j];
        }
    }
}

// ---- a decode step's whole layer stack in one call ------------------------------------------------------------
// The same ops as engine/fast/model.py's layers_forward with KernelOps, in the same order and on the same kernels,
// so the results are bitwise the same (tested); what goes is the Python between them, about 25 torch calls a
// layer (bench/levers.md: "layers from Python").

// One layer's weights (packed as cpu_kernels.py packs them; scales NULL for bfloat16), norms, and KV cache
// [slots, 2 * kv_heads, capacity, head_dim] (engine/fast/cache.py): engine/fast/stack.py fills these.
struct decode_layer {
    const void *qkv, *qkv_scales, *out, *out_scales, *gate_up, *gate_up_scales, *down, *down_scales;
    const float *input_norm, *post_attention_norm;
    float *kv;
};

struct decode_shape {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, capacity;
    float eps;
    int format;  // the weights' format: enum format's BF16, INT4 or PAIRS
};

// The C boundary, as cpu_kernels.py checks it when it loads the library: each struct a caller fills, its size and
// every field's offset and size, and the constants the callers' packing follows. ctypes mirrors the structs by
// hand; a field added, moved or retyped on one side only would have the kernels read the wrong bytes, so the
// loader refuses any difference. Add a field here when you add one to a struct.
struct layout_entry {
    const char *name;  // "struct", "struct.field" or a constant's name
    int64_t offset, size;  // a struct: 0 and its size; a constant: 0 and its value
};
#define STRUCT_SIZE(S) {#S, 0, (int64_t)sizeof(struct S)}
#define FIELD(S, F) {#S "." #F, (int64_t)offsetof(struct S, F), (int64_t)sizeof(((struct S *)0)->F)}
static const struct layout_entry LAYOUT[] = {
    STRUCT_SIZE(decode_layer),
    FIELD(decode_layer, qkv), FIELD(decode_layer, qkv_scales), FIELD(decode_layer, out),
    FIELD(decode_layer, out_scales), FIELD(decode_layer, gate_up), FIELD(decode_layer, gate_up_scales),
    FIELD(decode_layer, down), FIELD(decode_layer, down_scales), FIELD(decode_layer, input_norm),
    FIELD(decode_layer, post_attention_norm), FIELD(decode_layer, kv),
    STRUCT_SIZE(decode_shape),
    FIELD(decode_shape, layers), FIELD(decode_shape, hidden), FIELD(decode_shape, heads),
    FIELD(decode_shape, kv_heads), FIELD(decode_shape, head_dim), FIELD(decode_shape, intermediate),
    FIELD(decode_shape, capacity), FIELD(decode_shape, eps), FIELD(decode_shape, format),
    {"WIDTH", 0, WIDTH},
    {"INT4_GROUP", 0, INT4_GROUP},
    {"BF16", 0, BF16},
    {"INT4", 0, INT4},
    {"PAIRS", 0, PAIRS},
};

int64_t layout_entries(void) { return (int64_t)(sizeof LAYOUT / sizeof LAYOUT[0]); }

const struct layout_entry *layout(void) { return LAYOUT; }

// Returns 0, or -1 where scratch memory could not be allocated (or the format is not in this build).
static int packed_linear(const float *x, int64_t rows, int64_t k, const void *weight, const void *scales, int64_t n,
                         float *y, int format, int threads) {
    if (format == INT4) {
        linear_int4(x, rows, k, weight, scales, n, y, threads);
        return 0;
    }
    if (format == BF16) {
        linear_bf16(x, rows, k, weight, n, y, threads);
        return 0;
    }
#ifdef __AVX512BF16__
    if (format == PAIRS) return linear_bf16_pairs(x, rows, k, weight, n, y, threads);
#endif
    return -1;
}

static void add_into(float *x, const float *y, int64_t count) {
    for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

// x [rows, hidden]: the residual stream of one new token per row, row r in cache slot r at positions[r];
// updated in place through every layer (the final norm and the output layer stay with the caller). Writes each
// row's K and V into the cache. Returns 0; -2, before anything is written, when a position is outside the
// cache's capacity; -1 when scratch memory could not be allocated (x and the step's cache positions are then
// left part-computed: the caller fails the step).
int decode_layers(float *x, int64_t rows, const int64_t *positions, const struct decode_layer *layers,
                  const struct decode_shape *shape, const float *cos, const float *sin_signed, int threads) {
    const int64_t hidden = shape->hidden, head_dim = shape->head_dim, heads = shape->heads;
    const int64_t kv_heads = shape->kv_heads, qkv_width = (heads + 2 * kv_heads) * head_dim;
    const int64_t inter = shape->intermediate, head_stride = shape->capacity * head_dim;
    const int64_t slot_stride = 2 * kv_heads * head_stride;
    float *h = malloc(sizeof(float) * (size_t)(rows * (hidden + qkv_width + heads * head_dim + hidden + 3 * inter)));
    int64_t *visible = malloc(sizeof(int64_t) * (size_t)rows);
    if (h == NULL || visible == NULL) {
        free(h), free(visible);
        return -1;
    }
    float *qkv = h + rows * hidden, *attention = qkv + rows * qkv_width;
    float *projected = attention + rows * heads * head_dim, *gate_up = projected + rows * hidden;
    float *activated = gate_up + rows * 2 * inter;
    int64_t most_visible = 0;
    for (int64_t r = 0; r < rows; ++r) {
        if (positions[r] < 0 || positions[r] >= shape->capacity) {
            free(h), free(visible);
            return -2;
        }
        visible[r] = positions[r] + 1;
        most_visible = visible[r] > most_visible ? visible[r] : most_visible;
    }
    const int format = shape->format;
    for (int64_t l = 0; l < shape->layers; ++l) {
        const struct decode_layer *layer = layers + l;
        int failed = 0;
        rms_norm(x, layer->input_norm, h, rows, hidden, shape->eps);
        failed |= packed_linear(h, rows, hidden, layer->qkv, layer->qkv_scales, qkv_width, qkv, format, threads);
        rope(qkv, rows, qkv_width, heads + kv_heads, head_dim, positions, cos, sin_signed);
        for (int64_t r = 0; r < rows; ++r) {  // each K then V head of the row's new token, at its position
            const float *new_kv = qkv + r * qkv_width + heads * head_dim;
            for (int64_t h = 0; h < 2 * kv_heads; ++h)
                memcpy(layer->kv + r * slot_stride + h * head_stride + positions[r] * head_dim, new_kv + h * head_dim,
                       sizeof(float) * (size_t)head_dim);
        }
        failed |= attention_decode(qkv, qkv_width, head_dim, layer->kv, layer->kv + kv_heads * head_stride,
                                   slot_stride, head_stride, head_dim, visible, attention, rows, heads, kv_heads,
                                   head_dim, most_visible, threads);
        failed |= packed_linear(attention, rows, heads * head_dim, layer->out, layer->out_scales, hidden, projected,
                                format, threads);
        add_into(x, projected, rows * hidden);
        rms_norm(x, layer->post_attention_norm, h, rows, hidden, shape->eps);
        failed |= packed_linear(h, rows, hidden, layer->gate_up, layer->gate_up_scales, 2 * inter, gate_up, format,
                                threads);
        silu_mul(gate_up, rows, inter, activated);
        failed |= packed_linear(activated, rows, inter, layer->down, layer->down_scales, hidden, projected, format,
                                threads);
        add_into(x, projected, rows * hidden);
        if (failed) {  // a matmul or the attention lacked scratch memory: what the layer computed is garbage
            free(h), free(visible);
            return -1;
        }
    }
    free(h), free(visible);
    return 0;
}

// ---- prefill matmuls on AMX tiles (built where the CPU has AMX-BF16: cpu_kernels.py's AMX_FLAGS) ----------
// A prefill is compute bound: AMX's bfloat16 tiles do several times the float32 FMAs above (bench/roofline.md).
// oneDNN's result for a row changes with the rows beside it (a blocking chosen by the row count), enough to
// change a greedy token of a prompt prefilled in a group rather than alone. Here each output is one tile lane
// accumulating the products of 32 inputs at a time, k in order, whatever the row count: a row's result is the
// same alone or in any batch.
//
// y = bf16(x) W^T: x is [rows, k] float32, rounded to bfloat16 (to nearest even) as torch rounds it; y is [rows, n]
// float32, the accumulators as they are. W [n, k] comes packed per 16 output features as [k / 2][16][2] bfloat16
// (cpu_kernels.py's pack_amx): the pairs of inputs a tile multiply takes, 32 inputs a B tile of 1 KB. k is a
// multiple of 32, n of 16 (cpu_kernels.py checks).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE 16     // rows of a tile, and output features of a packed block
#define TILE_K 32   // inputs a tile multiply takes

// 1 where the kernel may use AMX tiles: Linux grants them to a process on request.
int amx_permitted(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

// Tiles 0-3 accumulate 2 row tiles x 2 blocks, 4-5 hold the row tiles' inputs, 6-7 the blocks' weights.
static void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
    } config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.rows[t] = TILE, config.bytes_per_row[t] = 64;
    _tile_loadconfig(&config);
}

// to nearest even, as torch rounds a float32 to bfloat16
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// A 16 x 16 result tile into y's rows [0, valid): straight where all 16 are rows of y.
#define STORE(tile, y, n, valid, scratch)                                             \
    do {                                                                              \
        if ((valid) == TILE) {                                                        \
            _tile_stored(tile, y, (n) * sizeof(float));                               \
        } else {                                                                      \
            _tile_stored(tile, scratch, TILE * sizeof(float));                        \
            for (int64_t r = 0; r < (valid); ++r)                                     \
                memcpy((y) + r * (n), (scratch) + r * TILE, TILE * sizeof(float));    \
        }                                                                             \
    } while (0)

// Returns 0, or -1 where the inputs' scratch could not be allocated.
int linear_amx_bf16(const float *x, int64_t rows, int64_t k, const uint16_t *packed, int64_t n, float *y,
                    int threads) {
    const int64_t row_tiles = (rows + TILE - 1) / TILE, blocks = n / TILE;
    // the inputs in bfloat16, rows padded with zeros to whole tiles (a zero row changes no other row's sums)
    uint16_t *inputs = calloc((size_t)(row_tiles * TILE * k), sizeof(uint16_t));
    if (inputs == NULL) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < k; ++i) inputs[r * k + i] = to_bf16(x[r * k + i]);
        configure_tiles();
        float scratch[TILE * TILE];
        // Two blocks and two row tiles at a time; an odd last one is paired with itself (computed twice, kept once).
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < (blocks + 1) / 2; ++pair) {
            const int64_t b0 = 2 * pair, b1 = b0 + 1 < blocks ? b0 + 1 : b0;
            const uint16_t *w0 = packed + b0 * k * TILE, *w1 = packed + b1 * k * TILE;
            for (int64_t t0 = 0; t0 < row_tiles; t0 += 2) {
                const int64_t t1 = t0 + 1 < row_tiles ? t0 + 1 : t0;
                const uint16_t *a0 = inputs + t0 * TILE * k, *a1 = inputs + t1 * TILE * k;
                _tile_zero(0);  // the tile intrinsics are statements (asm), not expressions
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t i = 0; i < k; i += TILE_K) {
                    _tile_loadd(4, a0 + i, k * sizeof(uint16_t));
                    _tile_loadd(5, a1 + i, k * sizeof(uint16_t));
                    _tile_loadd(6, w0 + i * TILE, 64);  // pairs i/2 .. i/2 + 15, 16 features each
                    _tile_loadd(7, w1 + i * TILE, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                const int64_t valid0 = rows - t0 * TILE < TILE ? rows - t0 * TILE : TILE;
                const int64_t valid1 = rows - t1 * TILE < TILE ? rows - t1 * TILE : TILE;
                float *y00 = y + t0 * TILE * n + b0 * TILE, *y01 = y + t0 * TILE * n + b1 * TILE;
                float *y10 = y + t1 * TILE * n + b0 * TILE, *y11 = y + t1 * TILE * n + b1 * TILE;
                STORE(0, y00, n, valid0, scratch);
                STORE(1, y01, n, valid0, scratch);
                STORE(2, y10, n, valid1, scratch);
                STORE(3, y11, n, valid1, scratch);
            }
        }
        _tile_release();
    }
    free(inputs);
    return 0;
}
#undef STORE
#endif
