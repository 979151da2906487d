/* Matmuls for CPU decoding (AVX2 + FMA), loaded by nanoseek/kernels: a handful of
 * activation rows against weights read once per step, in fp32 or int8.
 *
 * A weight is row-major [N, K] (nn.Linear's layout): fp32, or int8 with one fp32 scale per
 * row n (weight-only: activations stay fp32):
 *     y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      (fp32: no scale)
 * Decoding reads every weight once per step for a few rows, so the time is the weight
 * bytes; MKL's fp32 matmuls run these one-row shapes at about half the bandwidth. One-row
 * products keep four accumulators (an FMA's latency would otherwise bound the loop); K must
 * be a multiple of 8. Each kernel is written once (DECODE_KERNELS) for both weight types.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>

#define MAX_ROWS 8 /* rows of x per pass over the weights */

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load_f32(const float* p) { return _mm256_loadu_ps(p); }

static inline __m256 load_q8(const int8_t* p) { /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* For weights of type W read by LOAD (8 at a time), with a row scale or none (NULL):
 *   dot1_S:      one row of x against one weight row
 *   gemm_rows_S: y [M, N] (row stride ldy) = x [M, K] (row stride ldx) times w^T
 *   gemm_S:      the exported matmul
 *   moe_S:       routed experts for a few tokens, each (token, expert) pair read in place:
 *                out[t] = sum_j weight[t, j] * W2_e (silu(W1_e x_t) * (W3_e x_t)), e = idx[t, j]
 *                w13: [E * 2I, d] (per expert I rows of w1 then I rows of w3), w2: [E * d, I];
 *                h: scratch of 2I + I floats. */
#define DECODE_KERNELS(S, W, LOAD)                                                             \
    static float dot1_##S(const float* x, const W* w, int K) {                                 \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
        int k = 0;                                                                             \
        for (; k + 32 <= K; k += 32) {                                                         \
            a0 = _mm256_fmadd_ps(LOAD(w + k), _mm256_loadu_ps(x + k), a0);                     \
            a1 = _mm256_fmadd_ps(LOAD(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);             \
            a2 = _mm256_fmadd_ps(LOAD(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);           \
            a3 = _mm256_fmadd_ps(LOAD(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);           \
        }                                                                                      \
        for (; k < K; k += 8) a0 = _mm256_fmadd_ps(LOAD(w + k), _mm256_loadu_ps(x + k), a0);   \
        return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));              \
    }                                                                                          \
                                                                                               \
    static void gemm_rows_##S(const float* x, int ldx, int M, int K, const W* w,               \
                              const float* scale, int N, float* y, int ldy) {                  \
        for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {                                             \
            int mb = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;                                    \
            const float* xb = x + (size_t)m0 * ldx;                                            \
            float* yb = y + (size_t)m0 * ldy;                                                  \
            if (mb == 1) {                                                                     \
                for (int n = 0; n < N; n++)                                                    \
                    yb[n] = dot1_##S(xb, w + (size_t)n * K, K) * (scale ? scale[n] : 1.0f);    \
                continue;                                                                      \
            }                                                                                  \
            for (int n = 0; n < N; n++) {                                                      \
                const W* row = w + (size_t)n * K;                                              \
                __m256 acc[MAX_ROWS];                                                          \
                for (int m = 0; m < mb; m++) acc[m] = _mm256_setzero_ps();                     \
                for (int k = 0; k < K; k += 8) {                                               \
                    __m256 wv = LOAD(row + k);                                                 \
                    for (int m = 0; m < mb; m++)                                               \
                        acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + (size_t)m * ldx + k), \
                                                 acc[m]);                                      \
                }                                                                              \
                float s = scale ? scale[n] : 1.0f;                                             \
                for (int m = 0; m < mb; m++) yb[(size_t)m * ldy + n] = hsum(acc[m]) * s;       \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    void gemm_##S(const float* x, int M, int K, const W* w, const float* scale, int N,         \
                  float* y) {                                                                  \
        gemm_rows_##S(x, K, M, K, w, scale, N, y, N);                                          \
    }                                                                                          \
                                                                                               \
    void moe_##S(const float* x, int T, int k, const int64_t* idx, const float* weight, int d, \
                 int I, const W* w13, const float* s13, const W* w2, const float* s2,          \
                 float* out, float* h) {                                                       \
        float* a = h + 2 * I;                                                                  \
        for (int t = 0; t < T; t++) {                                                          \
            float* o = out + (size_t)t * d;                                                    \
            for (int c = 0; c < d; c++) o[c] = 0.0f;                                           \
            for (int j = 0; j < k; j++) {                                                      \
                int64_t e = idx[(size_t)t * k + j];                                            \
                float wt = weight[(size_t)t * k + j];                                          \
                gemm_rows_##S(x + (size_t)t * d, d, 1, d, w13 + (size_t)e * 2 * I * d,         \
                              s13 ? s13 + e * 2 * I : NULL, 2 * I, h, 2 * I);                  \
                for (int i = 0; i < I; i++) {                                                  \
                    float g = h[i];                                                            \
                    a[i] = g / (1.0f + expf(-g)) * h[I + i];                                   \
                }                                                                              \
                const W* w = w2 + (size_t)e * d * I;                                           \
                const float* s = s2 ? s2 + e * d : NULL;                                       \
                for (int c = 0; c < d; c++)                                                    \
                    o[c] += wt * dot1_##S(a, w + (size_t)c * I, I) * (s ? s[c] : 1.0f);        \
            }                                                                                  \
        }                                                                                      \
    }

DECODE_KERNELS(f32, float, load_f32)
DECODE_KERNELS(q8, int8_t, load_q8)
