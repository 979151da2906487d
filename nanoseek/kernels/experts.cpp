/* The routed experts' training step on CPU, fp32 or bf16, built and loaded by nanoseek/kernels
 * as the torch ops nanoseek::experts_dispatch, experts_fwd and experts_bwd
 * (moe._FusedExpertLoop is the autograd node; moe._ExpertLoop is the same math in Python, the
 * path everywhere else), and the gate's top-k and backward, nanoseek::topk_rows and gate_bwd.
 *
 * Rows are (token, expert) pairs sorted by expert, sizes[e] rows for expert e (in bf16 padded
 * with rows of weight 0, see moe.Experts.sorted); src[r] is the token row r reads, rw[r] its
 * gate weight, and slot[t * k + j] the row of token t's j-th pair (experts_dispatch: a
 * counting sort, no argsort). Each expert's rows are copied from x (cast to the compute dtype
 * once) just before its first matmul, and summed back to their tokens through slot (each
 * token's k rows read and added in fp32, no scatter: the output rows are the threads' own). The shared experts run as more
 * experts that every token picks with weight 1 (sw13, sw2), so the MoE's output is summed here
 * whole. Per expert, on its block of rows:
 *     h = xs @ w13[e]^T           [rows, 2I]: gate | up
 *     a = rw * silu(gate) * up    [rows, I]   (the gate weight applied here, not to y)
 *     y = a @ w2[e]^T             [rows, d], summed back to the tokens afterwards
 * The backward, per expert: dw2[e] = dy^T a, da = dy @ w2[e], then one fused pass gives the
 * gate weight's gradient (sum over i of da * silu(gate) * up) and dh, then dw13[e] = dh^T xs
 * and dxs = dh @ w13[e]. Against the Python loop this saves its ~40 op calls per expert and
 * five of its seven elementwise passes; the matmuls are the same at::mm calls (MKL in fp32,
 * oneDNN in bf16), or on a CPU with AMX oneDNN's brgemm on 64-row blocks ("AMX tiles"
 * below). The elementwise math runs in fp32 (bf16 rounded once, on store), in at::vec
 * vectors (16 floats when built for AVX-512, 8 for AVX2: kernels._vec_flags); silu is torch's
 * formula (g / (1 + exp(-g)), Sleef's exp from libtorch), so fp32 results differ from the
 * Python loop's only in where rw is multiplied in: ~1 ulp. With several threads the
 * experts are shared out between them, each expert's matmuls on one thread (for_each_expert).
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <ATen/record_function.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <fbgemm/Utils.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
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

// From h [rows, 2I] in fp32 (a product's result, in cache): h stored in bf16 for the
// backward, and a = rw * silu(gate) * up from the fp32 values, in one pass
void swiglu_forward_fp32(const float* hf, const bf16* rw, bf16* h, bf16* a, int64_t rows,
                         int64_t I) {
    std::vector<float> buf(I);
    const int64_t full = I - I % Vec::size();
    for (int64_t r = 0; r < rows; r++) {
        const float *g = hf + r * 2 * I, *u = g + I;
        at::vec::convert(g, h + r * 2 * I, 2 * I);
        const float wr = static_cast<float>(rw[r]);
        const Vec w(wr);
        for (int64_t i = 0; i < full; i += Vec::size()) {
            Vec gv = Vec::loadu(g + i);
            ((gv * sigmoid(gv)) * Vec::loadu(u + i) * w).store(buf.data() + i);
        }
        for (int64_t i = full; i < I; i++) buf[i] = wr * (g[i] * sigmoid(g[i])) * u[i];
        at::vec::convert(buf.data(), a + r * I, I);
    }
}

// From da_w = dL/da (a = rw * silu(gate) * up): drw[r], and dh = [dgate | dup].
template <typename T, typename Td = T>
void swiglu_backward(const Td* daw, const T* h, const T* rw, T* dh, T* drw, int64_t rows,
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

// out[r] = x[src[r]] for r < rows: an expert's input rows, gathered just before its matmul
// reads them, while they are in cache (a 42K-row gather of its own beforehand left each
// expert's first matmul 1.45x slower, reading its rows from memory).
template <typename T>
void gather_rows(const T* x, const int64_t* src, T* out, int64_t rows, int64_t d) {
    for (int64_t r = 0; r < rows; r++) std::memcpy(out + r * d, x + src[r] * d, d * sizeof(T));
}

// out[t] = sum over j < k of ys[slot[t * k + j]], added in fp32: each token's rows back to it.
template <typename Ti, typename To>
void sum_rows(const Ti* ys, const int64_t* slot, To* out, int64_t tokens, int64_t k, int64_t d) {
    at::parallel_for(0, tokens, 64, [&](int64_t t0, int64_t t1) {
        std::vector<float> buf(d), row(d);
        const int64_t full = d - d % Vec::size();
        for (int64_t t = t0; t < t1; t++) {
            float* acc = out_row(out + t * d, buf.data());  // fp32: the output row itself
            std::fill(acc, acc + d, 0.0f);
            for (int64_t j = 0; j < k; j++) {
                const float* y = as_float(ys + slot[t * k + j] * d, d, row.data());
                for (int64_t i = 0; i < full; i += Vec::size())
                    (Vec::loadu(acc + i) + Vec::loadu(y + i)).store(acc + i);
                for (int64_t i = full; i < d; i++) acc[i] += y[i];
            }
            store_row(out + t * d, acc, d);
        }
    });
}

template <typename F>
void by_dtype(at::ScalarType dt, F&& body) {
    if (dt == at::kFloat)
        body(float{});
    else if (dt == at::kBFloat16)
        body(bf16{});
    else
        TORCH_CHECK(false, "experts kernels: fp32 or bf16 only");
}

at::Tensor sum_back(const at::Tensor& ys, const at::Tensor& slot, int64_t tokens,
                    at::ScalarType dt) {
    RECORD_FUNCTION("nanoseek::experts.sum_back", std::vector<c10::IValue>());
    const int64_t k = tokens ? slot.size(0) / tokens : 0;
    at::Tensor out = at::empty({tokens, ys.size(1)}, ys.options().dtype(dt));
    by_dtype(ys.scalar_type(), [&](auto ti) {
        by_dtype(dt, [&](auto to) {
            using Ti = decltype(ti);
            using To = decltype(to);
            sum_rows(ys.data_ptr<Ti>(), slot.data_ptr<int64_t>(), out.data_ptr<To>(), tokens, k,
                     ys.size(1));
        });
    });
    return out;
}

// indices [N, k] (each token's routed experts) -> (src [R], slot [N * (k + n_shared)],
// sizes [E + n_shared]): the pairs sorted by expert, stably (token order within an expert, as
// a stable argsort would), then n_shared blocks of every token (the shared experts, which
// run as experts E, E + 1, ... that every token picks); each block rounded up to a multiple
// of `pad` rows, padding rows reading token 0. slot[t * (k + n_shared) + j]: the row of token
// t's j-th routed pair (j < k), or of its row in shared block j - k.
std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_dispatch(const at::Tensor& indices,
                                                                 int64_t n_experts, int64_t pad,
                                                                 int64_t n_shared) {
    TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong,
                "experts_dispatch: indices [tokens, k] int64");
    TORCH_CHECK(pad >= 1 && n_experts >= 0 && n_shared >= 0,
                "experts_dispatch: pad >= 1, n_experts and n_shared >= 0");
    at::Tensor idx = indices.contiguous();
    const int64_t N = idx.size(0), k = idx.size(1), K = k + n_shared, E = n_experts + n_shared;
    const int64_t* e_of = idx.data_ptr<int64_t>();
    std::vector<int64_t> counts(E, N);  // the shared blocks: every token
    std::fill(counts.begin(), counts.begin() + n_experts, 0);
    for (int64_t p = 0; p < N * k; p++) {
        TORCH_CHECK(e_of[p] >= 0 && e_of[p] < n_experts, "experts_dispatch: expert out of range");
        counts[e_of[p]]++;
    }
    at::Tensor sizes = at::empty({E}, idx.options());
    int64_t* size = sizes.data_ptr<int64_t>();
    std::vector<int64_t> next(E);
    int64_t R = 0;
    for (int64_t e = 0; e < E; e++) {
        size[e] = (counts[e] + pad - 1) / pad * pad;
        next[e] = R;
        R += size[e];
    }
    at::Tensor src = at::zeros({R}, idx.options()), slot = at::empty({N * K}, idx.options());
    int64_t *s = src.data_ptr<int64_t>(), *sl = slot.data_ptr<int64_t>();
    for (int64_t t = 0; t < N; t++)
        for (int64_t j = 0; j < K; j++) {
            const int64_t r = next[j < k ? e_of[t * k + j] : n_experts + j - k]++;
            s[r] = t;
            sl[t * K + j] = r;
        }
    return {src, slot, sizes};
}

// One tensor a weight for each expert: the routed [E, ...] and, when given, the shared [s, ...].
std::vector<at::Tensor> per_expert(const at::Tensor& routed, const at::Tensor& shared) {
    std::vector<at::Tensor> out = routed.unbind(0);
    if (shared.defined())
        for (const at::Tensor& w : shared.unbind(0)) out.push_back(w);
    return out;
}

// The indices of each row's k largest values (scores [N, E] fp32), largest first; of equal
// values the lower index. k rounds of a vector max over the row, then the first lane that
// holds it, which is set to -inf (1.0 ms for 4 of 32 on 8,192 rows, one thread, against
// torch.topk's 2.6); a row the rounds cannot place (NaN, -inf) is ranked by a sort, NaN first
// as torch.topk ranks it.
at::Tensor topk_rows(const at::Tensor& scores, int64_t k) {
    TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat,
                "topk_rows: scores [rows, n] fp32");
    const int64_t N = scores.size(0), E = scores.size(1);
    TORCH_CHECK(k >= 1 && k <= E, "topk_rows: k must be in [1, n]");
    at::Tensor s = scores.contiguous();
    at::Tensor out = at::empty({N, k}, s.options().dtype(at::kLong));
    const float* v = s.data_ptr<float>();
    int64_t* o = out.data_ptr<int64_t>();
    constexpr int64_t W = Vec::size();
    const int64_t chunks = (E + W - 1) / W;
    const float low = -std::numeric_limits<float>::infinity();
    at::parallel_for(0, N, 1024, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(chunks * W, low);
        for (int64_t r = r0; r < r1; r++) {
            std::copy(v + r * E, v + (r + 1) * E, buf.begin());
            bool placed = true;
            for (int64_t i = 0; i < k && placed; i++) {
                Vec m = Vec::loadu(buf.data());
                for (int64_t c = 1; c < chunks; c++)
                    m = at::vec::maximum(m, Vec::loadu(buf.data() + c * W));
                const Vec top(at::vec::vec_reduce_all<float>(
                    [](Vec a, Vec b) { return at::vec::maximum(a, b); }, m));
                int64_t at_ = -1;
                for (int64_t c = 0; c < chunks && at_ < 0; c++) {
                    // != gives 0.0 in the lanes equal to the max: zero_mask's bits
                    const int eq = (Vec::loadu(buf.data() + c * W) != top).zero_mask();
                    if (eq) at_ = c * W + __builtin_ctz(eq);
                }
                placed = at_ >= 0 && at_ < E && buf[at_] != low;
                if (placed) {
                    o[r * k + i] = at_;
                    buf[at_] = low;
                }
            }
            if (!placed) {  // NaN or -inf among the k: an exact, slower ranking for this row
                std::vector<int64_t> order(E);
                for (int64_t e = 0; e < E; e++) order[e] = e;
                const float* row = v + r * E;
                std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
                    return row[a] > row[b] || (std::isnan(row[a]) && !std::isnan(row[b]));
                });
                std::copy(order.begin(), order.begin() + k, o + r * k);
            }
        }
    });
    return out;
}

// The gate's backward for sigmoid scores (moe._SparseGate): only the k chosen scores of a
// row carry a gradient (the bias only selects), so where autograd scatters them into a dense
// [N, E] gradient and runs two fp32 matmuls over it, this reads the k: per row, from the
// chosen scores s [N, k] and their weights' gradient g [N, k] (the weights are
// w_j = scale * s_j / (sum s + 1e-20) with norm, else scale * s_j), the logits' gradient
// dl_j = ds_j * s_j * (1 - s_j), then
// dx[n] = sum_j dl_j * w[idx_j] and dw[idx_j] += dl_j * x[n] (each thread into its own [E, d]
// sum, added in thread order: the same bits every run for a thread count).
std::tuple<at::Tensor, at::Tensor> gate_bwd(const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& idx, const at::Tensor& s,
                                            const at::Tensor& g, double scale, bool norm) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                    x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
                "gate_bwd: x [N, d] and w [E, d] fp32");
    TORCH_CHECK(idx.sizes() == s.sizes() && s.sizes() == g.sizes() && idx.dim() == 2 &&
                    idx.size(0) == x.size(0) && idx.scalar_type() == at::kLong &&
                    s.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat,
                "gate_bwd: idx, s, g [N, k] (long, fp32, fp32)");
    const int64_t N = x.size(0), d = x.size(1), E = w.size(0), k = idx.size(1);
    at::Tensor xc = x.contiguous(), wc = w.contiguous(), ic = idx.contiguous(),
               sc = s.contiguous(), gc = g.contiguous();
    at::Tensor dx = at::empty({N, d}, xc.options());
    const int threads = at::get_num_threads();
    at::Tensor parts = at::zeros({threads, E, d}, xc.options());
    const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>(),
                *sp = sc.data_ptr<float>(), *gp = gc.data_ptr<float>();
    const int64_t* ip = ic.data_ptr<int64_t>();
    float *dxp = dx.data_ptr<float>(), *pp = parts.data_ptr<float>();
    const float c = static_cast<float>(scale);
    at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
        float* dw = pp + at::get_thread_num() * E * d;
        std::vector<float> dl(k);
        for (int64_t r = r0; r < r1; r++) {
            const float *sr = sp + r * k, *gr = gp + r * k;
            float sum = 0.f, gs = 0.f;
            for (int64_t j = 0; j < k; j++) sum += sr[j];
            sum += 1e-20f;
            for (int64_t j = 0; j < k; j++) gs += gr[j] * sr[j];
            for (int64_t j = 0; j < k; j++) {
                const float ds = norm ? c / sum * (gr[j] - gs / sum) : c * gr[j];
                dl[j] = ds * sr[j] * (1.f - sr[j]);
            }
            const float* xr = xp + r * d;
            float* out = dxp + r * d;
            int64_t i = 0;
            for (; i + Vec::size() <= d; i += Vec::size()) {
                Vec acc(0.f);
                const Vec xv = Vec::loadu(xr + i);
                for (int64_t j = 0; j < k; j++) {
                    const int64_t e = ip[r * k + j];
                    acc = at::vec::fmadd(Vec(dl[j]), Vec::loadu(wp + e * d + i), acc);
                    float* dwe = dw + e * d + i;
                    at::vec::fmadd(Vec(dl[j]), xv, Vec::loadu(dwe)).store(dwe);
                }
                acc.store(out + i);
            }
            for (; i < d; i++) {
                float acc = 0.f;
                for (int64_t j = 0; j < k; j++) {
                    const int64_t e = ip[r * k + j];
                    acc += dl[j] * wp[e * d + i];
                    dw[e * d + i] += dl[j] * xr[i];
                }
                out[i] = acc;
            }
        }
    });
    return {dx, parts.sum(0)};
}

void check(const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& sw13,
           const at::Tensor& sw2, const at::Tensor& src, const at::Tensor& slot,
           at::IntArrayRef sizes) {
    const auto dt = w13.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "experts kernels: fp32 or bf16 only");
    TORCH_CHECK(w2.scalar_type() == dt, "experts kernels: w13 and w2 of one dtype");
    TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous() && src.is_contiguous() &&
                    slot.is_contiguous(),
                "experts kernels: contiguous tensors only");
    TORCH_CHECK(sw13.defined() == sw2.defined(), "experts kernels: shared w13 and w2 together");
    int64_t E = w13.size(0);
    if (sw13.defined()) {
        TORCH_CHECK(sw13.scalar_type() == dt && sw2.scalar_type() == dt,
                    "experts kernels: shared and routed experts of one dtype");
        TORCH_CHECK(sw13.sizes().slice(1) == w13.sizes().slice(1) &&
                        sw2.sizes().slice(1) == w2.sizes().slice(1) && sw2.size(0) == sw13.size(0),
                    "experts kernels: shared experts shaped as the routed ones");
        E += sw13.size(0);
    }
    TORCH_CHECK(E == (int64_t)sizes.size() && w2.size(0) == w13.size(0) && E >= 1,
                "experts kernels: one size per expert, and at least one expert");
    int64_t rows = 0;
    for (int64_t n : sizes) rows += n;
    TORCH_CHECK(rows == src.size(0), "experts kernels: sizes != rows");
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

// ---- AMX tiles: bf16 products through at::native::cpublas::brgemm ----
// On a CPU with AMX (cpublas::could_pack(bf16)) the products run as oneDNN's brgemm
// micro-kernel on blocks of CHUNK rows, their fp32 results used while in cache (the SwiGLU
// reads h in fp32; y, da and dxs are rounded to bf16 once). An expert's six products of 256
// rows (width 128, inner 128) took 207 us as at::mm calls and 65 as brgemm calls, one thread:
// oneDNN's per-call work and, for the weight gradients, a transposed operand. Packing costs
// some of it back: a 128-wide MoE layer is ~12% faster. brgemm takes B packed in VNNI pairs
// ([K/2, N, 2]), packed here: the weights once an expert a step (fp32 ones rounded to bf16 as
// they are packed), the row blocks as they are used. The weight gradients accumulate over the
// blocks in fp32 (the at::mm path rounds them to bf16), in place when the gradient is fp32 and
// the expert one thread's. The blocks of all experts are shared out between the threads in
// runs of about equal rows (for_each_part), so one wide expert (a dense MLP) splits over them
// too. Rows of width 128 or less only (amx_wanted). NANOSEEK_AMX=0 keeps the at::mm path (to
// compare).
constexpr int64_t CHUNK = 64;  // rows a block: moe.PAD, so in training every block is this size

bool amx_wanted(at::ScalarType dt, int64_t d, int64_t I, at::IntArrayRef sizes) {
    // AMX itself, not only a brgemm that packs (AVX512-BF16 CPUs: unmeasured there)
    static const bool available = [] {
        const auto caps = at::cpu::get_cpu_capabilities();
        const auto amx = caps.find("amx_bf16");
        return amx != caps.end() && amx->second.toBool() &&
               at::native::cpublas::could_pack(at::kBFloat16);
    }();
    const char* env = std::getenv("NANOSEEK_AMX");
    if (dt != at::kBFloat16 || !available || (env && std::string(env) == "0")) return false;
    for (int64_t n : sizes)
        if (n % 2) return false;  // a VNNI pair of rows
    // Rows up to 128 wide only: measured on one AMX Xeon, brgemm on 64-row blocks beat at::mm
    // wherever d was 128 (MoE experts of width 128, MLPs of width 640 and 1280) and lost from
    // 256 (a product with K = 256 ran at at::mm's speed at N = 256, 1.15x slower at 512, 2-3x
    // at 2,560: each block streams the packed weights again); `small`'s layers keep at::mm
    return d <= 128 && d % 32 == 0 && I % 16 == 0;
}

// Whether the bf16 experts of width I on rows of width d run on AMX tiles here (moe.MLP
// asks, to run a dense SwiGLU as one expert where it does)
bool experts_amx(int64_t d, int64_t I) { return amx_wanted(at::kBFloat16, d, I, {}); }

// Runs body(e, r0, r1, t) for each part [r0, r1) of expert e's rows that thread t takes: the
// experts' blocks in order, cut into one contiguous run a thread of about equal rows; an
// expert across a run's end is split between the threads whose runs it spans.
template <typename F>
void for_each_part(at::IntArrayRef sizes, F&& body) {
    const int64_t E = sizes.size();
    std::vector<int64_t> starts(E + 1, 0);
    for (int64_t e = 0; e < E; e++) starts[e + 1] = starts[e] + sizes[e];
    const int64_t blocks = (starts[E] + CHUNK - 1) / CHUNK;  // blocks of whole experts' rows
    const int64_t threads = at::get_num_threads();
    const int64_t T = at::in_parallel_region() ? 1 : std::min(threads, blocks);
    if (T <= 1) {
        for (int64_t e = 0; e < E; e++)
            if (sizes[e]) body(e, starts[e], starts[e + 1], 0);
        return;
    }
    const at::ThreadLocalState caller;  // grad mode, inference mode: see for_each_expert
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        at::ThreadLocalStateGuard guard(caller);
        for (int64_t t = t0; t < t1; t++) {
            const int64_t from = t * blocks / T * CHUNK, to = (t + 1) * blocks / T * CHUNK;
            for (int64_t e = 0; e < E; e++) {
                const int64_t r0 = std::max(from, starts[e]), r1 = std::min(to, starts[e + 1]);
                if (r0 < r1) body(e, r0, r1, t);
            }
        }
    });
}

// out [K/2, N, 2] <- b [K, N] (row stride ldb; K even): B's VNNI pairs, for brgemm
// (cpublas::pack, oneDNN's transform, takes N of at most 64): each pair of rows interleaved
void pack_rows(const bf16* b, int64_t K, int64_t N, int64_t ldb, bf16* out) {
    for (int64_t k = 0; k < K; k += 2, out += 2 * N) {
        const auto* r0 = reinterpret_cast<const uint16_t*>(b + k * ldb);
        const auto* r1 = r0 + ldb;
        auto* o = reinterpret_cast<uint16_t*>(out);
        int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
        for (; n + 16 <= N; n += 16) {  // 16 pairs: row k's value in the low half of each word
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + n)));
            const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r1 + n)));
            _mm512_storeu_si512(o + 2 * n, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
#endif
        for (; n < N; n++) {
            o[2 * n] = r0[n];
            o[2 * n + 1] = r1[n];
        }
    }
}

// out [K/2, N, 2] <- w [N, K]^T: the VNNI pairs of w's transpose, which are w's own pairs of
// adjacent columns, so a transpose of 32-bit words (fbgemm's, moved as floats: bits unchanged)
void pack_transposed(const bf16* w, int64_t N, int64_t K, bf16* out) {
    fbgemm::transpose_simd<float>(N, K / 2, reinterpret_cast<const float*>(w), K / 2,
                                  reinterpret_cast<float*>(out), N);
}

// out [N, M] <- a [M, N] (row stride lda): fbgemm's vector transpose
void transpose(const bf16* a, int64_t M, int64_t N, int64_t lda, bf16* out) {
    fbgemm::transpose_simd<uint16_t>(M, N, reinterpret_cast<const uint16_t*>(a), lda,
                                     reinterpret_cast<uint16_t*>(out), M);
}

// C [M, N] fp32 (= or +=) A [M, K] bf16 (row stride lda) @ B packed [K/2, N, 2]
inline void brgemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
                   float* C, bool add) {
    at::native::cpublas::brgemm(M, N, K, lda, N, N, add, A, B, C, true);
}

inline void store(const float* c, bf16* out, int64_t n) { at::vec::convert(c, out, n); }

// A weight's bf16 values: its own, or its fp32 values rounded into buf (as .to(bf16) rounds
// them) while the expert is packed: one pass in cache instead of a cast of every weight
// beforehand, which wrote and read again a bf16 copy of them all (~6 ms a step of the
// 128-wide MoE, one thread)
const bf16* bf16_values(const at::Tensor& w, bf16* buf) {
    if (w.scalar_type() == at::kBFloat16) return w.data_ptr<bf16>();
    at::vec::convert(w.data_ptr<float>(), buf, w.numel());
    return buf;
}

// A buffer of n values left unset, for a thread's blocks (std::vector's zeroing of them all
// cost ~1-2 ms a step of the 128-wide MoE)
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
    return std::make_unique_for_overwrite<T[]>(n);
}

void forward_amx(const at::Tensor& x, const at::Tensor& src, const at::Tensor& rw,
                 const std::vector<at::Tensor>& w13, const std::vector<at::Tensor>& w2,
                 at::IntArrayRef sizes, at::Tensor& xs, at::Tensor& h, at::Tensor& a,
                 at::Tensor& ys) {
    const int64_t I = w2[0].size(1), d = x.size(1);
    const bf16 *X = x.data_ptr<bf16>(), *RW = rw.data_ptr<bf16>();
    bf16 *XS = xs.data_ptr<bf16>(), *H = h.data_ptr<bf16>(), *A = a.data_ptr<bf16>();
    bf16* Y = ys.data_ptr<bf16>();
    const int64_t* S = src.data_ptr<int64_t>();
    for_each_part(sizes, [&](int64_t e, int64_t r0, int64_t r1, int64_t) {
        auto hf = scratch<float>(CHUNK * 2 * I), yf = scratch<float>(CHUNK * d);  // in fp32
        auto w13p = scratch<bf16>(d * 2 * I), w2p = scratch<bf16>(I * d);
        auto wb = scratch<bf16>(d * 2 * I);
        pack_transposed(bf16_values(w13[e], wb.get()), 2 * I, d, w13p.get());
        pack_transposed(bf16_values(w2[e], wb.get()), d, I, w2p.get());
        for (int64_t r = r0; r < r1; r += CHUNK) {
            const int64_t m = std::min(CHUNK, r1 - r);
            gather_rows(X, S + r, XS + r * d, m, d);
            brgemm(m, 2 * I, d, XS + r * d, d, w13p.get(), hf.get(), false);
            swiglu_forward_fp32(hf.get(), RW + r, H + r * 2 * I, A + r * I, m, I);
            brgemm(m, d, I, A + r * I, I, w2p.get(), yf.get(), false);
            store(yf.get(), Y + r * d, m * d);
        }
        at::native::cpublas::brgemm_release();
    });
}

// dst (fp32 or bf16, contiguous) <- src fp32
void store_grad(at::Tensor& dst, const float* src) {
    if (dst.scalar_type() == at::kFloat)
        std::memcpy(dst.data_ptr<float>(), src, dst.numel() * sizeof(float));
    else
        store(src, dst.data_ptr<bf16>(), dst.numel());
}

void backward_amx(const at::Tensor& dout, const at::Tensor& src, const at::Tensor& xs,
                  const at::Tensor& h, const at::Tensor& a, const at::Tensor& rw,
                  const std::vector<at::Tensor>& w13, const std::vector<at::Tensor>& w2,
                  at::IntArrayRef sizes, at::Tensor& drw, std::vector<at::Tensor>& dw13,
                  std::vector<at::Tensor>& dw2, at::Tensor& dxs) {
    const int64_t I = w2[0].size(1), d = xs.size(1), E = sizes.size();
    const bf16 *DO = dout.data_ptr<bf16>(), *XS = xs.data_ptr<bf16>(), *H = h.data_ptr<bf16>();
    const bf16 *A = a.data_ptr<bf16>(), *RW = rw.data_ptr<bf16>();
    bf16 *DRW = drw.data_ptr<bf16>(), *DXS = dxs.data_ptr<bf16>();
    const int64_t* S = src.data_ptr<int64_t>();
    // the weight gradients ([dw2 | dw13]) of the experts a thread ran only part of, with the
    // thread's index: summed afterwards in thread order, so the bits do not depend on timing
    std::vector<std::tuple<int64_t, int64_t, at::Tensor>> partial;
    std::mutex lock;
    for_each_part(sizes, [&](int64_t e, int64_t r0, int64_t r1, int64_t t) {
        const int64_t start = std::accumulate(sizes.begin(), sizes.begin() + e, int64_t{0});
        // the whole expert's fp32 gradients accumulate in place; a part's, or a bf16 one's,
        // in a buffer ([dw2 | dw13]) first
        const bool whole = r0 == start && r1 == start + sizes[e];
        const bool in_place = whole && dw2[e].scalar_type() == at::kFloat;
        auto acc = scratch<float>(in_place ? 0 : 3 * I * d);
        float* dw2acc = in_place ? dw2[e].data_ptr<float>() : acc.get();
        float* dw13acc = in_place ? dw13[e].data_ptr<float>() : dw2acc + I * d;
        auto c = scratch<float>(CHUNK * std::max(I, d));  // da, dxs
        auto w2p = scratch<bf16>(d * I), w13p = scratch<bf16>(2 * I * d);
        auto dy = scratch<bf16>(CHUNK * d), dh = scratch<bf16>(CHUNK * 2 * I);
        auto tr = scratch<bf16>(CHUNK * std::max(d, 2 * I));
        auto pk = scratch<bf16>(CHUNK * std::max(I, d)), wb = scratch<bf16>(2 * I * d);
        pack_rows(bf16_values(w2[e], wb.get()), d, I, I, w2p.get());
        pack_rows(bf16_values(w13[e], wb.get()), 2 * I, d, d, w13p.get());
        for (int64_t r = r0; r < r1; r += CHUNK) {
            const int64_t m = std::min(CHUNK, r1 - r);
            const bool add = r > r0;
            gather_rows(DO, S + r, dy.get(), m, d);
            // dw2 += dy^T a
            transpose(dy.get(), m, d, d, tr.get());
            pack_rows(A + r * I, m, I, I, pk.get());
            brgemm(d, I, m, tr.get(), m, pk.get(), dw2acc, add);
            // da = dy w2, then the SwiGLU's backward: dh and the gate weight's gradient
            brgemm(m, I, d, dy.get(), d, w2p.get(), c.get(), false);
            swiglu_backward<bf16, float>(c.get(), H + r * 2 * I, RW + r, dh.get(), DRW + r, m, I);
            // dw13 += dh^T xs
            transpose(dh.get(), m, 2 * I, 2 * I, tr.get());
            pack_rows(XS + r * d, m, d, d, pk.get());
            brgemm(2 * I, d, m, tr.get(), m, pk.get(), dw13acc, add);
            // dxs = dh w13
            brgemm(m, d, 2 * I, dh.get(), 2 * I, w13p.get(), c.get(), false);
            store(c.get(), DXS + r * d, m * d);
        }
        at::native::cpublas::brgemm_release();
        if (in_place) return;
        if (whole) {  // the whole expert: its gradient, converted
            store_grad(dw2[e], dw2acc);
            store_grad(dw13[e], dw13acc);
            return;
        }
        at::Tensor part = at::from_blob(acc.get(), {3 * I * d}, at::kFloat).clone();
        std::lock_guard<std::mutex> hold(lock);
        partial.emplace_back(e, t, part);
    });
    std::sort(partial.begin(), partial.end(), [](const auto& p, const auto& q) {
        return std::tie(std::get<0>(p), std::get<1>(p)) < std::tie(std::get<0>(q), std::get<1>(q));
    });
    for (size_t i = 0; i < partial.size(); i++) {
        auto& [e, t, sum] = partial[i];
        for (; i + 1 < partial.size() && std::get<0>(partial[i + 1]) == e; i++)
            sum.add_(std::get<2>(partial[i + 1]));
        store_grad(dw2[e], sum.data_ptr<float>());
        store_grad(dw13[e], sum.data_ptr<float>() + I * d);
    }
    for (int64_t e = 0; e < E; e++)
        if (sizes[e] == 0) {  // an expert without rows: zero gradient
            dw2[e].zero_();
            dw13[e].zero_();
        }
}

template <typename T>
void forward_loop(const at::Tensor& x, const at::Tensor& src, const at::Tensor& rw,
                  const std::vector<at::Tensor>& w13, const std::vector<at::Tensor>& w2,
                  at::IntArrayRef sizes, at::Tensor& xs, at::Tensor& h, at::Tensor& a,
                  at::Tensor& ys) {
    const int64_t I = w2[0].size(1), d = x.size(1);
    for_each_expert(sizes, [&](int64_t e, int64_t start, int64_t n, int64_t) {
        if (n == 0) return;
        at::Tensor hr = h.narrow(0, start, n), ar = a.narrow(0, start, n);
        at::Tensor yr = ys.narrow(0, start, n);
        gather_rows(x.data_ptr<T>(), src.data_ptr<int64_t>() + start,
                    xs.data_ptr<T>() + start * d, n, d);
        at::mm_out(hr, xs.narrow(0, start, n), w13[e].t());
        swiglu_forward<T>(hr.data_ptr<T>(), rw.data_ptr<T>() + start, ar.data_ptr<T>(), n, I);
        at::mm_out(yr, ar, w2[e].t());
    });
}

// slot [N * K] as [N, K], its columns [from, from + n) flattened
at::Tensor slot_columns(const at::Tensor& slot, int64_t N, int64_t K, int64_t from, int64_t n) {
    return slot.view({N, K}).narrow(1, from, n).reshape(-1);
}

// The weights in the compute dtype dt: as they are on AMX tiles (fp32 ones are rounded to
// bf16 as each expert is packed), else cast (once, whole)
std::vector<at::Tensor> weights_for(const at::Tensor& routed, const at::Tensor& shared,
                                    at::ScalarType dt, bool amx) {
    if (amx || routed.scalar_type() == dt) return per_expert(routed, shared);
    return per_expert(routed.to(dt), shared.defined() ? shared.to(dt) : shared);
}

// x [N, d] (fp32 or bf16), weights [N, k] (each token's gate weights), the routed experts'
// w13, w2 and the shared ones' sw13, sw2 (or undefined), to run in `dtype` (default: theirs)
// -> (out [N, d] in x's dtype, xs [R, d], h [R, 2I], a [R, I], rw [R]); all but out for the
// backward, which computes in xs's dtype
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_fwd(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& w13, const at::Tensor& w2,
    const std::optional<at::Tensor>& sw13, const std::optional<at::Tensor>& sw2,
    const at::Tensor& src, const at::Tensor& slot, at::IntArrayRef sizes,
    std::optional<at::ScalarType> dtype) {
    const at::Tensor shared13 = sw13.value_or(at::Tensor()), shared2 = sw2.value_or(at::Tensor());
    check(w13, w2, shared13, shared2, src, slot, sizes);
    const auto dt = dtype.value_or(w13.scalar_type());
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "experts kernels: fp32 or bf16 only");
    const int64_t R = src.size(0), I = w2.size(2), N = x.size(0), d = x.size(1);
    const int64_t k = weights.size(1), K = N ? slot.size(0) / N : k;
    TORCH_CHECK(weights.size(0) == N && slot.size(0) == N * K && K >= k,
                "experts_fwd: weights [N, k] and slot [N * (k + shared)]");
    // x converted once, in one pass: converting rows as they are gathered reads each fp32
    // row k times at random (1.5x the time)
    const at::Tensor xc = x.to(dt).contiguous();
    at::Tensor xs = at::empty({R, d}, xc.options());
    at::Tensor rw = at::zeros({R}, xc.options());  // padding rows weigh 0
    rw.index_copy_(0, slot_columns(slot, N, K, 0, k), weights.reshape(-1).to(dt));
    if (K > k) rw.index_fill_(0, slot_columns(slot, N, K, k, K - k), 1.0);  // shared rows: 1
    at::Tensor h = at::empty({R, 2 * I}, xs.options());
    at::Tensor a = at::empty({R, I}, xs.options());
    at::Tensor ys = at::empty({R, d}, xs.options());
    const bool amx = amx_wanted(dt, d, I, sizes);
    const auto W13 = weights_for(w13, shared13, dt, amx), W2 = weights_for(w2, shared2, dt, amx);
    if (amx)
        forward_amx(xc, src, rw, W13, W2, sizes, xs, h, a, ys);
    else if (dt == at::kFloat)
        forward_loop<float>(xc, src, rw, W13, W2, sizes, xs, h, a, ys);
    else
        forward_loop<bf16>(xc, src, rw, W13, W2, sizes, xs, h, a, ys);
    return {sum_back(ys, slot, N, x.scalar_type()), xs, h, a, rw};
}

// dst (the weights' dtype) <- src (the compute dtype), while src is in cache
void copy_converted(at::Tensor& dst, const at::Tensor& src) {
    if (src.scalar_type() == at::kBFloat16 && dst.scalar_type() == at::kFloat && dst.is_contiguous())
        at::vec::convert(src.data_ptr<bf16>(), dst.data_ptr<float>(), src.numel());
    else
        dst.copy_(src);
}

template <typename T>
void backward_loop(const at::Tensor& dout, const at::Tensor& src, const at::Tensor& xs,
                   const at::Tensor& h,
                   const at::Tensor& a, const at::Tensor& rw, const std::vector<at::Tensor>& w13,
                   const std::vector<at::Tensor>& w2, at::IntArrayRef sizes, at::Tensor& drw,
                   std::vector<at::Tensor>& dw13, std::vector<at::Tensor>& dw2, at::Tensor& dxs) {
    const int64_t I = w2[0].size(1);
    int64_t most = 0;
    for (int64_t n : sizes) most = std::max(most, n);
    // per thread, one expert's da and dh at a time: written and read again while in cache;
    // weight gradients wanted in another dtype (bf16 compute, fp32 parameters) go through a
    // buffer too and are converted while in cache, not in one cold pass afterwards
    const bool convert = dw13[0].scalar_type() != xs.scalar_type();
    const int64_t d = xs.size(1);
    std::vector<at::Tensor> dy_buf, daw_buf, dh_buf, dw13_buf, dw2_buf;
    for (int64_t t = 0, threads = expert_threads(sizes); t < threads; t++) {
        dy_buf.push_back(at::empty({most, d}, xs.options()));  // the rows' dout, gathered
        daw_buf.push_back(at::empty({most, I}, xs.options()));
        dh_buf.push_back(at::empty({most, 2 * I}, xs.options()));
        if (convert) {
            dw13_buf.push_back(at::empty(w13[0].sizes(), xs.options()));
            dw2_buf.push_back(at::empty(w2[0].sizes(), xs.options()));
        }
    }
    for_each_expert(sizes, [&](int64_t e, int64_t start, int64_t n, int64_t t) {
        at::Tensor dw13e = dw13[e], dw2e = dw2[e];
        if (n == 0) {  // an expert without rows: zero gradient
            dw13e.zero_();
            dw2e.zero_();
            return;
        }
        at::Tensor dy = dy_buf[t].narrow(0, 0, n), xr = xs.narrow(0, start, n);
        gather_rows(dout.data_ptr<T>(), src.data_ptr<int64_t>() + start, dy.data_ptr<T>(), n, d);
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

// -> (dx [N, d] in dout's dtype, dweights [N * k] fp32, dw13 [E, 2I, d], dw2 [E, d, I], the
// shared experts' dsw13, dsw2 (empty without them)); weight gradients in weight_grad_dtype;
// the products in xs's dtype, the weights' as experts_fwd ran them
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_bwd(
    const at::Tensor& dout, const at::Tensor& xs, const at::Tensor& h, const at::Tensor& a,
    const at::Tensor& rw, const at::Tensor& w13, const at::Tensor& w2,
    const std::optional<at::Tensor>& sw13, const std::optional<at::Tensor>& sw2,
    const at::Tensor& src, const at::Tensor& slot, int64_t k, at::IntArrayRef sizes,
    at::ScalarType weight_grad_dtype) {
    const at::Tensor shared13 = sw13.value_or(at::Tensor()), shared2 = sw2.value_or(at::Tensor());
    check(w13, w2, shared13, shared2, src, slot, sizes);
    const int64_t R = src.size(0), N = dout.size(0), d = xs.size(1), s = sizes.size() - w13.size(0);
    const auto grad = xs.options().dtype(weight_grad_dtype);
    const at::Tensor doutc = dout.to(xs.scalar_type()).contiguous();
    at::Tensor drw = at::empty({R}, rw.options());
    at::Tensor dw13 = at::empty(w13.sizes(), grad), dw2 = at::empty(w2.sizes(), grad);
    at::Tensor dsw13 = at::empty({s, w13.size(1), w13.size(2)}, grad);
    at::Tensor dsw2 = at::empty({s, w2.size(1), w2.size(2)}, grad);
    at::Tensor dxs = at::empty({R, d}, xs.options());
    const bool amx = amx_wanted(xs.scalar_type(), d, w2.size(2), sizes);
    const auto W13 = weights_for(w13, shared13, xs.scalar_type(), amx);
    const auto W2 = weights_for(w2, shared2, xs.scalar_type(), amx);
    auto dW13 = per_expert(dw13, dsw13), dW2 = per_expert(dw2, dsw2);
    if (amx)
        backward_amx(doutc, src, xs, h, a, rw, W13, W2, sizes, drw, dW13, dW2, dxs);
    else if (xs.scalar_type() == at::kFloat)
        backward_loop<float>(doutc, src, xs, h, a, rw, W13, W2, sizes, drw, dW13, dW2, dxs);
    else
        backward_loop<bf16>(doutc, src, xs, h, a, rw, W13, W2, sizes, drw, dW13, dW2, dxs);
    at::Tensor dx = sum_back(dxs, slot, N, dout.scalar_type());
    const int64_t K = N ? slot.size(0) / N : k;
    at::Tensor dweights = drw.index_select(0, slot_columns(slot, N, K, 0, k)).to(at::kFloat);
    return {dx, dweights, dw13, dw2, dsw13, dsw2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
    m.def("experts_dispatch(Tensor indices, int n_experts, int pad, int n_shared=0) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("experts_fwd(Tensor x, Tensor weights, Tensor w13, Tensor w2, Tensor? sw13, "
          "Tensor? sw2, Tensor src, Tensor slot, int[] sizes, ScalarType? dtype=None) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("experts_bwd(Tensor dout, Tensor xs, Tensor h, Tensor a, Tensor rw, Tensor w13, "
          "Tensor w2, Tensor? sw13, Tensor? sw2, Tensor src, Tensor slot, int k, int[] sizes, "
          "ScalarType weight_grad_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("topk_rows(Tensor scores, int k) -> Tensor");
    m.def("gate_bwd(Tensor x, Tensor w, Tensor idx, Tensor s, Tensor g, float scale, bool norm) "
          "-> (Tensor, Tensor)");
    m.def("experts_amx(int d, int inter) -> bool", experts_amx);  // no tensors: one kernel
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
    m.impl("experts_dispatch", experts_dispatch);
    m.impl("experts_fwd", experts_fwd);
    m.impl("experts_bwd", experts_bwd);
    m.impl("topk_rows", topk_rows);
    m.impl("gate_bwd", gate_bwd);
}
