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
 * by output rows (gemm) or by (token, expert) pair (moe); every output is computed the same
 * way whatever the split, so results do not depend on the thread count. Registered from
 * C++, a call costs no Python: a compiled decode step calls them from its C++ wrapper.
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

// y [M, n0:n1] (row stride ldy) = x [M, K] (row stride ldx) times w[n0:n1]^T
template <typename W>
void gemm_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w,
               const float* scale, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        int64_t mb = std::min<int64_t>(M - m0, MAX_ROWS);
        const float* xb = x + m0 * ldx;
        float* yb = y + m0 * ldy;
        if (mb == 1) {
            for (int64_t n = n0; n < n1; n++)
                yb[n] = dot1(xb, w + n * K, K) * (scale ? scale[n] : 1.0f);
            continue;
        }
        for (int64_t n = n0; n < n1; n++) {
            const W* row = w + n * K;
            __m256 acc[MAX_ROWS];
            for (int64_t m = 0; m < mb; m++) acc[m] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) {
                __m256 wv = load8(row + k);
                for (int64_t m = 0; m < mb; m++)
                    acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + m * ldx + k), acc[m]);
            }
            float s = scale ? scale[n] : 1.0f;
            for (int64_t m = 0; m < mb; m++) yb[m * ldy + n] = hsum(acc[m]) * s;
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

// Routed experts for a few tokens, each (token, expert) pair read in place:
//   out[t] = sum_j weight[t, j] * W2_e (silu(W1_e x_t) * (W3_e x_t)), e = idx[t, j]
// w13: [E * 2I, d] (per expert I rows of w1 then I rows of w3), w2: [E * d, I]. Each pair
// writes its own row of `part`; the pairs of a token are then summed in order.
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
    int64_t T = x.size(0), d = x.size(1), k = idx.size(1), I = w2.size(1);
    at::Tensor part = at::empty({T * k, d}, x.options());
    const float* xp = x.data_ptr<float>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const float* wtp = weights.data_ptr<float>();
    const W* w13p = w13.data_ptr<W>();
    const W* w2p = w2.data_ptr<W>();
    const float* s13p = s13_ ? s13.data_ptr<float>() : nullptr;
    const float* s2p = s2_ ? s2.data_ptr<float>() : nullptr;
    float* pp = part.data_ptr<float>();
    at::parallel_for(0, T * k, 1, [&](int64_t p0, int64_t p1) {
        std::vector<float> h(3 * I);
        float* a = h.data() + 2 * I;
        for (int64_t p = p0; p < p1; p++) {
            int64_t t = p / k, e = ip[p];
            float wt = wtp[p];
            gemm_rows(xp + t * d, d, 1, d, w13p + e * 2 * I * d, s13p ? s13p + e * 2 * I : nullptr,
                      0, 2 * I, h.data(), 2 * I);
            for (int64_t i = 0; i < I; i++) {
                float g = h[i];
                a[i] = g / (1.0f + expf(-g)) * h[I + i];
            }
            const W* w = w2p + e * d * I;
            const float* s = s2p ? s2p + e * d : nullptr;
            float* o = pp + p * d;
            for (int64_t c = 0; c < d; c++) o[c] = wt * dot1(a, w + c * I, I) * (s ? s[c] : 1.0f);
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
