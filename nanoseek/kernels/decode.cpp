/* Matmuls for CPU decoding (AVX2 + FMA), built and loaded by nanoseek/kernels as the torch
 * ops nanoseek::gemm_f32, gemm_q8, moe_f32, moe_q8: a handful of activation rows against
 * weights read once per step, in fp32 or int8.
 *
 * A weight is row-major [N, K] (nn.Linear's layout): fp32, or int8 with one fp32 scale per
 * row n (weight-only: activations stay fp32):
 *     y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      (fp32: no scale)
 * Decoding reads every weight once per step for a few rows, so the time is the weight
 * bytes; MKL's fp32 matmuls run these one-row shapes at about half the bandwidth. One-row
 * products keep four accumulators (an FMA's latency would otherwise bound the loop); K must
 * be a multiple of 8. The work is split over torch's intra-op threads (at::parallel_for)
 * by output rows (gemm) or by groups of (token, expert) pairs with one expert (moe); every
 * output is computed the same way whatever the split, so results do not depend on the
 * thread count. Registered from C++, a call costs no Python: a compiled decode step calls
 * them from its C++ wrapper.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int MAX_ROWS = 8;               // rows of x per pass over the weights
constexpr int64_t MIN_TASK_BYTES = 1 << 16;  // weight bytes a thread reads at the least

inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const int8_t* p) {  // 8 int8 -> 8 fp32
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// one row of x against one weight row
template <typename W>
float dot1(const float* x, const W* w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// y[0:MB, n0:n1] for MB rows of x, NB weight rows at a time: MB * NB independent
// accumulators, all in registers (the counts are compile-time), so the FMAs' latency is
// hidden and each x load serves NB weight rows (a loop over a runtime row count kept its
// accumulators in memory: 2-3 rows ran at about one row's speed)
template <int MB, int NB, typename W>
void gemm_block(const float* x, int64_t ldx, int64_t K, const W* w, const float* scale,
                int64_t n0, int64_t n1, float* y, int64_t ldy) {
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) {
        __m256 acc[NB][MB];
        for (int j = 0; j < NB; j++)
            for (int m = 0; m < MB; m++) acc[j][m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
            __m256 xv[MB];
            for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
            for (int j = 0; j < NB; j++) {
                __m256 wv = load8(w + (n + j) * K + k);
                for (int m = 0; m < MB; m++) acc[j][m] = _mm256_fmadd_ps(wv, xv[m], acc[j][m]);
            }
        }
        for (int j = 0; j < NB; j++) {
            float s = scale ? scale[n + j] : 1.0f;
            for (int m = 0; m < MB; m++) y[m * ldy + n + j] = hsum(acc[j][m]) * s;
        }
    }
    if (n < n1) gemm_block<MB, 1>(x, ldx, K, w, scale, n, n1, y, ldy);
}

// y [M, n0:n1] (row stride ldy) = x [M, K] (row stride ldx) times w[n0:n1]^T
template <typename W>
void gemm_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w,
               const float* scale, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const float* xb = x + m0 * ldx;
        float* yb = y + m0 * ldy;
        switch (std::min<int64_t>(M - m0, MAX_ROWS)) {
            case 1:
                for (int64_t n = n0; n < n1; n++)
                    yb[n] = dot1(xb, w + n * K, K) * (scale ? scale[n] : 1.0f);
                break;
            case 2: gemm_block<2, 4>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            case 3: gemm_block<3, 3>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            case 4: gemm_block<4, 2>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            case 5: gemm_block<5, 2>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            case 6: gemm_block<6, 1>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            case 7: gemm_block<7, 1>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
            default: gemm_block<8, 1>(xb, ldx, K, w, scale, n0, n1, yb, ldy); break;
        }
    }
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor* scale) {
    auto want = scale ? at::kChar : at::kFloat;
    bool bad_scale = scale && scale->scalar_type() != at::kFloat;
    TORCH_CHECK_TYPE(
        x.scalar_type() == at::kFloat && w.scalar_type() == want && !bad_scale,
        "the decode kernels take fp32 x and fp32 weights, or int8 weights with fp32 scales; "
        "got ", x.scalar_type(), ", ", w.scalar_type());
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && w.dim() == 2 && w.size(1) % 8 == 0 &&
                          x.size(1) == w.size(1),
                      "the decode kernels run on the CPU, for rows a multiple of 8 wide");
}

template <typename W>
at::Tensor gemm(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor* scale_) {
    check(x_, w_, scale_);
    at::Tensor x = x_.contiguous(), w = w_.contiguous();
    at::Tensor scale = scale_ ? scale_->contiguous() : at::Tensor();
    int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const W* wp = w.data_ptr<W>();
    const float* sp = scale_ ? scale.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    int64_t grain = std::max<int64_t>(1, MIN_TASK_BYTES / (K * (int64_t)sizeof(W)));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        gemm_rows(xp, K, M, K, wp, sp, n0, n1, yp, N);
    });
    return y;
}

// Routed experts for a few tokens:
//   out[t] = sum_j weight[t, j] * W2_e (silu(W1_e x_t) * (W3_e x_t)), e = idx[t, j]
// w13: [E * 2I, d] (per expert I rows of w1 then I rows of w3), w2: [E * d, I]. The (token,
// expert) pairs are grouped by expert, in order, and each group of up to MAX_ROWS pairs
// reads its expert's weights in place once for all its rows: a verify step's positions, or
// a batch's tokens, that share an expert share the read (9 positions of `small`, routed at
// random, hold ~21 distinct experts among their 36 pairs). Each pair writes its own row of
// `part`; the pairs of a token are then summed in order. The groups do not depend on the
// thread count.
template <typename W>
at::Tensor moe(const at::Tensor& x_, const at::Tensor& weights_, const at::Tensor& idx_,
               const at::Tensor& w13_, const at::Tensor* s13_, const at::Tensor& w2_,
               const at::Tensor* s2_) {
    check(x_, w13_, s13_);
    at::Tensor x = x_.contiguous(), idx = idx_.contiguous().to(at::kLong);
    at::Tensor weights = weights_.contiguous().to(at::kFloat);
    at::Tensor w13 = w13_.contiguous(), w2 = w2_.contiguous();
    at::Tensor s13 = s13_ ? s13_->contiguous() : at::Tensor();
    at::Tensor s2 = s2_ ? s2_->contiguous() : at::Tensor();
    int64_t T = x.size(0), d = x.size(1), k = idx.size(1), I = w2.size(1), P = T * k;
    int64_t E = w13.size(0) / (2 * I);
    at::Tensor part = at::empty({P, d}, x.options());
    const float* xp = x.data_ptr<float>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const float* wtp = weights.data_ptr<float>();
    const W* w13p = w13.data_ptr<W>();
    const W* w2p = w2.data_ptr<W>();
    const float* s13p = s13_ ? s13.data_ptr<float>() : nullptr;
    const float* s2p = s2_ ? s2.data_ptr<float>() : nullptr;
    float* pp = part.data_ptr<float>();
    // the pairs sorted by expert (a counting sort, stable), cut into groups of <= MAX_ROWS
    std::vector<int64_t> starts(E + 1, 0), order(P);
    for (int64_t p = 0; p < P; p++) {
        TORCH_CHECK_INDEX(ip[p] >= 0 && ip[p] < E, "expert index ", ip[p], " out of range");
        starts[ip[p] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) starts[e + 1] += starts[e];
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t p = 0; p < P; p++) order[fill[ip[p]]++] = p;
    std::vector<int64_t> groups;  // the first sorted pair of each group, then P
    for (int64_t e = 0; e < E; e++)
        for (int64_t g = starts[e]; g < starts[e + 1]; g += MAX_ROWS) groups.push_back(g);
    const int64_t G = groups.size();
    groups.push_back(P);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> xb(MAX_ROWS * d), h(MAX_ROWS * 2 * I), a(MAX_ROWS * I), y(MAX_ROWS * d);
        for (int64_t g = g0; g < g1; g++) {
            const int64_t first = groups[g], n = groups[g + 1] - first, e = ip[order[first]];
            for (int64_t r = 0; r < n; r++)
                std::copy_n(xp + order[first + r] / k * d, d, xb.data() + r * d);
            gemm_rows(xb.data(), d, n, d, w13p + e * 2 * I * d, s13p ? s13p + e * 2 * I : nullptr,
                      0, 2 * I, h.data(), 2 * I);
            for (int64_t r = 0; r < n; r++)
                for (int64_t i = 0; i < I; i++) {
                    float gt = h[r * 2 * I + i];
                    a[r * I + i] = gt / (1.0f + expf(-gt)) * h[r * 2 * I + I + i];
                }
            gemm_rows(a.data(), I, n, I, w2p + e * d * I, s2p ? s2p + e * d : nullptr, 0, d,
                      y.data(), d);
            for (int64_t r = 0; r < n; r++) {
                const int64_t p = order[first + r];
                const float wt = wtp[p];
                float* o = pp + p * d;
                for (int64_t c = 0; c < d; c++) o[c] = wt * y[r * d + c];
            }
        }
    });
    at::Tensor out = at::empty({T, d}, x.options());
    float* op = out.data_ptr<float>();
    for (int64_t t = 0; t < T; t++) {
        float* o = op + t * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t j = 0; j < k; j++) {
            const float* q = pp + (t * k + j) * d;
            for (int64_t c = 0; c < d; c++) o[c] += q[c];
        }
    }
    return out;
}

at::Tensor gemm_f32(const at::Tensor& x, const at::Tensor& w) { return gemm<float>(x, w, nullptr); }

at::Tensor gemm_q8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
    return gemm<int8_t>(x, q, &scale);
}

at::Tensor moe_f32(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& idx,
                   const at::Tensor& w13, const at::Tensor& w2) {
    return moe<float>(x, weights, idx, w13, nullptr, w2, nullptr);
}

at::Tensor moe_q8(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& idx,
                  const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                  const at::Tensor& s2) {
    return moe<int8_t>(x, weights, idx, w13, &s13, w2, &s2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
    m.def("gemm_f32(Tensor x, Tensor w) -> Tensor");
    m.def("gemm_q8(Tensor x, Tensor q, Tensor scale) -> Tensor");
    m.def("moe_f32(Tensor x, Tensor weights, Tensor idx, Tensor w13, Tensor w2) -> Tensor");
    m.def("moe_q8(Tensor x, Tensor weights, Tensor idx, Tensor w13, Tensor s13, Tensor w2, "
          "Tensor s2) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
    m.impl("gemm_f32", gemm_f32);
    m.impl("gemm_q8", gemm_q8);
    m.impl("moe_f32", moe_f32);
    m.impl("moe_q8", moe_q8);
}
