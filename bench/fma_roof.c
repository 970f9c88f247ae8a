// The float32 FMA roof of this CPU: GFLOPS of 8-wide (AVX2) or 16-wide (AVX512) fused multiply-adds, in 12
// independent chains per thread (enough to hide the FMA latency on every x86 core), no memory traffic. No matmul
// can beat it; bench/roofline.py divides the prefill matmuls' GFLOPS by it. Each chain starts from its own value
// and thread: identical chains would let the compiler merge them and time one.

#include <immintrin.h>
#include <omp.h>
#include <time.h>

static double seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec + now.tv_nsec * 1e-9;
}

#define CHAINS 12
#define STEP(vector, fma, a) \
    for (int c = 0; c < CHAINS; ++c) a[c] = fma(a[c], factor, addend);

// GFLOPS of `iterations` x CHAINS FMAs per thread on `threads` threads; `sink` keeps the results alive.
#define ROOF(name, vector, set1, fma, lanes)                                                            \
    double name(long iterations, int threads, float *sink) {                                             \
        double started = seconds();                                                                      \
        float total = 0.0f;                                                                              \
        _Pragma("omp parallel num_threads(threads) reduction(+ : total)") {                              \
            vector a[CHAINS];                                                                            \
            for (int c = 0; c < CHAINS; ++c) a[c] = set1(1.0f + 0.01f * c + 0.1f * omp_get_thread_num()); \
            const vector factor = set1(0.9999999f), addend = set1(1e-7f);                                \
            for (long i = 0; i < iterations; ++i) {                                                      \
                _Pragma("GCC unroll 12") STEP(vector, fma, a)                                            \
            }                                                                                            \
            float lanes_out[lanes];                                                                      \
            vector sum = a[0];                                                                           \
            for (int c = 1; c < CHAINS; ++c) sum = sum + a[c];                                           \
            __builtin_memcpy(lanes_out, &sum, sizeof lanes_out);                                         \
            total += lanes_out[0];                                                                       \
        }                                                                                                \
        *sink = total;                                                                                   \
        return 2.0 * lanes * CHAINS * (double)iterations * threads / (seconds() - started) / 1e9;        \
    }

__attribute__((target("avx2,fma"))) ROOF(avx2_gflops, __m256, _mm256_set1_ps, _mm256_fmadd_ps, 8)
__attribute__((target("avx512f"))) ROOF(avx512_gflops, __m512, _mm512_set1_ps, _mm512_fmadd_ps, 16)
