/* The routed experts' training step on CPU, fp32 or bf16, built and loaded by nanoseek/kernels
 * as the torch ops nanoseek::experts_fwd and nanoseek::experts_bwd (moe._FusedExpertLoop is
 * the autograd node; moe._ExpertLoop is the same math in Python, the path everywhere else).
 *
 * Rows are (token, expert) pairs sorted by expert, sizes[e] rows for expert e (in bf16 padded
 * with rows of weight 0, see moe.Experts.sorted); src[r] is the token row r reads and rw[r]
 * its gate weight. Per expert, on its block of rows:
 *     h = xs @ w13[e]^T           [rows, 2I]: gate | up
 *     a = rw * silu(gate) * up    [rows, I]   (the gate weight applied here, not to y)
 *     y = a @ w2[e]^T             [rows, d], summed into out[src] afterwards
 * The backward, per expert: dw2[e] = dy^T a, da = dy @ w2[e], then one fused pass gives the
 * gate weight's gradient (sum over i of da * silu(gate) * up) and dh, then dw13[e] = dh^T xs
 * and dxs = dh @ w13[e]. Against the Python loop this saves its ~40 op calls per expert and
 * five of its seven elementwise passes; the matmuls are the same at::mm calls (MKL in fp32,
 * oneDNN in bf16). The elementwise math runs in fp32 (bf16 rounded once, on store), in
 * at::vec vectors (16 floats when built for AVX-512, 8 for AVX2: kernels._vec_flags); silu is
 * torch's formula (g / (1 + exp(-g)), Sleef's exp from libtorch), so fp32 results differ
 * from the Python loop's only in where rw is multiplied in: ~1 ulp. With several threads the
 * experts are shared out between them, each expert's matmuls on one thread (for_each_expert).
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using bf16 = at::BFloat16;
using Vec = at::vec::Vectorized<float>;  // 16 floats under AVX-512, 8 under AVX2 (build flags)
constexpr int64_t ROWS_PER_TASK = 16;  // rows a thread takes in the elementwise passes

// A row of n values as floats: itself in fp32; converted into buf in bf16.
inline const float* as_float(const float* p, int64_t, float*) { return p; }
inline const float* as_float(const bf16* p, int64_t n, float* buf) {
    at::vec::convert(p, buf, n);
    return buf;
}
// Where to compute a row of n outputs in fp32: the output itself, or buf (then store_row).
inline float* out_row(float* p, float*) { return p; }
inline float* out_row(bf16*, float* buf) { return buf; }
inline void store_row(float*, const float*, int64_t) {}
inline void store_row(bf16* p, const float* buf, int64_t n) { at::vec::convert(buf, p, n); }

inline Vec sigmoid(Vec g) {
    const Vec one(1.0f);
    return one / (one + (Vec(0.0f) - g).exp());
}

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// a[r, :] = rw[r] * silu(h[r, :I]) * h[r, I:]
template <typename T>
void swiglu_forward(const T* h, const T* rw, T* a, int64_t rows, int64_t I) {
    at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(3 * I);
        const int64_t full = I - I % Vec::size();
        for (int64_t r = r0; r < r1; r++) {
            const float* g = as_float(h + r * 2 * I, I, buf.data());
            const float* u = as_float(h + r * 2 * I + I, I, buf.data() + I);
            float* o = out_row(a + r * I, buf.data() + 2 * I);
            const float wr = static_cast<float>(rw[r]);
            const Vec w(wr);
            for (int64_t i = 0; i < full; i += Vec::size()) {
                Vec gv = Vec::loadu(g + i);
                ((gv * sigmoid(gv)) * Vec::loadu(u + i) * w).store(o + i);
            }
            for (int64_t i = full; i < I; i++) o[i] = wr * (g[i] * sigmoid(g[i])) * u[i];
            store_row(a + r * I, o, I);
        }
    });
}

// From da_w = dL/da (a = rw * silu(gate) * up): drw[r], and dh = [dgate | dup].
template <typename T>
void swiglu_backward(const T* daw, const T* h, const T* rw, T* dh, T* drw, int64_t rows,
                     int64_t I) {
    at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(5 * I);
        const int64_t full = I - I % Vec::size();
        const Vec one(1.0f);
        for (int64_t r = r0; r < r1; r++) {
            const float* g = as_float(h + r * 2 * I, I, buf.data());
            const float* u = as_float(h + r * 2 * I + I, I, buf.data() + I);
            const float* d = as_float(daw + r * I, I, buf.data() + 2 * I);
            float* dg = out_row(dh + r * 2 * I, buf.data() + 3 * I);
            float* du = out_row(dh + r * 2 * I + I, buf.data() + 4 * I);
            const float wr = static_cast<float>(rw[r]);
            const Vec w(wr);
            Vec acc(0.0f);
            for (int64_t i = 0; i < full; i += Vec::size()) {
                Vec gv = Vec::loadu(g + i), uv = Vec::loadu(u + i), dv = Vec::loadu(d + i);
                Vec sg = sigmoid(gv);
                Vec act = gv * sg;
                acc = at::vec::fmadd(dv * act, uv, acc);
                Vec da = dv * w;
                (da * act).store(du + i);
                // silu'(g) = s * (1 + g * (1 - s)), torch's silu_backward
                (da * uv * (sg * (one + gv * (one - sg)))).store(dg + i);
            }
            float dot = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
            for (int64_t i = full; i < I; i++) {
                float s = sigmoid(g[i]), act = g[i] * s, da = d[i] * wr;
                dot += d[i] * act * u[i];
                du[i] = da * act;
                dg[i] = da * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
            }
            store_row(dh + r * 2 * I, dg, I);
            store_row(dh + r * 2 * I + I, du, I);
            drw[r] = static_cast<T>(dot);
        }
    });
}

void check(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
           const at::Tensor& src, const at::Tensor& rw, at::IntArrayRef sizes) {
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "experts kernels: fp32 or bf16 only");
    TORCH_CHECK(w13.scalar_type() == dt && w2.scalar_type() == dt && rw.scalar_type() == dt,
                "experts kernels: x, rw, w13 and w2 of one dtype");
    TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous() &&
                    src.is_contiguous() && rw.is_contiguous(),
                "experts kernels: contiguous tensors only");
    TORCH_CHECK(w13.size(0) == (int64_t)sizes.size() && w2.size(0) == w13.size(0),
                "experts kernels: one size per expert");
    int64_t rows = 0;
    for (int64_t n : sizes) rows += n;
    TORCH_CHECK(rows == src.size(0) && rows == rw.size(0), "experts kernels: sizes != rows");
}

// How many threads for_each_expert runs on: the slots a caller needs per-thread buffers for.
// 1 (each matmul split over the threads instead) unless there are at least 4 experts a
// thread: measured on 2 threads with 32 experts; with few experts a thread the row balance
// is coarse, and a many-core CPU's larger matmuls split well.
int64_t expert_threads(at::IntArrayRef sizes) {
    const int64_t threads = at::get_num_threads();
    if (at::in_parallel_region() || (int64_t)sizes.size() < 4 * threads) return 1;
    return threads;
}

// Runs body(e, start, n, slot) for every expert e (its block of n rows from `start`; slot: the
// running thread's index < expert_threads). With several threads each takes a contiguous
// range of experts holding about an equal share of the rows and runs their matmuls on its
// own (at::mm nested in at::parallel_for is single-threaded): for per-expert matmuls of a few
// hundred rows that beats splitting each one over the threads.
template <typename F>
void for_each_expert(at::IntArrayRef sizes, F&& body) {
    const int64_t E = sizes.size(), T = expert_threads(sizes);
    std::vector<int64_t> starts(E + 1, 0);
    for (int64_t e = 0; e < E; e++) starts[e + 1] = starts[e] + sizes[e];
    const int64_t R = starts[E];
    if (T == 1 || R == 0) {
        for (int64_t e = 0; e < E; e++) body(e, starts[e], sizes[e], 0);
        return;
    }
    // a worker thread does not inherit the caller's thread-local state (grad mode, inference
    // mode: in-place writes to inference tensors fail outside it): hand it over
    const at::ThreadLocalState caller;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        at::ThreadLocalStateGuard guard(caller);
        for (int64_t t = t0; t < t1; t++)
            for (int64_t e = 0; e < E; e++)
                if (std::min(T - 1, starts[e] * T / R) == t) body(e, starts[e], sizes[e], t);
    });
}

template <typename T>
void forward_loop(const at::Tensor& xs, const at::Tensor& rw, const at::Tensor& w13,
                  const at::Tensor& w2, at::IntArrayRef sizes, at::Tensor& h, at::Tensor& a,
                  at::Tensor& ys) {
    const int64_t I = w2.size(2);
    for_each_expert(sizes, [&](int64_t e, int64_t start, int64_t n, int64_t) {
        if (n == 0) return;
        at::Tensor hr = h.narrow(0, start, n), ar = a.narrow(0, start, n);
        at::Tensor yr = ys.narrow(0, start, n);
        at::mm_out(hr, xs.narrow(0, start, n), w13[e].t());
        swiglu_forward<T>(hr.data_ptr<T>(), rw.data_ptr<T>() + start, ar.data_ptr<T>(), n, I);
        at::mm_out(yr, ar, w2[e].t());
    });
}

// -> (out [N, d], xs [R, d], h [R, 2I], a [R, I]); the last three for the backward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_fwd(
    const at::Tensor& x, const at::Tensor& rw, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& src, at::IntArrayRef sizes) {
    check(x, w13, w2, src, rw, sizes);
    const int64_t R = src.size(0), I = w2.size(2), d = x.size(1);
    at::Tensor xs = x.index_select(0, src);
    at::Tensor h = at::empty({R, 2 * I}, x.options());
    at::Tensor a = at::empty({R, I}, x.options());
    at::Tensor ys = at::empty({R, d}, x.options());
    if (x.scalar_type() == at::kFloat)
        forward_loop<float>(xs, rw, w13, w2, sizes, h, a, ys);
    else
        forward_loop<bf16>(xs, rw, w13, w2, sizes, h, a, ys);
    at::Tensor out = at::zeros_like(x).index_add_(0, src, ys);
    return {out, xs, h, a};
}

// dst (the weights' dtype) <- src (the compute dtype), while src is in cache
void copy_converted(at::Tensor& dst, const at::Tensor& src) {
    if (src.scalar_type() == at::kBFloat16 && dst.scalar_type() == at::kFloat && dst.is_contiguous())
        at::vec::convert(src.data_ptr<bf16>(), dst.data_ptr<float>(), src.numel());
    else
        dst.copy_(src);
}

template <typename T>
void backward_loop(const at::Tensor& dys, const at::Tensor& xs, const at::Tensor& h,
                   const at::Tensor& a, const at::Tensor& rw, const at::Tensor& w13,
                   const at::Tensor& w2, at::IntArrayRef sizes, at::Tensor& drw,
                   at::Tensor& dw13, at::Tensor& dw2, at::Tensor& dxs) {
    const int64_t I = w2.size(2);
    int64_t most = 0;
    for (int64_t n : sizes) most = std::max(most, n);
    // per thread, one expert's da and dh at a time: written and read again while in cache;
    // weight gradients wanted in another dtype (bf16 compute, fp32 parameters) go through a
    // buffer too and are converted while in cache, not in one cold pass afterwards
    const bool convert = dw13.scalar_type() != xs.scalar_type();
    std::vector<at::Tensor> daw_buf, dh_buf, dw13_buf, dw2_buf;
    for (int64_t t = 0, threads = expert_threads(sizes); t < threads; t++) {
        daw_buf.push_back(at::empty({most, I}, xs.options()));
        dh_buf.push_back(at::empty({most, 2 * I}, xs.options()));
        if (convert) {
            dw13_buf.push_back(at::empty(w13.sizes().slice(1), xs.options()));
            dw2_buf.push_back(at::empty(w2.sizes().slice(1), xs.options()));
        }
    }
    for_each_expert(sizes, [&](int64_t e, int64_t start, int64_t n, int64_t t) {
        at::Tensor dw13e = dw13[e], dw2e = dw2[e];
        if (n == 0) {  // an expert without rows: zero gradient
            dw13e.zero_();
            dw2e.zero_();
            return;
        }
        at::Tensor dy = dys.narrow(0, start, n), xr = xs.narrow(0, start, n);
        at::Tensor daw = daw_buf[t].narrow(0, 0, n), dh = dh_buf[t].narrow(0, 0, n);
        at::Tensor dxr = dxs.narrow(0, start, n);
        at::mm_out(convert ? dw2_buf[t] : dw2e, dy.t(), a.narrow(0, start, n));
        if (convert) copy_converted(dw2e, dw2_buf[t]);
        at::mm_out(daw, dy, w2[e]);
        swiglu_backward<T>(daw.data_ptr<T>(), h.data_ptr<T>() + start * 2 * I,
                           rw.data_ptr<T>() + start, dh.data_ptr<T>(),
                           drw.data_ptr<T>() + start, n, I);
        at::mm_out(convert ? dw13_buf[t] : dw13e, dh.t(), xr);
        if (convert) copy_converted(dw13e, dw13_buf[t]);
        at::mm_out(dxr, dh, w13[e]);
    });
}

// -> (dx [N, d], drw [R], dw13 [E, 2I, d], dw2 [E, d, I]); dw13, dw2 in weight_grad_dtype
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_bwd(
    const at::Tensor& dout, const at::Tensor& xs, const at::Tensor& h, const at::Tensor& a,
    const at::Tensor& rw, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& src,
    at::IntArrayRef sizes, at::ScalarType weight_grad_dtype) {
    const int64_t R = src.size(0), d = xs.size(1);
    at::Tensor dys = dout.to(xs.scalar_type()).contiguous().index_select(0, src);
    at::Tensor drw = at::empty({R}, rw.options());
    at::Tensor dw13 = at::empty_like(w13, w13.options().dtype(weight_grad_dtype));
    at::Tensor dw2 = at::empty_like(w2, w2.options().dtype(weight_grad_dtype));
    at::Tensor dxs = at::empty({R, d}, xs.options());
    if (xs.scalar_type() == at::kFloat)
        backward_loop<float>(dys, xs, h, a, rw, w13, w2, sizes, drw, dw13, dw2, dxs);
    else
        backward_loop<bf16>(dys, xs, h, a, rw, w13, w2, sizes, drw, dw13, dw2, dxs);
    at::Tensor dx = at::zeros({dout.size(0), d}, xs.options()).index_add_(0, src, dxs);
    return {dx, drw, dw13, dw2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
    m.def("experts_fwd(Tensor x, Tensor rw, Tensor w13, Tensor w2, Tensor src, int[] sizes) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
    m.def("experts_bwd(Tensor dout, Tensor xs, Tensor h, Tensor a, Tensor rw, Tensor w13, "
          "Tensor w2, Tensor src, int[] sizes, ScalarType weight_grad_dtype) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
    m.impl("experts_fwd", experts_fwd);
    m.impl("experts_bwd", experts_bwd);
}
